"""How one IR read is cut into chunks: every all-zero 1 MiB piece alone (a flag on the
wire), the bytes between as one chunk (node/primary/client.py:ir_pieces)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from node.primary.client import IR_CHUNK, IR_ZERO_PIECE, ir_pieces

MIB = 1024 * 1024


def _read(kinds: list[str], tail: int = 0) -> bytearray:
    """A read made of 1 MiB pieces: "z" all zeros, "d" data (one non-zero byte, placed
    last so that a check of the first bytes only would miss it), then ``tail`` bytes of
    data."""
    data = bytearray(len(kinds) * IR_ZERO_PIECE + tail)
    for i, kind in enumerate(kinds):
        if kind == "d":
            data[(i + 1) * IR_ZERO_PIECE - 1] = 7
    if tail:
        data[-1] = 9
    return data


def _has_data(b: bytearray) -> bool:
    return b.count(0) != len(b)


def test_a_read_with_no_zero_piece_is_one_chunk() -> None:
    data = _read(["d", "d", "d", "d"])
    assert list(ir_pieces(memoryview(data))) == [(0, IR_CHUNK)]


def test_zero_pieces_travel_alone_and_the_data_between_is_joined() -> None:
    data = _read(["d", "z", "d", "d"])
    assert list(ir_pieces(memoryview(data))) == [
        (0, MIB),
        (MIB, 2 * MIB),
        (2 * MIB, 4 * MIB),
    ]


def test_an_all_zero_read_is_one_zero_chunk_per_piece() -> None:
    data = _read(["z", "z", "z", "z"])
    assert list(ir_pieces(memoryview(data))) == [(i * MIB, (i + 1) * MIB) for i in range(4)]


def test_joined_data_is_cut_at_the_join_size() -> None:
    # with a bandwidth limit the primary sends 1 MiB chunks (a steady rate)
    data = _read(["d", "d", "z", "d"])
    assert list(ir_pieces(memoryview(data), IR_ZERO_PIECE)) == [
        (0, MIB),
        (MIB, 2 * MIB),
        (2 * MIB, 3 * MIB),
        (3 * MIB, 4 * MIB),
    ]
    assert list(ir_pieces(memoryview(data), 2 * MIB)) == [
        (0, 2 * MIB),
        (2 * MIB, 3 * MIB),
        (3 * MIB, 4 * MIB),
    ]


def test_a_short_last_piece_is_checked_too() -> None:
    # the end of a disk: a read shorter than IR_CHUNK, not a multiple of the piece
    zeros = bytearray(MIB + 4096)
    assert list(ir_pieces(memoryview(zeros))) == [(0, MIB), (MIB, MIB + 4096)]
    data = _read(["z"], tail=4096)
    assert list(ir_pieces(memoryview(data))) == [(0, MIB), (MIB, MIB + 4096)]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.sampled_from("zd"), min_size=1, max_size=4),
    st.integers(0, 3),
    st.sampled_from([MIB, 2 * MIB, IR_CHUNK]),
)
def test_the_pieces_cover_the_read_in_order_and_only_zero_pieces_are_zero(
    kinds: list[str], tail_kib: int, join: int
) -> None:
    data = _read(kinds, tail=tail_kib * 1024)
    pieces = list(ir_pieces(memoryview(data), join))
    assert pieces[0][0] == 0
    assert pieces[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    for lo, hi in pieces:
        assert hi > lo
        assert hi - lo <= join
        if not _has_data(data[lo:hi]):
            assert lo % IR_ZERO_PIECE == 0
            assert hi - lo <= IR_ZERO_PIECE
        else:
            # a data chunk holds no all-zero whole piece
            for p in range(lo, hi, IR_ZERO_PIECE):
                assert _has_data(data[p : min(p + IR_ZERO_PIECE, hi)])
