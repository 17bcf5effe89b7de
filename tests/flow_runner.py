"""Runs the database-corruption flow in its own process: ``flow_runner.py RUN_NAME PARAMS_JSON``."""

import json
import sys

from flows.db_corruption import db_corruption

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    state = db_corruption.with_options(flow_run_name=name)(**params, return_state=True)
    print(f"final state: {state.name}")
