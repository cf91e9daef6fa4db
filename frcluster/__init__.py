"""A recovery node in a cluster, above the broker and the node's roles: the node agent (``agent.py``), its configuration
(``config.py``), how settings reach it (``settings.py``) and how it moves replicas
(``migration.py``)."""
