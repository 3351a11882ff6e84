"""Engram's cryptographic formats, in both directions, as pure functions.

The product uses the reading half to prove offline that a master key opens a
backup (canary, wrapped DEKs, row ciphertexts, content hashes) before the app is
allowed to boot against it; the test bed uses the writing half to produce data
that Engram itself could read.

Every format below was read from Engram 0.18.1 (github.com/engram-app/Engram):

* ``lib/engram/crypto/key_provider/local.ex``: the master-key wrap of a DEK.
  v2 is ``0x02 0x01 | nonce(12) | ct||tag``, 62 bytes, AAD ``"dek:v1:<user_id>"``;
  v1 is ``0x01 0x01 | ...`` with empty AAD; legacy is 60 bytes ``nonce | ct||tag``.
* ``lib/engram/crypto/key_provider.ex`` (``identify_from_blob``): a blob whose
  first byte is 0xAA belongs to AWS KMS, whatever follows (KMS writes ``0xAA 0x01``).
* ``lib/engram/crypto/boot_canary.ex``: the canary is wrapped for user id 0 and
  checked against SHA-256 of the plaintext DEK.
* ``lib/engram/crypto.ex`` (``aad_for_row``): a row's AAD is
  ``table 0x00 column 0x00 uuid(16 raw bytes)`` when the row's ``dek_version >= 2``.
  The column part is the *logical* field name (``"content"``, ``"title"``,
  ``"tags"``, ``"path"``, ``"folder"``, ``"name"``), never the storage column
  ``content_ciphertext``: Engram calls ``aad_for_row(:notes, :content, id)``.
* ``lib/engram/crypto.ex`` (``dek_content_hash_key``, ``hmac_content_hash``,
  ``dek_filter_key``, ``hmac_field``): HMAC-SHA256 subkeys of the DEK.
* ``lib/engram/notes.ex`` (``phase_b_keyword_for``): tags are encrypted as the
  Erlang external term format of a list of binaries (``:erlang.term_to_binary``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
ROW_VERSION_AAD_BOUND = 2
CANARY_USER_ID = "0"

_WRAP_V2 = b"\x02\x01"
_WRAP_V1 = b"\x01\x01"
_KMS_TAG = 0xAA
_HEADERED_WRAP_BYTES = 2 + NONCE_BYTES + KEY_BYTES + TAG_BYTES
_LEGACY_WRAP_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
_CONTENT_HASH_INFO = b"engram-content-hash-v1"
_FILTER_KEY_INFO = b"engram-filter-v1"
_FINGERPRINT_PREFIX = b"engram-recovery-fingerprint:"

WrapFormat = Literal["v2", "v1", "legacy", "kms", "unknown"]
CanaryVerdict = Literal["match", "wrong_key", "kms", "sha_mismatch", "malformed"]
ContentHashVerdict = Literal["match", "mismatch", "legacy", "missing"]


class EngramCryptoError(ValueError):
    """Something about Engram's encrypted data or keys is not what it should be."""


class InvalidMasterKey(EngramCryptoError):
    """The configured master key is not base64 of exactly 32 bytes."""


class MalformedBlob(EngramCryptoError):
    """Bytes that do not have the shape of any format Engram writes."""


class DecryptFailed(EngramCryptoError):
    """AES-GCM refused the ciphertext: wrong key, wrong AAD, or tampered bytes."""


class WrongKey(DecryptFailed):
    """A wrapped DEK does not open with this master key."""


class KmsWrapped(EngramCryptoError):
    """The DEK is wrapped by AWS KMS; a local master key cannot open it."""


