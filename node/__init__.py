"""The host agent's two roles, side by side and importing nothing of each other:

* the recovery server (``recovery_server.py``, the session of a connection
  ``recovery_session.py``, its config ``config.py``, IR writes ``ir_writes.py``,
  out-of-band import ``oob_import.py``) on the replica storage of ``storage/``;
* the primary (``primary/``): change tracking, deciding what a cycle sends, sending,
  following the broker.

``failover/`` works on a recovery server's storage and the primary's state. What both
roles share is below them: the wire (:mod:`frproto`), the link (:mod:`frlink`) and the
out-of-band file format (``oob_file.py``). ``docs/architecture.md`` draws the floors.
"""
