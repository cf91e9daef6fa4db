"""Names that moved after 0.1.0, kept working (with a DeprecationWarning) for one release.

Top-level names: the limits moved to :mod:`frproto.limits`, the codec helpers to
:mod:`frproto.codec`, the JSON helpers to :mod:`frproto.jsonable`; ``frproto.__getattr__``
answers the old names from :data:`MOVED`. Methods: ``FrprotoError.to_message()`` and
``RemoteProtocolError.error`` became ``Error.from_exception(exc)`` (the exceptions no
longer know the Error message; ``Connection.send_error(exc)`` takes the exception
itself); :func:`add_old_methods` puts them back, warning, on the exception classes.

Remove this module, and the lines of ``frproto/__init__.py`` that use it, in the release
after the next.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Final

from ._errors import FrprotoError, RemoteProtocolError
from ._messages import Error

_LIMITS = (
    "CHUNK_HEADER_SIZE",
    "DIGEST_SIZE",
    "ENVELOPE_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_CHUNK_DATA",
    "MAX_CONFIG_BLOB",
    "MAX_CONTROL_BODY",
    "MAX_DIGESTS",
    "MAX_DISKS",
    "MAX_DISK_ID",
    "MAX_ERROR_TEXT",
    "MAX_FQDN",
    "MAX_NAME",
    "MIN_BLOCK_SIZE",
    "PROTOCOL_VERSION",
)
_CODEC = (
    "ERROR_CLASSES",
    "IGNORABLE_TAG_BIT",
    "MESSAGE_CLASSES",
    "AggregateDigest",
    "chunk_digest",
    "decode_frame",
    "encode_frame",
    "error_class_for",
    "zero_digest",
)
_JSONABLE = ("describe", "message_from_dict", "message_to_dict")

#: Old top-level name -> the public module that has it now (under the same name).
MOVED: Final[dict[str, str]] = {
    **dict.fromkeys(_LIMITS, "limits"),
    **dict.fromkeys(_CODEC, "codec"),
    **dict.fromkeys(_JSONABLE, "jsonable"),
}


def moved(name: str) -> Any:
    """The value of the old top-level name ``name``, with a DeprecationWarning."""
    module = MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'frproto' has no attribute {name!r}")
    warnings.warn(
        f"frproto.{name} moved to frproto.{module}.{name}; the old name will be removed",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(f"frproto.{module}"), name)


def _to_message(self: FrprotoError) -> Error:
    """Deprecated: use ``Error.from_exception(exc)``."""
    warnings.warn(
        "FrprotoError.to_message() is deprecated; use frproto.Error.from_exception(exc)",
        DeprecationWarning,
        stacklevel=2,
    )
    return Error.from_exception(self)


def _error(self: RemoteProtocolError) -> Error:
    """Deprecated: use ``Error.from_exception(exc)``."""
    warnings.warn(
        "RemoteProtocolError.error is deprecated; use frproto.Error.from_exception(exc)",
        DeprecationWarning,
        stacklevel=2,
    )
    return Error.from_exception(self)


def add_old_methods() -> None:
    """Give the exception classes back ``to_message()`` and ``error``, warning."""
    setattr(FrprotoError, "to_message", _to_message)  # noqa: B010
    setattr(RemoteProtocolError, "error", property(_error))  # noqa: B010
