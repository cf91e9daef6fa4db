"""The web console: the cluster's state and its administration in a browser.

Served by every node agent that has a ``[console]`` table (``frcluster/agent.py``), over
HTTPS with the node's certificate. It reads the cluster store (``broker/cluster_view.py``)
and changes it only through ``broker/admin.py``, so the console, ``frctl cluster`` and any
other tool refuse the same things with the same words. See ``frconsole/app.py``.
"""

from .app import ConsoleSource, ReplicaReport, console_app

__all__ = ["ConsoleSource", "ReplicaReport", "console_app"]
