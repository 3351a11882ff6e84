"""Engram's crypto formats: checked against the byte layouts read from Engram's source, not only round-trips."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid
from typing import Literal

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engram_recovery.core.engram import crypto as ec

MASTER = bytes(range(32))
USER = "0190f3a4-5b6c-7d8e-9f01-23456789abcd"


def test_master_key_decodes_from_standard_base64_of_32_bytes() -> None:
    assert ec.decode_master_key(base64.b64encode(MASTER).decode() + "\n") == MASTER
    assert ec.decode_master_key(ec.encode_master_key(MASTER)) == MASTER


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "31 bytes"),
        (base64.b64encode(bytes(33)).decode(), "33 bytes"),
        (base64.b64encode(MASTER).decode().rstrip("="), "not valid base64"),
    ],
)
def test_a_malformed_master_key_is_refused_without_echoing_it(text: str, reason: str) -> None:
    with pytest.raises(ec.InvalidMasterKey, match=reason) as caught:
        ec.decode_master_key(text)
    assert not text or text not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_fingerprint_is_short_stable_and_reveals_nothing() -> None:
    fingerprint = ec.key_fingerprint(MASTER)
    assert fingerprint == ec.key_fingerprint(MASTER)
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    assert fingerprint != ec.key_fingerprint(os.urandom(32))
    assert fingerprint not in (MASTER.hex(), hashlib.sha256(MASTER).hexdigest()[:12])


def test_v2_wrap_has_engrams_layout_and_binds_the_user_id() -> None:
    dek = os.urandom(32)
    blob = ec.wrap_dek(MASTER, dek, USER)
    assert len(blob) == 62 and blob[:2] == b"\x02\x01"
    # Decrypted here by hand from the documented layout, not by the module under test.
    assert AESGCM(MASTER).decrypt(blob[2:14], blob[14:], f"dek:v1:{USER}".encode()) == dek
    assert ec.wrap_format(blob) == "v2"
    assert ec.unwrap_dek(MASTER, blob, uuid.UUID(USER)) == dek
    with pytest.raises(ec.WrongKey):
        ec.unwrap_dek(MASTER, blob, str(uuid.uuid4()))


def test_v1_and_legacy_wraps_use_no_aad() -> None:
    dek = os.urandom(32)
    v1 = ec.wrap_dek(MASTER, dek, USER, version=1)
    legacy = ec.wrap_dek(MASTER, dek, USER, version=0)
    while legacy[:1] == b"\xaa":  # one nonce in 256 starts with the KMS tag (see below)
        legacy = ec.wrap_dek(MASTER, dek, USER, version=0)
    assert (len(v1), v1[:2], ec.wrap_format(v1)) == (62, b"\x01\x01", "v1")
    assert (len(legacy), ec.wrap_format(legacy)) == (60, "legacy")
    assert AESGCM(MASTER).decrypt(v1[2:14], v1[14:], b"") == dek
    assert AESGCM(MASTER).decrypt(legacy[:12], legacy[12:], b"") == dek
    # No AAD means the blob opens whatever user it is presented for.
    assert ec.unwrap_dek(MASTER, v1, "someone else") == dek
    assert ec.unwrap_dek(MASTER, legacy, "someone else") == dek


@pytest.mark.parametrize("version", [2, 1, 0], ids=["v2", "v1", "legacy"])
def test_a_wrong_master_key_is_reported_as_such(version: Literal[0, 1, 2]) -> None:
    blob = ec.wrap_dek(MASTER, os.urandom(32), USER, version=version)
    while blob[:1] == b"\xaa":
        # A legacy blob is nonce-first: one nonce in 256 starts with the KMS tag, and Engram
        # (so we) then reads it as KMS-wrapped. Not the case under test here.
        blob = ec.wrap_dek(MASTER, os.urandom(32), USER, version=version)
    with pytest.raises(ec.WrongKey):
        ec.unwrap_dek(os.urandom(32), blob, USER)


def test_kms_and_unknown_blobs_are_told_apart() -> None:
    kms = b"\xaa\x01" + os.urandom(180)
    assert ec.wrap_format(kms) == "kms"
    # The KMS tag wins even at a length that would otherwise look legacy, as in Engram.
    assert ec.wrap_format(b"\xaa" + os.urandom(59)) == "kms"
    with pytest.raises(ec.KmsWrapped):
        ec.unwrap_dek(MASTER, kms, USER)
    for junk in (b"", os.urandom(61), b"\x03\x01" + os.urandom(60)):
        assert ec.wrap_format(junk) == "unknown"
        with pytest.raises(ec.MalformedBlob):
            ec.unwrap_dek(MASTER, junk, USER)


def test_canary_is_wrapped_for_user_zero_and_checked_by_sha256() -> None:
    wrapped, sha = ec.make_canary(MASTER)
    dek = ec.unwrap_dek(MASTER, wrapped, "0")
    assert hashlib.sha256(dek).digest() == sha
    assert AESGCM(MASTER).decrypt(wrapped[2:14], wrapped[14:], b"dek:v1:0") == dek
    assert ec.check_canary(MASTER, wrapped, sha) == "match"
    assert ec.check_canary(os.urandom(32), wrapped, sha) == "wrong_key"
    assert ec.check_canary(MASTER, wrapped, hashlib.sha256(b"other").digest()) == "sha_mismatch"
    assert ec.check_canary(MASTER, b"\xaa\x01" + os.urandom(100), sha) == "kms"
    assert ec.check_canary(MASTER, wrapped[:-1], sha) == "malformed"


def test_a_pre_aad_canary_still_verifies() -> None:
    dek = os.urandom(32)
    wrapped = ec.wrap_dek(MASTER, dek, "0", version=1)
    assert ec.check_canary(MASTER, wrapped, hashlib.sha256(dek).digest()) == "match"


def test_row_fields_are_bound_to_table_column_and_row_id() -> None:
    dek, row, other = os.urandom(32), uuid.uuid4(), uuid.uuid4()
    ct, nonce = ec.encrypt_field(dek, b"# Hello", ec.RowField("notes", "content", row, 2))
    assert len(nonce) == 12 and len(ct) == len(b"# Hello") + 16
    assert AESGCM(dek).decrypt(nonce, ct, b"notes\x00content\x00" + row.bytes) == b"# Hello"
    assert ec.decrypt_field(dek, ct, nonce, ec.RowField("notes", "content", row, 2)) == b"# Hello"
    for table, column, row_id in (
        ("notes", "content", other),
        ("notes", "title", row),
        ("attachments", "content", row),
    ):
        with pytest.raises(ec.DecryptFailed, match=str(row_id)):
            ec.decrypt_field(dek, ct, nonce, ec.RowField(table, column, row_id, 2))
    with pytest.raises(ec.DecryptFailed):
        ec.decrypt_field(os.urandom(32), ct, nonce, ec.RowField("notes", "content", row, 2))


def test_rows_before_aad_binding_use_empty_aad() -> None:
    dek, row = os.urandom(32), uuid.uuid4()
    ct, nonce = ec.encrypt_field(dek, b"old", ec.RowField("notes", "content", row, 1))
    assert AESGCM(dek).decrypt(nonce, ct, b"") == b"old"
    assert ec.decrypt_field(dek, ct, nonce, ec.RowField("vaults", "name", uuid.uuid4(), 1)) == b"old"


def test_truncated_field_is_malformed_not_a_wrong_key() -> None:
    dek, row = os.urandom(32), uuid.uuid4()
    ct, nonce = ec.encrypt_field(dek, b"x", ec.RowField("notes", "content", row, 2))
    with pytest.raises(ec.MalformedBlob):
        ec.decrypt_field(dek, ct, nonce[:11], ec.RowField("notes", "content", row, 2))
    with pytest.raises(ec.MalformedBlob):
        ec.decrypt_field(dek, ct[:15], nonce, ec.RowField("notes", "content", row, 2))


def test_content_hash_is_hmac_under_a_dek_derived_key() -> None:
    dek = os.urandom(32)
    key = hmac.new(dek, b"engram-content-hash-v1", hashlib.sha256).digest()
    expected = hmac.new(key, b"body", hashlib.sha256).hexdigest()
    assert ec.content_hash(dek, b"body") == expected
    assert ec.check_content_hash(dek, b"body", expected) == "match"
    assert ec.check_content_hash(dek, b"edited", expected) == "mismatch"
    assert ec.check_content_hash(os.urandom(32), b"body", expected) == "mismatch"
    assert ec.check_content_hash(dek, b"body", hashlib.md5(b"body").hexdigest()) == "legacy"
    assert ec.check_content_hash(dek, b"body", None) == "missing"


def test_path_hmac_uses_the_filter_key() -> None:
    dek = os.urandom(32)
    key = hmac.new(dek, b"engram-filter-v1", hashlib.sha256).digest()
    assert ec.path_hmac(dek, "Projects/plan.md") == hmac.new(key, b"Projects/plan.md", hashlib.sha256).digest()
    assert ec.filter_key(dek) == key


def test_tags_use_erlang_external_term_format() -> None:
    # :erlang.term_to_binary(["a", "b"]) and :erlang.term_to_binary([]) as Elixir prints them.
    assert ec.encode_tags(["a", "b"]) == bytes([131, 108, 0, 0, 0, 2, 109, 0, 0, 0, 1, 97, 109, 0, 0, 0, 1, 98, 106])
    assert ec.encode_tags([]) == bytes([131, 106])
    assert ec.decode_tags(ec.encode_tags(["café", "", "to do"])) == ["café", "", "to do"]
    assert ec.decode_tags(ec.encode_tags([])) == []


@pytest.mark.parametrize(
    "data", [b"", b"\x83", b"\x83l\x00\x00\x00\x01j", b"\x83l\x00\x00\x00\x01m\x00\x00\x00\x09abcj"]
)
def test_malformed_tags_are_refused(data: bytes) -> None:
    with pytest.raises(ec.MalformedBlob):
        ec.decode_tags(data)


def test_keys_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(ec.EngramCryptoError, match="32 bytes"):
        ec.wrap_dek(MASTER[:16], os.urandom(32), USER)
    with pytest.raises(ec.EngramCryptoError, match="32 bytes"):
        ec.FieldCipher(b"short")
