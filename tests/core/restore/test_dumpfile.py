"""The splitter's framing on synthetic blocks (a real dump's cut is in test_database.py)."""

from __future__ import annotations

import os

import pytest

from engram_recovery.core.errors import IntegrityError
from engram_recovery.core.restore.dumpfile import Head, Splitter


def _int(value: int) -> bytes:  # pg_dump's int: a sign byte, then int_size (here 4) bytes little-endian
    return bytes([value < 0]) + abs(value).to_bytes(4, "little")


def _block(dump_id: int, rows: list[bytes]) -> bytes:
    return b"\x01" + _int(dump_id) + b"".join(_int(len(r)) + r for r in rows) + _int(0)


HEAD = Head(size=0, int_size=4, data_ids=(1, 2), entries={})


def test_rows_are_cut_into_their_blocks_whatever_the_chunking() -> None:
    stream = _block(1, [os.urandom(n) for n in (1, 4000, 70_000, 3)]) + _block(2, [os.urandom(9000)] * 50)
    for size in (1, 2, 5, 6, 997, 4096, len(stream)):
        splitter = Splitter(HEAD)
        fed = sum(splitter.feed(stream[at : at + size]) for at in range(0, len(stream), size))
        splitter.finish()
        assert fed == len(stream)
        assert [b.dump_id for b in splitter.blocks] == [1, 2] and all(b.complete for b in splitter.blocks)
        assert b"".join(p for b in splitter.blocks for p in b.parts) == stream


def test_a_chunk_that_is_all_one_blocks_is_kept_without_a_copy() -> None:
    rows = [os.urandom(3000) for _ in range(40)]
    stream = _block(1, rows)
    splitter = Splitter(HEAD)
    middle = stream[10_000:60_000]  # rows only, cut mid-row at both ends
    splitter.feed(stream[:10_000])
    splitter.feed(middle)
    assert splitter.blocks[0].parts[-1] is middle


def test_a_negative_chunk_length_is_refused() -> None:
    with pytest.raises(IntegrityError, match="negative chunk length"):
        Splitter(HEAD).feed(b"\x01" + _int(1) + _int(-5) + b"x" * 10)
