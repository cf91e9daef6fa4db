"""Failover at the recovery side: test failover (``test.py``); planned and unplanned
failover, reverse replication and the embedding tool's hooks come next."""
