"""``bench/broker.py``: broker query latency (the benchmark is ``broker_latency.py``).

Python puts a script's directory first on ``sys.path``, so a script named ``broker.py``
would be imported in place of the ``broker`` package. This launcher takes ``bench/`` off
the path and runs the benchmark itself. (It is excluded from mypy for the same reason.)
"""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
runpy.run_path(str(HERE / "broker_latency.py"), run_name="__main__")
