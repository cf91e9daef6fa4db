"""Messages of a planned failover (protocol version 1.1, ``docs/protocol.md`` 4.19-4.22).

A primary whose VM is stopped and whose last batch is acknowledged asks the recovery
side to take the VM over (:class:`FailoverRequest`, in an open relationship); the recovery
side checks that its replica holds exactly the primary's final state (the applied
sequence and the state digest, :func:`frproto.codec.state_digest`), fails over to it at
the relationship's next generation and answers :class:`FailoverDone`, after which no
relationship is open on the connection (READY). Both tags are ignorable (NEG-9) and sent
only on a connection negotiated at 1.1 or later (NEG-13).

A planned failover may also be asked at the recovery side (``frctl cluster failover
--planned``): the recovery side, answering a primary's RelationshipCreate or
RelationshipOpen, sends :class:`FailoverAsk` just before RelationshipAccepted; the primary
then either carries out the planned failover above or answers :class:`FailoverDecline`
with its reason, in the session that follows, and carries on replicating. Both are
ignorable and 1.1 too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, ClassVar

from ._chunks import AggregateDigest
from ._enums import MessageTag
from ._fields import U16, U32, U64, Digest, ErrorText, Vmid
from ._messages import Message
from ._replication import BlockSize
from .limits import DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class FailoverRequest(Message):
    """Primary to recovery server: take the VM over at its final state.

    ``sequence`` is the last batch (or IR) the recovery server acknowledged; the state
    digest is XXH3-128 over every disk's block digests at ``block_size``, in disk order
    (section 4.19). ``reverse_port``, when not 0, is the port of the primary host's own
    recovery server, at the connection's peer address and named as the primary's
    certificate: the recovery side then replicates the VM back there by itself.
    """

    TAG: ClassVar[MessageTag] = MessageTag.FAILOVER_REQUEST
    vmid: Vmid
    sequence: U64
    block_size: BlockSize
    state_digest: Digest
    reverse_port: U16 = 0


@dataclass(frozen=True, slots=True)
class FailoverDone(Message):
    """Recovery server to primary: the VM is failed over here at ``generation`` (the
    relationship's next), running from the point ``sequence`` (the request's)."""

    TAG: ClassVar[MessageTag] = MessageTag.FAILOVER_DONE
    vmid: Vmid
    generation: U32
    sequence: U64


@dataclass(frozen=True, slots=True)
class FailoverAsk(Message):
    """Recovery side to primary, in OPENING just before RelationshipAccepted: a planned
    failover of the VM being opened is asked at the recovery side (section 4.21). The
    primary answers, in the session, with a FailoverRequest (after its stop hook and last
    batch) or a :class:`FailoverDecline`."""

    TAG: ClassVar[MessageTag] = MessageTag.FAILOVER_ASK
    vmid: Vmid


@dataclass(frozen=True, slots=True)
class FailoverDecline(Message):
    """Primary to recovery side, in SESSION: the asked planned failover will not be done
    (no stop hook configured, the hook failed); ``reason`` says why, for people, at most
    ``MAX_ERROR_TEXT`` bytes of UTF-8 (section 4.22). Replication carries on."""

    TAG: ClassVar[MessageTag] = MessageTag.FAILOVER_DECLINE
    vmid: Vmid
    reason: Annotated[str, ErrorText()] = ""


def state_digest(block_digests: Iterable[bytes]) -> bytes:
    """The state digest of a VM (section 4.19): XXH3-128 over the concatenation of its
    disks' block digests, each disk's digests (16 bytes per block, blocks of the
    request's ``block_size``, the last cut at the disk's end) in disk order."""
    aggregate = AggregateDigest()
    for digests in block_digests:
        for start in range(0, len(digests), DIGEST_SIZE):
            aggregate.add(bytes(digests[start : start + DIGEST_SIZE]))
    return aggregate.digest()
