"""Streaming compression for backup artifacts: zstd by default, gzip for compatibility, or none.

pg_dump runs with -Z0 so nothing is compressed twice; we compress here, in the
pipeline, where zstd's low levels run at hundreds of MB/s. Engram's note and
attachment bodies are AES-GCM ciphertext (incompressible), but pg_dump writes
bytea as hex text, which zstd halves cheaply: a low level buys nearly all of
that and wastes no CPU trying to squeeze ciphertext (docs/benchmarks.md, run_backup).
"""

from __future__ import annotations

import zlib
from typing import Literal, Protocol

import zstandard

from ..errors import IntegrityError

Compression = Literal["zstd", "gzip", "none"]
ZSTD_LEVEL = 1
# pg_dump's text finds its matches within a few rows (repeated ids, timestamps, column layout), and most
# of a dump is hex of ciphertext that only the entropy stage halves: a 128 KiB window instead of level
# 1's 512 KiB, a 512-entry match table instead of 8192 and matches of 7 bytes or more cost 2% more
# output than level 1 and save 17% of zstd's CPU on the bench database (docs/benchmarks.md, run_backup).
ZSTD_TUNING = {"window_log": 17, "hash_log": 9, "min_match": 7}
GZIP_LEVEL = 6
SUFFIX: dict[Compression, str] = {"zstd": ".zst", "gzip": ".gz", "none": ""}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


Data = bytes | bytearray | memoryview


class Codec(Protocol):
    def update(self, data: Data) -> bytes: ...

    def finish(self) -> bytes: ...


class _Identity:
    def update(self, data: Data) -> bytes:
        return bytes(data)

    def finish(self) -> bytes:
        return b""


class _Zstd:
    def __init__(self, level: int) -> None:
        # Content size unknown (a stream): frames carry checksums so a damaged file is detected on decompression.
        tuned = ZSTD_TUNING if level == ZSTD_LEVEL else {}
        params = zstandard.ZstdCompressionParameters.from_level(level, write_checksum=True, **tuned)
        self._c = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def update(self, data: Data) -> bytes:
        out: bytes = self._c.compress(data)
        return out

    def finish(self) -> bytes:
        out: bytes = self._c.flush()
        return out


class _Gzip:
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def update(self, data: Data) -> bytes:
        return self._c.compress(data)

    def finish(self) -> bytes:
        return self._c.flush()


def compressor(kind: Compression, level: int | None = None) -> Codec:
    if kind == "zstd":
        return _Zstd(ZSTD_LEVEL if level is None else level)
    if kind == "gzip":
        return _Gzip(GZIP_LEVEL if level is None else level)
    return _Identity()


# zstandard's decompressobj gathers its output in pieces of `write_size` and joins them: its 128 KiB default
# makes a 1 MiB input ~16 pieces and a join; 1 MiB pieces decompress ~1.4x faster (restore's hot path).
ZSTD_DECOMPRESS_PIECE = 1 << 20


class _ZstdDecompressor:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj(write_size=ZSTD_DECOMPRESS_PIECE)

    def update(self, data: Data) -> bytes:
        try:
            out: bytes = self._d.decompress(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"the zstd stream is damaged: {exc}", "use another copy of the artifact") from exc
        return out

    def finish(self) -> bytes:
        if not self._d.eof:
            raise IntegrityError("the zstd stream ends early: the file was truncated", "use another copy")
        return b""


class _GzipDecompressor:
    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def update(self, data: Data) -> bytes:
        try:
            return self._d.decompress(data)
        except zlib.error as exc:
            raise IntegrityError(f"the gzip stream is damaged: {exc}", "use another copy of the artifact") from exc

    def finish(self) -> bytes:
        if not self._d.eof:
            raise IntegrityError("the gzip stream ends early: the file was truncated", "use another copy")
        return self._d.flush()


def decompressor(kind: Compression) -> Codec:
    if kind == "zstd":
        return _ZstdDecompressor()
    if kind == "gzip":
        return _GzipDecompressor()
    return _Identity()


def sniff(head: bytes) -> Compression:
    """Which compression a stream starts with (for `decrypt` given a bare file)."""
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"
