"""Client-side encryption of backup artifacts: AES-256-GCM in authenticated chunks.

The format (docs/backup-format.md is the reference):

    header  = MAGIC "ENGRBAK" | version 0x01 | algorithm 0x01 | chunk size u32 BE | key id (8) | salt (16)
    record  = flags (1) | plaintext length u32 BE | nonce (12) | ciphertext || tag (16)

The file key is HKDF-SHA256(backup key, salt, "engram-recovery backup file v1"),
so no two files share a key even when nonces are random. Each record's
associated data is the whole header, the record's index (u64 BE), its flags and
its length, so a record moved, dropped, repeated or taken from another file
fails to decrypt, and flag bit 0 marks the last record: a file cut after any
record is detected as truncated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigurationError, IntegrityError
from ..settings import Settings

MAGIC = b"ENGRBAK"
VERSION = 1
ALGORITHM_AES_256_GCM = 1
FORMAT_NAME = "aes-256-gcm-chunked@1"
CHUNK_SIZE = 1 << 20
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(">7sBBI8s16s")
HEADER_SIZE = _HEADER.size
_RECORD = struct.Struct(">BI")
RECORD_OVERHEAD = _RECORD.size + NONCE_SIZE + TAG_SIZE
LAST = 0x01
_KDF_INFO = b"engram-recovery backup file v1"
_KEY_ID_LABEL = b"engram-recovery backup key id v1"
# A larger record could only come from a damaged or hostile file; refuse before allocating it.
MAX_CHUNK = 16 << 20


def parse_key(text: str) -> bytes:
    """ENGRAM_RECOVERY_BACKUP_KEY: base64 of exactly 32 bytes (`openssl rand -base64 32`)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigurationError(
            "ENGRAM_RECOVERY_BACKUP_KEY is not the base64 of exactly 32 bytes",
            "generate one with `openssl rand -base64 32`, keep it with the master key, and set "
            "ENGRAM_RECOVERY_BACKUP_KEY or ENGRAM_RECOVERY_BACKUP_KEY_FILE",
        )
    return key


def key_id(key: bytes) -> bytes:
    """8 bytes that name the key without revealing it (SHA-256 of a label and the key)."""
    return hashlib.sha256(_KEY_ID_LABEL + key).digest()[:8]


def backup_key(settings: Settings) -> bytes | None:
    """ENGRAM_RECOVERY_BACKUP_KEY, decoded here and nowhere else (None: not configured; malformed:
    ConfigurationError, at the moment of use)."""
    return parse_key(settings.backup_key.get_secret_value()) if settings.backup_key else None


def fingerprint(key: bytes) -> str:
    return key_id(key).hex()


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_KDF_INFO).derive(key)
    return AESGCM(derived)


def _aad(header: bytes, index: int, flags: int, length: int) -> bytes:
    return header + struct.pack(">QBI", index, flags, length)


class Encryptor:
    """Feed plaintext with `update`, then `finish`; each returns the ciphertext bytes ready to store."""

    def __init__(self, key: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        self._chunk = chunk_size
        self.header = _HEADER.pack(MAGIC, VERSION, ALGORITHM_AES_256_GCM, chunk_size, key_id(key), os.urandom(16))
        self._aead = _file_key(key, self.header[-16:])
        self._index = 0
        self._pending = bytearray()
        self._started = False
        self.plain_size = 0

    def _record(self, data: bytes | memoryview, flags: int, out: list[bytes]) -> None:
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, data, _aad(self.header, self._index, flags, len(data)))
        self._index += 1
        out += (_RECORD.pack(flags, len(data)) + nonce, sealed)

    def update(self, data: bytes) -> bytes:
        self.plain_size += len(data)
        self._pending += data
        out: list[bytes] = []
        if not self._started:
            out.append(self.header)
            self._started = True
        # Records are sealed straight from views of the pending buffer (no copies); at least one byte
        # is kept back, because the last record must be the one `finish` writes.
        offset = 0
        with memoryview(self._pending) as view:
            while len(self._pending) - offset > self._chunk:
                self._record(view[offset : offset + self._chunk], 0, out)
                offset += self._chunk
        del self._pending[:offset]
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not self._started:
            out.append(self.header)
            self._started = True
        self._record(bytes(self._pending), LAST, out)
        self._pending.clear()
        return b"".join(out)


@dataclass(frozen=True)
class Header:
    version: int
    chunk_size: int
    key_id: bytes


