"""The etcd JSON gateway's encoding: store types to and from etcd's v3 JSON.

The gateway's JSON has its quirks, handled here:

- keys, values and ``range_end`` are base64; int64 fields (revisions, lease ids, TTLs) are
  JSON strings;
- proto3 default values are omitted: a failed txn has no ``succeeded``, an empty range no
  ``kvs``, a PUT event no ``type``, a keepalive on a dead lease no ``TTL``; so every field is
  read with its default.
"""

from __future__ import annotations

import base64
from typing import Any

from .base import Compare, CompareOp, CompareTarget, Delete, KeyValue, Op, Put, prefix_range_end

__all__ = ["JSON", "b64", "compare_json", "key_range", "kv_of", "op_json", "revision_of"]

JSON = dict[str, Any]

_RESULT = {
    CompareOp.EQUAL: "EQUAL",
    CompareOp.NOT_EQUAL: "NOT_EQUAL",
    CompareOp.LESS: "LESS",
    CompareOp.GREATER: "GREATER",
}
_TARGET_FIELD = {
    CompareTarget.MOD: "mod_revision",
    CompareTarget.CREATE: "create_revision",
    CompareTarget.VERSION: "version",
    CompareTarget.VALUE: "value",
}


def b64(data: str | bytes) -> str:
    """``data`` (text as UTF-8) in base64, as etcd's bytes fields want it."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def key_range(prefix: str) -> tuple[str, str]:
    """``key`` and ``range_end`` (base64) selecting every key that starts with ``prefix``."""
    start = prefix.encode("utf-8")
    end = prefix_range_end(start)
    # "\0" as key = from the first key; "\0" as range_end = no upper bound (etcd's convention).
    return b64(start or b"\0"), b64(end or b"\0")


def kv_of(data: JSON) -> KeyValue:
    """A KeyValue from etcd's ``mvccpb.KeyValue`` JSON."""
    return KeyValue(
        key=_unb64(data.get("key")).decode("utf-8"),
        value=_unb64(data.get("value")),
        create_revision=int(data.get("create_revision", 0)),
        mod_revision=int(data.get("mod_revision", 0)),
        version=int(data.get("version", 0)),
        lease=int(data.get("lease", 0)),
    )


def revision_of(data: JSON) -> int:
    """The store revision in an answer's header."""
    return int(data.get("header", {}).get("revision", 0))


def compare_json(compare: Compare) -> JSON:
    """A txn ``compare`` entry."""
    field = _TARGET_FIELD[compare.target]
    operand = compare.operand
    return {
        "key": b64(compare.key),
        "target": compare.target.value,
        "result": _RESULT[compare.op],
        field: b64(operand) if isinstance(operand, bytes) else str(operand),
    }


def op_json(op: Op) -> JSON:
    """A txn ``request_op`` (``request_put``'s body is also a ``kv/put`` request)."""
    if isinstance(op, Put):
        return {"request_put": {"key": b64(op.key), "value": b64(op.value), "lease": str(op.lease)}}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": b64(op.key)}}
    return {"request_range": {"key": b64(op.key)}}
