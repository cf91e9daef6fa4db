"""A recovery node in a cluster, above the broker and the node's roles.

The node agent (``agent.py``) and its configuration (``config.py``); how it learns what
is asked of its replicas (``requests.py``) and carries it out: moving a replica
(``migration.py``, ``transfer.py``), failing a VM over (``failover.py``), importing an
out-of-band IR (``oob_import.py``).
"""
