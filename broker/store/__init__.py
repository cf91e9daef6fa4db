"""The cluster store: the broker's database, with revisions, compare-and-swap, watches, leases.

One interface (`ClusterStore`, etcd v3 semantics) and two backends selected by a URL:

- ``sqlite:///abs/path/cluster.db``: the embedded default, one SQLite file in WAL mode shared
  by the processes of one host (`SqliteStore`). Options as query parameters:
  ``poll_interval`` (seconds), ``retention`` (revisions), ``synchronous`` (FULL/NORMAL),
  ``busy_timeout`` (seconds).
- ``etcd://host1:2379,host2:2379,host3:2379``: an etcd >= 3.4 cluster through its JSON gateway
  (`EtcdStore`), failing over between the listed members. Options: ``request_timeout``,
  ``connect_timeout`` and ``attempt_timeout`` (seconds). ``etcd+https://`` uses HTTPS.
  It needs httpx, which the ``etcd`` extra installs (``pip install 'frrep[etcd]'``):
  ``broker.store.etcd`` is imported only when an etcd store is opened (or ``EtcdStore`` is
  named), so the rest of the store works without it.

See ``docs/cluster-store.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from .base import (
    ClusterStore,
    Compacted,
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    EventKind,
    Get,
    KeyValue,
    LeaseExpired,
    Op,
    Put,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
)
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from .etcd import EtcdStore as EtcdStore

__all__ = [
    "ClusterStore",
    "Compacted",
    "Compare",
    "CompareOp",
    "CompareTarget",
    "Delete",
    "EventKind",
    "Get",
    "KeyValue",
    "LeaseExpired",
    "MissingBackend",
    "Op",
    "Put",
    "SqliteStore",
    "StoreError",
    "StoreUnavailable",
    "TxnResult",
    "WatchEvent",
    "etcd_store_class",
    "open_store",
]

#: The URL schemes of the etcd backend.
ETCD_SCHEMES: Final = frozenset({"etcd", "etcd+http", "etcd+https"})


class MissingBackend(StoreError):
    """The store's backend needs a package that is not installed (an extra of frrep)."""


def etcd_store_class() -> type[EtcdStore]:
    """The etcd backend, imported now (it needs httpx).

    Raises:
        MissingBackend: httpx is not installed; the message says which extra brings it.
    """
    try:
        from .etcd import EtcdStore
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in {"httpx", "httpcore"}:
            raise
        raise MissingBackend(
            f"an etcd:// cluster store needs the Python package {exc.name}, which frrep's "
            "'etcd' extra installs: pip install 'frrep[etcd]'"
        ) from None
    return EtcdStore


def __getattr__(name: str) -> Any:
    # `from broker.store import EtcdStore` keeps working, importing httpx only then.
    if name == "EtcdStore":
        return etcd_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> ClusterStore:
    """Open the cluster store named by ``url`` (no I/O happens until its first use).

    ``sqlite:///abs/path.db[?poll_interval=0.05&retention=10000&synchronous=FULL]`` or
    ``etcd://127.0.0.1:2379,127.0.0.1:22379[?request_timeout=10&connect_timeout=1&attempt_timeout=2]``
    (``etcd+https://`` for TLS). Raises `ValueError` for anything else, and
    `MissingBackend` for an etcd URL when httpx (the ``etcd`` extra) is not installed.
    """
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    store: ClusterStore
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ValueError("a sqlite store URL is sqlite:///absolute/path.db")
        store = SqliteStore(
            path,
            poll_interval=float(options.pop("poll_interval", 0.05)),
            retention=int(options.pop("retention", 10_000)),
            synchronous=options.pop("synchronous", "FULL"),
            busy_timeout=float(options.pop("busy_timeout", 10.0)),
        )
    elif parts.scheme in ETCD_SCHEMES:
        scheme = "https" if parts.scheme == "etcd+https" else "http"
        hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
        if not hosts:
            raise ValueError("an etcd store URL is etcd://host:port[,host:port...]")
        store = etcd_store_class()(
            [f"{scheme}://{h}" for h in hosts],
            request_timeout=float(options.pop("request_timeout", 10.0)),
            connect_timeout=float(options.pop("connect_timeout", 1.0)),
            attempt_timeout=float(options.pop("attempt_timeout", 2.0)),
        )
    else:
        raise ValueError(f"unknown cluster store URL {url!r}: use sqlite:///path or etcd://hosts")
    if options:
        raise ValueError(f"unknown cluster store option(s) {sorted(options)} in {url!r}")
    return store
