"""Decompression in pieces (the restore's hot path): the pieces are the stream, and damage is still refused."""

from __future__ import annotations

import random

import pytest

from engram_recovery.core.artifact.compression import (
    ZSTD_DECOMPRESS_INPUT,
    Compression,
    compressor,
    decompressor,
)
from engram_recovery.core.errors import IntegrityError


def dump_like(size: int) -> bytes:
    """Text that compresses about as pg_dump's does (hex of random bytes, some repetition)."""
    rng = random.Random(7)
    rows = [rng.randbytes(rng.randrange(16, 400)).hex().encode() + b"\t2026-01-01\n" for _ in range(200)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(rows)
    return bytes(out[:size])


def packed(kind: Compression, data: bytes) -> bytes:
    codec = compressor(kind)
    return codec.update(data) + codec.finish()


@pytest.mark.parametrize("kind", ["zstd", "gzip", "none"])
def test_the_pieces_of_a_stream_larger_than_one_input_slice_are_the_stream(kind: Compression) -> None:
    data = dump_like(3 * ZSTD_DECOMPRESS_INPUT + 12345)
    stored = packed(kind, data)
    codec = decompressor(kind)
    pieces = [p for at in range(0, len(stored), 3 << 20) for p in codec.pieces(stored[at : at + (3 << 20)])]
    assert b"".join(pieces) + codec.finish() == data
    assert all(pieces)  # nothing empty is passed on


def test_a_zstd_stream_fed_more_than_one_input_slice_at_once_comes_back_in_several_pieces() -> None:
    stored = packed("zstd", dump_like(4 * ZSTD_DECOMPRESS_INPUT))
    assert len(stored) > ZSTD_DECOMPRESS_INPUT  # else the stream is a single slice
    assert len(decompressor("zstd").pieces(stored)) > 1


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_a_truncated_stream_read_in_pieces_is_refused_at_its_end(kind: Compression) -> None:
    stored = packed(kind, dump_like(2 * ZSTD_DECOMPRESS_INPUT))
    codec = decompressor(kind)
    codec.pieces(stored[: len(stored) - 100])
    with pytest.raises(IntegrityError, match="ends early"):
        codec.finish()


def test_a_damaged_zstd_stream_read_in_pieces_is_refused() -> None:
    stored = bytearray(packed("zstd", dump_like(2 * ZSTD_DECOMPRESS_INPUT)))
    stored[len(stored) // 2] ^= 0x40
    codec = decompressor("zstd")
    with pytest.raises(IntegrityError, match="damaged"):
        codec.pieces(bytes(stored))
        codec.finish()
