"""Runs a flow in its own process: ``flow_runner.py RUN_NAME PARAMS_JSON [MODULE:FLOW]``.

The flow defaults to the database-corruption recovery.
"""

import importlib
import json
import sys

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    module, _, attribute = (sys.argv[3] if len(sys.argv) > 3 else "flows.db_corruption:db_corruption").partition(":")
    flow_fn = getattr(importlib.import_module(module), attribute)
    state = flow_fn.with_options(flow_run_name=name)(**params, return_state=True)
    print(f"final state: {state.name}")
