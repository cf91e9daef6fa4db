"""The golden vectors in ``tests/vectors/`` against frproto.

Message vectors: each frame decodes to its fields and each message encodes to its frame,
and a connection in context receives it (whole, or one byte at a time) as that message.
Error vectors: each input raises exactly its error class, whole or byte by byte, and
leaves the connection in ERROR. Coverage tests make sure no message class or
RemoteProtocolError leaf loses its file, and ``generate.py --check`` keeps the checked-in
files equal to what the generator writes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import frproto
from frproto import Connection, RemoteProtocolError, State
from tests.frproto.vectors import (
    VECTORS_DIR,
    ErrorCase,
    ErrorVectors,
    MessageCase,
    MessageVectors,
    all_frames,
    dump_json,
    error_cases,
    feed,
    load_error_vectors,
    load_message_vectors,
    message_cases,
    message_context,
    run_error_case,
    run_prelude,
    snake_case,
)

MESSAGE_FILES = load_message_vectors()
ERROR_FILES = load_error_vectors()
MESSAGE_CASES = message_cases(MESSAGE_FILES)
ERROR_CASES = error_cases(ERROR_FILES)


def _chunk_vectors() -> list[frproto.Chunk]:
    for vectors in MESSAGE_FILES:
        if vectors.message == "Chunk":
            return [_as_chunk(case.message()) for case in vectors.cases]
    return []


def _as_chunk(message: frproto.Message) -> frproto.Chunk:
    assert isinstance(message, frproto.Chunk)
    return message


CHUNKS = _chunk_vectors()


def _id(pair: tuple[MessageVectors | ErrorVectors, MessageCase | ErrorCase]) -> str:
    vectors, case = pair
    kind = vectors.message if isinstance(vectors, MessageVectors) else vectors.error
    return f"{kind}-{case.name}"


def _as_dict(event: object) -> object:
    """Events compared through their JSON form (a Chunk holds views; its flags may differ)."""
    if isinstance(event, frproto.Message):
        return frproto.jsonable.message_to_dict(event)
    return event


def _leaves(cls: type[RemoteProtocolError]) -> set[type[RemoteProtocolError]]:
    subclasses = cls.__subclasses__()
    if not subclasses:
        return {cls}
    found: set[type[RemoteProtocolError]] = set()
    for sub in subclasses:
        found |= _leaves(sub)
    return found


# -- The files ----------------------------------------------------------------------------------


def test_vectors_were_found() -> None:
    assert len(MESSAGE_FILES) >= len(frproto.codec.MESSAGE_CLASSES)
    assert ERROR_FILES
    assert CHUNKS


def test_every_message_class_has_a_file() -> None:
    have = {vectors.message for vectors in MESSAGE_FILES}
    want = {cls.__name__ for cls in frproto.codec.MESSAGE_CLASSES.values()}
    assert want <= have, f"message classes without vectors: {sorted(want - have)}"


def test_every_remote_error_leaf_has_a_file() -> None:
    have = {vectors.error for vectors in ERROR_FILES}
    leaves = {cls for cls in _leaves(RemoteProtocolError) if cls.__module__ == "frproto._errors"}
    want = {cls.__name__ for cls in leaves}
    assert len(want) >= 14
    assert want <= have, f"error classes without vectors: {sorted(want - have)}"


@pytest.mark.parametrize("vectors", MESSAGE_FILES, ids=lambda v: v.message)
def test_message_file_header(vectors: MessageVectors) -> None:
    cls = vectors.message_class
    assert cls.__name__ == vectors.message
    assert (VECTORS_DIR / "messages" / f"{snake_case(vectors.message)}.json").is_file()
    assert len(vectors.cases) >= 2
    names = [case.name for case in vectors.cases]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("vectors", ERROR_FILES, ids=lambda v: v.error)
def test_error_file_header(vectors: ErrorVectors) -> None:
    cls = vectors.error_class
    assert cls.__name__ == vectors.error
    assert int(cls.code) == vectors.code
    assert cls.code.name == vectors.code_name
    assert (VECTORS_DIR / "errors" / f"{snake_case(vectors.error)}.json").is_file()
    assert vectors.cases
    names = [case.name for case in vectors.cases]
    assert len(set(names)) == len(names)


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(VECTORS_DIR / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_mode_detects_drift(tmp_path: Path) -> None:
    for sub in ("messages", "errors"):
        shutil.copytree(VECTORS_DIR / sub, tmp_path / sub)
    script = str(VECTORS_DIR / "generate.py")

    def check() -> int:
        command = [sys.executable, script, "--check", "--dir", str(tmp_path)]
        return subprocess.run(command, capture_output=True, timeout=60, check=False).returncode

    assert check() == 0
    target = tmp_path / "messages" / "keepalive.json"
    target.write_text(target.read_text(encoding="utf-8").replace('"token"', '"tokn"'))
    assert check() == 1
    target.unlink()
    assert check() == 1
    shutil.copy(VECTORS_DIR / "messages" / "keepalive.json", target)
    (tmp_path / "errors" / "stale.json").write_text("{}\n")
    assert check() == 1


def test_loader_is_lossless() -> None:
    for mv in MESSAGE_FILES:
        path = VECTORS_DIR / "messages" / mv.file_name
        assert dump_json(mv.to_json()) == path.read_text(encoding="utf-8")
    for ev in ERROR_FILES:
        path = VECTORS_DIR / "errors" / ev.file_name
        assert dump_json(ev.to_json()) == path.read_text(encoding="utf-8")


def test_all_frames_for_a_corpus() -> None:
    frames = all_frames()
    assert frames == sorted(set(frames))
    assert all(isinstance(f, bytes) for f in frames)
    assert {case.frame for _, case in MESSAGE_CASES} <= set(frames)
    assert {case.input_bytes for _, case in ERROR_CASES} <= set(frames)


# -- Message vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("vectors", "case"), MESSAGE_CASES, ids=list(map(_id, MESSAGE_CASES)))
def test_message_round_trip(vectors: MessageVectors, case: MessageCase) -> None:
    built = case.message()
    decoded = frproto.codec.decode_frame(case.frame)
    assert type(built).__name__ == vectors.message
    assert int(built.TAG) == vectors.tag
    if isinstance(built, frproto.Chunk):
        assert isinstance(decoded, frproto.Chunk)
        assert frproto.jsonable.message_to_dict(decoded) == frproto.jsonable.message_to_dict(built)
    else:
        assert decoded == built
    assert frproto.codec.encode_frame(built).hex() == case.hex
    assert isinstance(decoded, frproto.Message)
    assert frproto.jsonable.message_to_dict(decoded) == case.fields


@pytest.mark.parametrize(("vectors", "case"), MESSAGE_CASES, ids=list(map(_id, MESSAGE_CASES)))
def test_message_in_context(vectors: MessageVectors, case: MessageCase) -> None:
    message = case.message()
    receiver, prelude = message_context(message, CHUNKS)
    results: list[list[Any]] = []
    for byte_at_a_time in (False, True):
        conn = Connection(receiver)
        run_prelude(conn, prelude)
        result = feed(conn, case.frame, eof=False, byte_at_a_time=byte_at_a_time)
        assert result.error is None, f"{vectors.message} {case.name}: {result.error!r}"
        assert conn.state is not State.ERROR
        results.append([_as_dict(event) for event in result.events])
    whole, bytewise = results
    assert whole == bytewise
    assert whole == [case.fields]


# -- Error vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("vectors", "case"), ERROR_CASES, ids=list(map(_id, ERROR_CASES)))
def test_error_vector(vectors: ErrorVectors, case: ErrorCase) -> None:
    cls = vectors.error_class
    conn, whole = run_error_case(case)
    exc = whole.error
    assert exc is not None, f"no error; events {whole.events!r}"
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert exc.code == vectors.code
    assert frproto.Error.from_exception(exc).code == vectors.code
    assert len(whole.events) == case.events_before_error
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR

    conn, bytewise = run_error_case(case, byte_at_a_time=True)
    assert type(bytewise.error) is cls, repr(bytewise.error)
    assert [_as_dict(e) for e in bytewise.events] == [_as_dict(e) for e in whole.events]
    assert conn.state is State.ERROR
