"""One layering of a stored artifact, in both directions: Encoder (compress, then encrypt) when a
backup writes, Decoder (decrypt, then decompress) when a restore, a drill, a plan or the decrypt
command reads."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import anyio.to_thread

from ..errors import ConfigurationError
from . import encryption as backup_crypto
from .compression import Codec, Compression, Data, compressor, decompressor, sniff
from .encryption import Encryptor

ENCRYPTED_SUFFIX = ".enc"
_SNIFF = 4


class Encoder:
    """Writing: compression then (optionally) encryption of one stream."""

    def __init__(self, compression: Compression, key: bytes | None, level: int | None = None) -> None:
        self._codec: Codec = compressor(compression, level)
        self._key = key
        self._encryptor = Encryptor(key) if key is not None else None
        self.plain_bytes = 0

    def update(self, data: Data) -> bytes:
        self.plain_bytes += len(data)
        out = self._codec.update(data)
        return self._encryptor.update(out) if self._encryptor is not None else out

    def finish(self) -> bytes:
        out = self._codec.finish()
        if self._encryptor is None:
            return out
        return self._encryptor.update(out) + self._encryptor.finish()

    def read_back_check(self) -> Authenticate | None:
        """What proves the stored bytes, re-read, are the ones this wrote: with encryption, the records'
        own tags (None without: the store hashes them again)."""
        return Authenticate(self._key) if self._key is not None else None


class Authenticate:
    """Re-read encrypted bytes, authenticated record by record and then dropped: a StreamCheck.

    Every record's AES-GCM tag covers its bytes, its index and the file's header, and the last
    record is marked: a byte changed, a record moved, dropped or cut short fails here.
    """

    def __init__(self, key: bytes) -> None:
        self._decryptor = backup_crypto.Decryptor(key)

    def update(self, data: memoryview) -> None:
        self._decryptor.update(data)

    def finish(self) -> None:
        self._decryptor.finish()


class Decoder:
    """Reading: feed stored bytes, get the plain dump bytes back; `finish` raises if anything was cut or altered.

    Without `compression`/`encrypted` the layers are detected from the bytes (our header, zstd's and
    gzip's magic: the decrypt command needs no manifest); given them, as a manifest records them, they
    are trusted.
    """

    def __init__(
        self, key: bytes | None, *, compression: Compression | None = None, encrypted: bool | None = None,
        name: str = "this artifact",
    ) -> None:
        self._key = key
        self._name = name
        self._head = bytearray()
        self._decrypt: backup_crypto.Decryptor | None = None
        self._decided = False
        self._plain_head = bytearray()
        self._codec: Codec | None = None
        self.encrypted = False
        if encrypted is not None:
            self._decided = True
            if encrypted:
                self._start_decrypting()
        if compression is not None:
            self._codec = decompressor(compression)

    def _start_decrypting(self) -> None:
        if self._key is None:
            raise ConfigurationError(
                f"{self._name} is encrypted and no backup key is configured",
                "set ENGRAM_RECOVERY_BACKUP_KEY or ENGRAM_RECOVERY_BACKUP_KEY_FILE to the backup key",
            )
        self.encrypted = True
        self._decrypt = backup_crypto.Decryptor(self._key)

    def update(self, data: bytes) -> bytes:
        if not self._decided:
            self._head += data
            if len(self._head) < len(backup_crypto.MAGIC):
                return b""
            self._decided = True
            data, self._head = bytes(self._head), bytearray()
            if data.startswith(backup_crypto.MAGIC):
                self._start_decrypting()
        plain = self._decrypt.update(data) if self._decrypt is not None else data
        return self._decompress(plain)

    def _decompress(self, plain: bytes | bytearray) -> bytes:
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


async def decode_stream(chunks: AsyncIterable[bytes], decoder: Decoder) -> AsyncIterator[bytes]:
    """The plain bytes of a stored stream, chunk by chunk (the work on a worker thread). The stream is
    closed here even when decoding fails half-way (a damaged artifact): its file or connection goes now."""
    try:
        async for chunk in chunks:
            out = await anyio.to_thread.run_sync(decoder.update, chunk)
            if out:
                yield out
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    tail = decoder.finish()
    if tail:
        yield tail
