"""A recovery node in a cluster: the node agent (``agent.py``), its configuration
(``config.py``), how settings reach it (``settings.py``) and how it moves replicas
(``migration.py``)."""
