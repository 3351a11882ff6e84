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
from .codec import ENCRYPTED_SUFFIX, Decoder


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
    extractor = Decoder(key)
    digest = hashlib.sha256()
    stored = plain = 0
    temp = output.with_name(f".{output.name}.partial-{secrets.token_hex(4)}")
    handle: BinaryIO = await anyio.to_thread.run_sync(_private_file, temp)
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


def _private_file(path: Path) -> BinaryIO:
    """A new file only its owner can read: a decrypted dump holds users, tokens and wrapped keys in the clear."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def plain_name(name: str) -> str:
    """db.dump.zst.enc -> db.dump"""
    for suffix in (ENCRYPTED_SUFFIX, ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name


async def file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    handle: BinaryIO = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, size):
            yield chunk
    finally:
        handle.close()
