"""Run every benchmark in this folder (``bench_*.py``); each prints its own result lines."""

import subprocess
import sys
from pathlib import Path

failed = 0
for script in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
    print(f"# {script.name}", file=sys.stderr, flush=True)
    failed += subprocess.run([sys.executable, str(script)]).returncode != 0
sys.exit(1 if failed else 0)
