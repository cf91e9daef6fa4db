"""A node elected while the CAP's address is still held (the previous broker's listener
has not closed yet) retries within its term instead of dying.

Found by the cluster simulation (``scripts/simulate --cluster``): the bind failure left
``Broker.serve`` inside its nursery, so it reached ``ClusterNode._lead`` as an
``ExceptionGroup`` that its ``except OSError`` (the retry) did not catch: the node agent
ended, on the host where this happens in the demo and the loopback tests (every node and
the CAP's address on one machine)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from frtesting.sim.cluster import ClusterWorld
from frtesting.sim.runner import _certs_dir, _deterministic
from frtesting.sim.world import CAP_ADDRESS, CAP_PORT, node_address


def test_a_node_elected_while_the_caps_address_is_held_retries(tmp_path: Path) -> None:
    certs = _certs_dir()
    served: list[bool] = []

    async def main() -> None:
        world = ClusterWorld(tmp_path / "site", certs, 1)
        await world.set_settings()
        held = world.net.listen(CAP_ADDRESS, CAP_PORT)  # the previous broker's listener
        node = world.nodes[0]
        async with trio.open_nursery() as nursery:
            await world.start_node(nursery, node)
            await trio.sleep(3.0)  # elected, and failing to bind meanwhile
            assert node.done is not None
            assert not node.done.is_set(), "the node agent ended"
            await held.aclose()
            await trio.sleep(1.0)
            stream = await world.net.connect(node_address(1), CAP_ADDRESS, CAP_PORT)
            served.append(stream is not None)
            await stream.aclose()
            nursery.cancel_scope.cancel()

    with _deterministic(1):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert served == [True]