def read_header(data: bytes) -> Header:
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise IntegrityError(
            "this is not an engram-recovery encrypted file (its header is missing or damaged)",
            "pass the .enc artifact of a backup, or restore the artifact from another copy",
        )
    _magic, version, algorithm, chunk_size, kid, _salt = _HEADER.unpack(data[:HEADER_SIZE])
    if version != VERSION or algorithm != ALGORITHM_AES_256_GCM:
        raise IntegrityError(
            f"encrypted file format version {version}/algorithm {algorithm} is not one this tool reads",
            "use the engram-recovery release that wrote the backup (or a newer one)",
        )
    if not 0 < chunk_size <= MAX_CHUNK:
        raise IntegrityError("the encrypted file's header is damaged (chunk size)", "use another copy")
    return Header(version=version, chunk_size=chunk_size, key_id=kid)


class Decryptor:
    """Feed stored bytes with `update` (returns plaintext), then `finish` (raises if the file was cut short).

    Records are read in place from the bytes given (memoryviews, no copies) and decrypted straight into
    one preallocated output per call; only a header or record split across two calls is copied, into
    `_pending`, and only up to its own end.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._pending = bytearray()  # the start of a header or record that the next call completes
        self._header: bytes | None = None
        self._aead: AESGCM | None = None
        self._index = 0
        self._done = False
        self._max = MAX_CHUNK

    def update(self, data: bytes | bytearray | memoryview) -> bytearray:
        records: list[tuple[memoryview, int, int, int]] = []  # (record, flags, length, index), in order
        with memoryview(data) as view:
            pos = 0
            while self._pending and pos < len(view):
                size = self._unit_size(self._pending)
                target = size if size is not None else _RECORD.size
                take = min(target - len(self._pending), len(view) - pos)
                self._pending += view[pos : pos + take]
                pos += take
                if size is not None and len(self._pending) == size:
                    unit, self._pending = self._pending, bytearray()
                    self._take(memoryview(unit), records)
            while pos < len(view):
                size = self._unit_size(view[pos:])
                if size is None or len(view) - pos < size:
                    self._pending += view[pos:]
                    break
                self._take(view[pos : pos + size], records)
                pos += size
            return self._decrypt(records)

    def _unit_size(self, start: bytes | bytearray | memoryview) -> int | None:
        """The size of the header or record `start` begins (None: its length is not in yet); raises if damaged."""
        if self._header is None:
            return HEADER_SIZE
        if len(start) < _RECORD.size:
            return None
        if self._done:
            raise IntegrityError("data follows the last record: the file was altered", "use another copy")
        flags, length = _RECORD.unpack_from(start)
        length = int(length)
        if length > self._max or flags & ~LAST:
            raise IntegrityError(
                f"record {self._index} of the encrypted file is damaged",
                "the artifact was altered; use another copy",
            )
        return RECORD_OVERHEAD + length

    def _take(self, unit: memoryview, records: list[tuple[memoryview, int, int, int]]) -> None:
        """A whole header (checked and keyed at once) or record (queued for `_decrypt`)."""
        if self._header is None:
            header = read_header(bytes(unit))
            if header.key_id != key_id(self._key):
                raise IntegrityError(
                    f"this file was encrypted with another backup key (key id {header.key_id.hex()}, "
                    f"the configured key is {fingerprint(self._key)})",
                    "set ENGRAM_RECOVERY_BACKUP_KEY (or _FILE) to the key that was in use when the backup was made",
                )
            self._header = bytes(unit)
            self._aead = _file_key(self._key, self._header[-16:])
            self._max = header.chunk_size
            return
        flags, length = _RECORD.unpack_from(unit)
        records.append((unit, flags, length, self._index))
        self._index += 1
        self._done = bool(flags & LAST)

    def _decrypt(self, records: list[tuple[memoryview, int, int, int]]) -> bytearray:
        out = bytearray(sum(length for _unit, _flags, length, _index in records))
        if not records:
            return out
        assert self._aead is not None and self._header is not None
        at = 0
        with memoryview(out) as into:
            for unit, flags, length, index in records:
                nonce, sealed = unit[_RECORD.size : _RECORD.size + NONCE_SIZE], unit[_RECORD.size + NONCE_SIZE :]
                try:
                    self._aead.decrypt_into(nonce, sealed, _aad(self._header, index, flags, length),
                                            into[at : at + length])  # fmt: skip
                except InvalidTag as exc:
                    raise IntegrityError(
                        f"record {index} of the encrypted file failed authentication: the artifact was altered "
                        "or its records reordered",
                        "do not restore from this artifact; use another copy or another recovery point",
                    ) from exc
                at += length
        return out

    def finish(self) -> None:
        if self._header is None or not self._done or self._pending:
            raise IntegrityError(
                "the encrypted file ends before its last record: it was truncated",
                "the copy is incomplete; use another copy or another recovery point",
            )