def decode_master_key(b64: str) -> bytes:
    """Decode ``ENCRYPTION_MASTER_KEY`` the way Engram does (strict base64, 32 bytes)."""
    # Surrounding whitespace only ever comes from files and shells, never from the key.
    text = b64.strip()
    if not text:
        raise InvalidMasterKey("the master key is empty")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII input, are both ValueErrors
        raise InvalidMasterKey("the master key is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise InvalidMasterKey(f"the master key decodes to {len(raw)} bytes; Engram needs exactly {KEY_BYTES}")
    return raw


def encode_master_key(key: bytes) -> str:
    """The form Engram expects in ``ENCRYPTION_MASTER_KEY``."""
    _require_key(key, "master key")
    return base64.b64encode(key).decode("ascii")


def key_fingerprint(key: bytes) -> str:
    """A short name for a key that is safe to print and store beside backups."""
    # Domain-separated so the fingerprint can never equal a hash Engram itself stores.
    return hashlib.sha256(_FINGERPRINT_PREFIX + key).hexdigest()[:12]


def wrap_format(blob: bytes) -> WrapFormat:
    """Which of Engram's wrap formats ``blob`` has, judged from its header and size."""
    # Same precedence as Engram's identify_from_blob: the KMS tag wins over length.
    if blob[:1] == bytes([_KMS_TAG]):
        return "kms"
    if len(blob) == _HEADERED_WRAP_BYTES and blob[:2] == _WRAP_V2:
        return "v2"
    if len(blob) == _HEADERED_WRAP_BYTES and blob[:2] == _WRAP_V1:
        return "v1"
    if len(blob) == _LEGACY_WRAP_BYTES:
        return "legacy"
    return "unknown"


def dek_aad(user_id: str | uuid.UUID) -> bytes:
    return b"dek:v1:" + str(user_id).encode("ascii")


def wrap_dek(master_key: bytes, dek: bytes, user_id: str | uuid.UUID, version: Literal[0, 1, 2] = 2) -> bytes:
    """Wrap ``dek`` as Engram's local key provider does (2 = current, 1 = no AAD, 0 = legacy)."""
    _require_key(master_key, "master key")
    _require_key(dek, "DEK")
    nonce = os.urandom(NONCE_BYTES)
    aesgcm = AESGCM(master_key)
    if version == 2:
        return _WRAP_V2 + nonce + aesgcm.encrypt(nonce, dek, dek_aad(user_id))
    if version == 1:
        return _WRAP_V1 + nonce + aesgcm.encrypt(nonce, dek, b"")
    return nonce + aesgcm.encrypt(nonce, dek, b"")


def unwrap_dek(master_key: bytes, blob: bytes, user_id: str | uuid.UUID) -> bytes:
    """Open a wrapped DEK with the master key alone (no PREVIOUS fallback, like the boot canary)."""
    _require_key(master_key, "master key")
    fmt = wrap_format(blob)
    if fmt == "kms":
        raise KmsWrapped("this DEK is wrapped by AWS KMS (blob starts 0xAA); a local master key cannot open it")
    if fmt == "unknown":
        raise MalformedBlob(f"a wrapped DEK of {len(blob)} bytes matches none of Engram's wrap formats")
    if fmt == "legacy":
        nonce, sealed, aad = blob[:NONCE_BYTES], blob[NONCE_BYTES:], b""
    else:
        nonce, sealed = blob[2 : 2 + NONCE_BYTES], blob[2 + NONCE_BYTES :]
        aad = dek_aad(user_id) if fmt == "v2" else b""
    try:
        return AESGCM(master_key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise WrongKey(
            f"the {fmt} wrapped DEK does not open with this master key "
            "(a different key, or a blob copied from another user)"
        ) from None


def make_canary(master_key: bytes) -> tuple[bytes, bytes]:
    """A fresh ``(wrapped_dek, dek_sha256)`` pair, as Engram provisions ``system_canaries``."""
    dek = os.urandom(KEY_BYTES)
    return wrap_dek(master_key, dek, CANARY_USER_ID), hashlib.sha256(dek).digest()


def check_canary(master_key: bytes, wrapped_dek: bytes, dek_sha256: bytes) -> CanaryVerdict:
    """What Engram's boot canary would conclude with this master key."""
    try:
        dek = unwrap_dek(master_key, wrapped_dek, CANARY_USER_ID)
    except KmsWrapped:
        return "kms"
    except WrongKey:
        return "wrong_key"
    except MalformedBlob:
        return "malformed"
    if hmac.compare_digest(hashlib.sha256(dek).digest(), dek_sha256):
        return "match"
    return "sha_mismatch"


def row_aad(table: str, column: str, row_id: uuid.UUID, dek_version: int) -> bytes:
    """The AAD of one encrypted field; rows before AAD binding (dek_version < 2) used none."""
    if dek_version < ROW_VERSION_AAD_BOUND:
        return b""
    return table.encode("ascii") + b"\x00" + column.encode("ascii") + b"\x00" + row_id.bytes


@dataclass(frozen=True)
class RowField:
    """Where an encrypted field lives: its AAD (from dek_version 2) binds the ciphertext to exactly this place."""

    table: str
    column: str
    row_id: uuid.UUID
    dek_version: int

    @property
    def aad(self) -> bytes:
        return row_aad(self.table, self.column, self.row_id, self.dek_version)


class FieldCipher:
    """One user's DEK, ready for many fields: building the AES context once keeps bulk work cheap."""

    __slots__ = ("_aesgcm",)

    def __init__(self, dek: bytes) -> None:
        _require_key(dek, "DEK")
        self._aesgcm = AESGCM(dek)

    def encrypt(
        self, plaintext: bytes, table: str, column: str, row_id: uuid.UUID, dek_version: int
    ) -> tuple[bytes, bytes]:
        return self.encrypt_with_aad(plaintext, row_aad(table, column, row_id, dek_version))

    def encrypt_with_aad(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """`encrypt` for callers that assemble the AAD themselves (bulk writers reuse its prefix)."""
        nonce = os.urandom(NONCE_BYTES)
        return self._aesgcm.encrypt(nonce, plaintext, aad), nonce

    def decrypt(self, ciphertext: bytes, nonce: bytes, field: RowField) -> bytes:
        """The plaintext of the field stored at `field` (its place is part of the AAD from dek_version 2)."""
        where = f"{field.table}.{field.column} of row {field.row_id}"
        if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
            raise MalformedBlob(f"{where} has a truncated nonce or ciphertext")
        try:
            return self._aesgcm.decrypt(nonce, ciphertext, field.aad)
        except InvalidTag:
            raise DecryptFailed(
                f"{where} does not decrypt with this DEK (wrong DEK, or the ciphertext was moved from another row)"
            ) from None


def encrypt_field(dek: bytes, plaintext: bytes, field: RowField) -> tuple[bytes, bytes]:
    """Encrypt one field; returns ``(ciphertext||tag, nonce)`` as stored in ``*_ciphertext``/``*_nonce``."""
    return FieldCipher(dek).encrypt(plaintext, field.table, field.column, field.row_id, field.dek_version)


def decrypt_field(dek: bytes, ciphertext: bytes, nonce: bytes, field: RowField) -> bytes:
    return FieldCipher(dek).decrypt(ciphertext, nonce, field)


def content_hash_key(dek: bytes) -> bytes:
    _require_key(dek, "DEK")
    return hmac.digest(dek, _CONTENT_HASH_INFO, "sha256")


def content_hash_with_key(content_key: bytes, plaintext: bytes) -> str:
    return hmac.digest(content_key, plaintext, "sha256").hex()


def content_hash(dek: bytes, plaintext: bytes) -> str:
    """``notes.content_hash`` / ``attachments.content_hash`` of a plaintext, per user."""
    return content_hash_with_key(content_hash_key(dek), plaintext)


def check_content_hash(dek: bytes, plaintext: bytes, stored: str | None) -> ContentHashVerdict:
    """Compare a stored content hash with the plaintext; 32-hex-char hashes predate per-user keying."""
    if stored is None:
        return "missing"
    if len(stored) == 32:
        return "legacy"
    return "match" if hmac.compare_digest(content_hash(dek, plaintext), stored) else "mismatch"


def filter_key(dek: bytes) -> bytes:
    """The DEK-derived key behind every ``*_hmac`` lookup column."""
    _require_key(dek, "DEK")
    return hmac.digest(dek, _FILTER_KEY_INFO, "sha256")


def hmac_field(key: bytes, value: bytes) -> bytes:
    return hmac.digest(key, value, "sha256")


def path_hmac(dek: bytes, path: str) -> bytes:
    """``notes.path_hmac`` / ``attachments.path_hmac`` of a vault-relative path."""
    return hmac_field(filter_key(dek), path.encode("utf-8"))


def encode_tags(tags: Sequence[str]) -> bytes:
    """Tags as Engram encrypts them: ``:erlang.term_to_binary`` of a list of UTF-8 binaries."""
    if not tags:
        return b"\x83j"
    parts = [b"\x83l", struct.pack(">I", len(tags))]
    for tag in tags:
        raw = tag.encode("utf-8")
        parts += (b"m", struct.pack(">I", len(raw)), raw)
    parts.append(b"j")
    return b"".join(parts)


def decode_tags(data: bytes) -> list[str]:
    """Read back what `encode_tags` (or Engram) wrote; any other Erlang term is refused."""
    if data == b"\x83j":
        return []
    if data[:2] != b"\x83l" or len(data) < 7 or data[-1:] != b"j":
        raise MalformedBlob("tags plaintext is not an Erlang list of binaries")
    (count,) = struct.unpack_from(">I", data, 2)
    tags: list[str] = []
    pos = 6
    for _ in range(count):
        if data[pos : pos + 1] != b"m" or pos + 5 > len(data):
            raise MalformedBlob("tags plaintext holds a term that is not a binary")
        (size,) = struct.unpack_from(">I", data, pos + 1)
        start, pos = pos + 5, pos + 5 + size
        if pos > len(data) - 1:
            raise MalformedBlob("tags plaintext is truncated")
        tags.append(data[start:pos].decode("utf-8"))
    if pos != len(data) - 1:
        raise MalformedBlob("tags plaintext has trailing bytes")
    return tags


def _require_key(key: bytes, what: str) -> None:
    if len(key) != KEY_BYTES:
        raise EngramCryptoError(f"a {what} must be {KEY_BYTES} bytes, got {len(key)}")
