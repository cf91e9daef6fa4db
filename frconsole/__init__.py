"""The web console: a recovery site's state and its administration in a browser.

Served over HTTPS with the host's certificate by every cluster node agent that has a
``[console]`` table (``frcluster/agent.py``, pages in ``frconsole/cluster.py``: they read
the cluster store, ``broker/cluster_view.py``, and change it only through
``broker/admin.py``), and by a stand-alone recovery server that has one
(``frconsole/standalone.py``: the replicas it holds, its configuration). The frame every
console shares, login, sessions, CSRF, the audit log, is ``frconsole/app.py``.
"""

from .app import ReplicaReport, Source, console_app
from .cluster import ConsoleSource

__all__ = ["ConsoleSource", "ReplicaReport", "Source", "console_app"]
