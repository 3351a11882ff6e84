"""Turn a stored artifact back into what pg_dump wrote: decrypt (if encrypted), then decompress.

This is what `engram-recovery decrypt` runs, so a person can always get a stock
pg_restore-able file. It detects the layers from the bytes themselves (our
encryption header, zstd's and gzip's magic numbers), so it needs no manifest;
given one, it also checks the stored bytes' SHA-256 against it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread

from ..errors import ConfigurationError, IntegrityError
from . import encryption as backup_crypto
from .compression import Codec, decompressor, sniff

_SNIFF = 4


class Extractor:
    """Feed stored bytes; get the plain dump bytes back. `finish` raises if anything was cut or altered."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key
        self._head = bytearray()
        self._decrypt: backup_crypto.Decryptor | None = None
        self._decided = False
        self._plain_head = bytearray()
        self._codec: Codec | None = None
        self.encrypted = False

    def update(self, data: bytes) -> bytes:
        if not self._decided:
            self._head += data
            if len(self._head) < len(backup_crypto.MAGIC):
                return b""
            self._decided = True
            data, self._head = bytes(self._head), bytearray()
            if data.startswith(backup_crypto.MAGIC):
                if self._key is None:
                    raise ConfigurationError(
                        "this artifact is encrypted and no backup key is configured",
                        "set ENGRAM_RECOVERY_BACKUP_KEY or ENGRAM_RECOVERY_BACKUP_KEY_FILE to the backup key",
                    )
                self.encrypted = True
                self._decrypt = backup_crypto.Decryptor(self._key)
        plain = self._decrypt.update(data) if self._decrypt is not None else data
        return self._decompress(plain)

    def _decompress(self, plain: bytes) -> bytes:
        if self._codec is None:
            self._plain_head += plain
            if len(self._plain_head) < _SNIFF:
                return b""
            self._codec = decompressor(sniff(bytes(self._plain_head)))
            plain, self._plain_head = bytes(self._plain_head), bytearray()
        return self._codec.update(plain)

    def finish(self) -> bytes:
        out = b""
        if not self._decided:  # a file shorter than our magic: not encrypted
            self._decided = True
            out += self._decompress(bytes(self._head))
        if self._decrypt is not None:
            self._decrypt.finish()
        if self._codec is None:
            # Fewer than 4 plain bytes in all: nothing to sniff, so nothing was compressed.
            out += bytes(self._plain_head)
            return out
        return out + self._codec.finish()


def key_from_environment(env: Mapping[str, str]) -> bytes | None:
    """The backup key from ENGRAM_RECOVERY_BACKUP_KEY or _FILE (never from an argument)."""
    value, path = env.get("ENGRAM_RECOVERY_BACKUP_KEY"), env.get("ENGRAM_RECOVERY_BACKUP_KEY_FILE")
    if value and path:
        raise ConfigurationError(
            "both ENGRAM_RECOVERY_BACKUP_KEY and ENGRAM_RECOVERY_BACKUP_KEY_FILE are set", "keep one of them"
        )
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"ENGRAM_RECOVERY_BACKUP_KEY_FILE names a file that cannot be read ({exc.strerror})",
                "point it at a readable file holding only the key",
            ) from exc
    return backup_crypto.parse_key(value) if value else None


@dataclass(frozen=True)
class Extracted:
    path: str
    stored_bytes: int
    plain_bytes: int
    encrypted: bool


async def extract(
    chunks: AsyncIterator[bytes], key: bytes | None, output: Path, expect_sha256: str | None = None
) -> Extracted:
    """Write the plain dump to `output` atomically: a damaged artifact leaves no output file at all."""
    extractor = Extractor(key)
    digest = hashlib.sha256()
    stored = plain = 0
    temp = output.with_name(f".{output.name}.partial-{secrets.token_hex(4)}")
    handle: BinaryIO = await anyio.to_thread.run_sync(temp.open, "wb")
    try:
        async for chunk in chunks:
            digest.update(chunk)
            stored += len(chunk)
            out = await anyio.to_thread.run_sync(extractor.update, chunk)
            plain += len(out)
            await anyio.to_thread.run_sync(handle.write, out)
        out = extractor.finish()
        plain += len(out)
        await anyio.to_thread.run_sync(handle.write, out)
        if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
            raise IntegrityError(
                f"the artifact's SHA-256 is {digest.hexdigest()}, the manifest recorded {expect_sha256}: it was "
                "altered after the backup",
                "do not restore from it; use another copy or another recovery point",
            )
        handle.close()
        await anyio.to_thread.run_sync(os.replace, temp, output)
    finally:
        handle.close()
        temp.unlink(missing_ok=True)
    return Extracted(str(output), stored, plain, extractor.encrypted)


def plain_name(name: str) -> str:
    """db.dump.zst.enc -> db.dump"""
    for suffix in (".enc", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name


async def file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    handle: BinaryIO = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, size):
            yield chunk
    finally:
        handle.close()
