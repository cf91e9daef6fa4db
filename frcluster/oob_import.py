"""Out-of-band IR in a cluster: the import goes to the node that owns the VM.

``frctl cluster import --config node.toml FILE`` runs on any node. The VM's record in the
cluster store (the broker's placement) names its owner; the file's frames are read and
checked (each chunk's digest, then IREnd's count and aggregate digest, by a
recovery-role connection) and sent to the owner over mutual TLS with this node's
certificate, as one IR. The owner verifies every chunk again as it arrives and completes
the IR; the primary, waiting for its import, finds the IR complete at its next cycle.

The VM must already have a record: its primary was enabled and asked the broker, which
placed it (a primary that exported its IR waits for the import instead of sending it).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import frproto as fp
from broker.records import Keys, NodeRecord, VMRecord
from broker.store import open_store
from frlink.tls import client_context
from node.oob_file import (
    MAGIC,
    FrameReader,
    OOBFormatError,
    OOBRefused,
    check_magic,
    negotiated_pair,
)
from node.primary.client import RecoveryClient

from .config import ClusterNodeConfig

_ZEROS = memoryview(bytes(fp.limits.MAX_CHUNK_DATA))


@dataclass(frozen=True)
class ClusterImportResult:
    """What an import through the cluster did."""

    vmid: uuid.UUID
    node: str  #: the owner that completed the IR
    data_bytes: int
    zero_bytes: int
    chunks: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "vmid": str(self.vmid),
            "node": self.node,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "chunks": self.chunks,
            "seconds": round(self.seconds, 3),
        }


async def _owner(config: ClusterNodeConfig, vmid: uuid.UUID) -> NodeRecord:
    keys = Keys(config.prefix)
    async with open_store(config.store_url) as store:
        kv = await store.get(keys.vm(vmid))
        if kv is None:
            raise OOBRefused(
                f"the cluster has no VM {vmid}: enable its replication first (the broker "
                "places it when its primary first asks)"
            )
        vm = VMRecord.from_json(kv.value)
        if vm.deleted:
            raise OOBRefused(f"VM {vmid} was deleted by an administrator")
        node_kv = await store.get(keys.node(vm.owner))
        if node_kv is None:
            raise OOBRefused(f"VM {vmid} is on {vm.owner}, which is down")
        return NodeRecord.from_json(node_kv.value)


async def import_through_cluster(config: ClusterNodeConfig, path: Path) -> ClusterImportResult:
    """Send the export file at ``path`` to the node that owns its VM, which completes
    the IR.

    Raises:
        OOBRefused: the cluster has no such VM, it is deleted, its owner is down, or its
            IR is already complete.
        OOBFormatError, frproto.FrprotoError: the file does not check, or the owner
            refused (its error).
    """
    started = time.monotonic()
    checker = negotiated_pair()[1]
    with open(path, "rb", buffering=0) as f:
        check_magic(f.read(len(MAGIC)))
        reader = FrameReader(f, checker)
        create = reader.next_message()
        if not isinstance(create, fp.RelationshipCreate):
            raise OOBFormatError(f"{path}: the first frame is not a RelationshipCreate")
        checker.send(fp.RelationshipAccepted(create.vmid, create.disks))
        begin = reader.next_message()
        if not isinstance(begin, fp.IRBegin) or (begin.start_disk, begin.start_offset) != (0, 0):
            raise OOBFormatError(f"{path}: the second frame is not an IRBegin of a whole IR")
        owner = await _owner(config, create.vmid)
        tls = config.tls
        client = await RecoveryClient.connect(
            owner.address,
            owner.port,
            server_name=owner.name,
            ssl_context=client_context(tls.cert, tls.key, tls.ca),
        )
        try:
            accepted = await client.open(
                create.vmid,
                name=create.vm_name,
                disks=create.disks,
                config=create.config,
                create=True,
            )
            if accepted.ir_state is fp.IRState.COMPLETE:
                raise OOBRefused(f"the IR of {create.vmid} is already complete on {owner.name}")
            await client.conn.send(fp.IRBegin(create.vmid, begin.sequence, 0, 0, begin.total_bytes))
            data_bytes = zero_bytes = 0
            while True:
                event = reader.next_message()
                if isinstance(event, fp.IREnd):
                    break
                if not isinstance(event, fp.Chunk):
                    raise OOBFormatError(f"{path}: {type(event).__name__} inside the IR")
                if event.is_zero:
                    await client.conn.send_chunk(
                        event.disk_index, event.offset, _ZEROS[: event.length]
                    )
                    zero_bytes += event.length
                else:
                    await client.conn.send_chunk(
                        event.disk_index, event.offset, event.data, digest=event.digest
                    )
                    data_bytes += event.length
            reader.expect_end()  # the file's own count and aggregate digest checked out
            await client.conn.end_ir()
            ack = await client.conn.expect(fp.Ack)
            assert isinstance(ack, fp.Ack)
        finally:
            await client.aclose()
    return ClusterImportResult(
        vmid=create.vmid,
        node=owner.name,
        data_bytes=data_bytes,
        zero_bytes=zero_bytes,
        chunks=event.chunk_count,
        seconds=time.monotonic() - started,
    )
