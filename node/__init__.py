"""The host agent: recovery server (replica storage, IR, journaled deltas, recovery
points) and primary replicator (change tracking, scheduling, sending).

Not built yet (issue "Stand-alone replication over mutual TLS"); the package exists so
that its layout and typing are in place from the first commit.
"""
