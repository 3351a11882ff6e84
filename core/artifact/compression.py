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
    """No compression, either way."""

    def update(self, data: Data) -> bytes:
        return bytes(data)

    def pieces(self, data: Data) -> list[bytes]:
        return [bytes(data)]

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


class Decompressor(Protocol):
    def update(self, data: Data) -> bytes: ...

    def pieces(self, data: Data) -> list[bytes]:
        """As `update`, in the pieces the codec produced (no joining copy): for a caller that passes them on."""
        ...

    def finish(self) -> bytes: ...


# zstandard's decompressobj decompresses into a buffer of `write_size`, copies each full one into a bytes
# piece and joins the pieces (a second copy). Fed at most ZSTD_DECOMPRESS_INPUT at a time, the output of
# one call (~2 MiB for pg_dump's text) fits one piece, which is returned as it is. Output in pieces of a
# few MiB is also what the allocator reuses once a restore's loaders let go of it; 8 MiB pieces are
# mmap'd afresh each time: a restore holding 1 GiB of blocks spent 0.9 s more CPU on page faults and
# copies with 4 MiB inputs and 1 MiB pieces than with 1 MiB inputs and 8 MiB pieces (docs/benchmarks.md).
ZSTD_DECOMPRESS_PIECE = 8 << 20
ZSTD_DECOMPRESS_INPUT = 1 << 20


class _ZstdDecompressor:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj(write_size=ZSTD_DECOMPRESS_PIECE)

    def update(self, data: Data) -> bytes:
        return b"".join(self.pieces(data))  # one piece: returned as it is, no copy

    def pieces(self, data: Data) -> list[bytes]:
        out: list[bytes] = []
        step = ZSTD_DECOMPRESS_INPUT
        with memoryview(data) as view:
            for at in range(0, len(view), step):
                try:
                    piece: bytes = self._d.decompress(view[at : at + step])
                except zstandard.ZstdError as exc:
                    raise IntegrityError(f"the zstd stream is damaged: {exc}",
                                         "use another copy of the artifact") from exc  # fmt: skip
                if piece:
                    out.append(piece)
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

    def pieces(self, data: Data) -> list[bytes]:
        return [self.update(data)]

    def finish(self) -> bytes:
        if not self._d.eof:
            raise IntegrityError("the gzip stream ends early: the file was truncated", "use another copy")
        return self._d.flush()


def decompressor(kind: Compression) -> Decompressor:
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
