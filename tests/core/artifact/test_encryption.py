"""The chunked AES-256-GCM format: round trips, and every way a stored file can be altered is detected."""

from __future__ import annotations

import base64
import secrets
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_recovery.core.artifact import encryption as backup_crypto
from engram_recovery.core.artifact.codec import Decoder as Extractor
from engram_recovery.core.artifact.compression import compressor
from engram_recovery.core.artifact.encryption import HEADER_SIZE, RECORD_OVERHEAD, Decryptor, Encryptor
from engram_recovery.core.errors import ConfigurationError, IntegrityError

KEY = secrets.token_bytes(32)
CHUNK = 1024


def encrypt(data: bytes, key: bytes = KEY, pieces: int = 7) -> bytes:
    enc = Encryptor(key, chunk_size=CHUNK)
    step = max(1, len(data) // pieces)
    out = b"".join(enc.update(data[i : i + step]) for i in range(0, len(data), step))
    return out + enc.finish()


def decrypt(blob: bytes, key: bytes = KEY, feed: int = 333) -> bytes:
    dec = Decryptor(key)
    out = b"".join(dec.update(blob[i : i + feed]) for i in range(0, len(blob), feed))
    dec.finish()
    return out


def records(blob: bytes) -> list[bytes]:
    """Split a file into its records (after the header)."""
    out, pos = [], HEADER_SIZE
    while pos < len(blob):
        length = struct.unpack(">I", blob[pos + 1 : pos + 5])[0]
        end = pos + RECORD_OVERHEAD + length
        out.append(blob[pos:end])
        pos = end
    return out


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_at_every_boundary(size: int) -> None:
    data = secrets.token_bytes(size)
    blob = encrypt(data)
    assert blob[:7] == b"ENGRBAK" and blob[7] == backup_crypto.VERSION
    assert decrypt(blob) == data
    assert len(data) < 16 or data not in blob


def test_each_record_has_a_fresh_nonce_and_the_same_plaintext_encrypts_differently() -> None:
    data = b"\x00" * (4 * CHUNK)
    first, second = encrypt(data), encrypt(data)
    nonces = [r[5:17] for r in records(first)]
    assert len(set(nonces)) == len(nonces) == 4
    assert first != second


def test_one_flipped_bit_anywhere_is_detected() -> None:
    blob = bytearray(encrypt(secrets.token_bytes(3 * CHUNK + 5)))
    for position in (3, HEADER_SIZE - 1, HEADER_SIZE + 2, HEADER_SIZE + 20, len(blob) // 2, len(blob) - 1):
        altered = bytearray(blob)
        altered[position] ^= 0x01
        with pytest.raises(IntegrityError):
            decrypt(bytes(altered))


def test_a_file_cut_after_any_record_is_detected_as_truncated() -> None:
    blob = encrypt(secrets.token_bytes(3 * CHUNK + 5))
    parts = records(blob)
    for kept in range(len(parts)):
        cut = blob[:HEADER_SIZE] + b"".join(parts[:kept])
        with pytest.raises(IntegrityError, match="truncated"):
            decrypt(cut)
    with pytest.raises(IntegrityError):
        decrypt(blob[:-1])


def test_reordered_dropped_or_duplicated_records_are_detected() -> None:
    blob = encrypt(secrets.token_bytes(3 * CHUNK + 5))
    head, parts = blob[:HEADER_SIZE], records(blob)
    for arrangement in ([1, 0, 2, 3], [0, 2, 3], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3]):
        with pytest.raises(IntegrityError):
            decrypt(head + b"".join(parts[i] for i in arrangement))


def test_records_from_another_file_under_the_same_key_are_refused() -> None:
    data = secrets.token_bytes(2 * CHUNK + 1)
    one, two = encrypt(data), encrypt(data)
    spliced = one[:HEADER_SIZE] + records(two)[0] + b"".join(records(one)[1:])
    with pytest.raises(IntegrityError, match="failed authentication"):
        decrypt(spliced)


def test_a_different_key_is_named_as_such() -> None:
    other = secrets.token_bytes(32)
    with pytest.raises(IntegrityError, match="another backup key") as info:
        decrypt(encrypt(b"hello"), key=other)
    assert backup_crypto.fingerprint(other) in info.value.message


def test_backup_keys_must_be_base64_of_32_bytes() -> None:
    assert backup_crypto.parse_key(" " + base64.b64encode(KEY).decode() + "\n") == KEY
    for bad in ("", "not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigurationError, match="openssl rand -base64 32"):
            backup_crypto.parse_key(bad)


@pytest.mark.parametrize("kind", ["zstd", "gzip", "none"])
@pytest.mark.parametrize("encrypted", [True, False])
def test_the_extractor_undoes_any_layering_from_the_bytes_alone(kind: str, encrypted: bool) -> None:
    data = b"PGDMP" + secrets.token_hex(5000).encode()
    codec = compressor(kind)  # type: ignore[arg-type]
    stored = codec.update(data) + codec.finish()
    if encrypted:
        stored = encrypt(stored)
    extractor = Extractor(KEY if encrypted else None)
    out = b"".join(extractor.update(stored[i : i + 100]) for i in range(0, len(stored), 100)) + extractor.finish()
    assert out == data and extractor.encrypted is encrypted
    if kind != "none":
        assert len(stored) < len(data)


def test_a_truncated_compressed_stream_is_detected() -> None:
    codec = compressor("zstd")
    stored = codec.update(secrets.token_hex(50_000).encode()) + codec.finish()
    extractor = Extractor(None)
    extractor.update(stored[: len(stored) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        extractor.finish()


def test_zstd_frames_use_a_128_kib_window_and_carry_a_checksum() -> None:
    codec = compressor("zstd")
    stored = codec.update(secrets.token_hex(300_000).encode()) + codec.finish()
    frame = zstandard.get_frame_parameters(stored)
    assert frame.window_size == 1 << 17 and frame.has_checksum
    # An explicit level keeps zstd's own parameters.
    other = compressor("zstd", 3)
    assert zstandard.get_frame_parameters(other.update(b"x" * 1000) + other.finish()).window_size > 1 << 17


# The Decryptor reads records in place and copies only a header or record split across two calls: whatever
# the split points, the output is the same bytes and every alteration is still refused.
_FILE = encrypt(secrets.token_bytes(4 * CHUNK + 77))


def _feed(blob: bytes, cuts: list[int]) -> bytes:
    dec = Decryptor(KEY)
    points = sorted({min(c, len(blob)) for c in cuts} | {0, len(blob)})
    out = b"".join(bytes(dec.update(blob[a:b])) for a, b in zip(points, points[1:], strict=False))
    dec.finish()
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(_FILE)), max_size=12))
def test_any_split_of_the_stored_bytes_decrypts_to_the_same_plaintext(cuts: list[int]) -> None:
    assert _feed(_FILE, cuts) == decrypt(_FILE, feed=len(_FILE))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=len(_FILE)), max_size=8),
    st.integers(min_value=0, max_value=len(_FILE) - 1),
    st.sampled_from(["flip", "cut", "append"]),
)
def test_any_split_of_an_altered_file_is_refused(cuts: list[int], position: int, how: str) -> None:
    blob = bytearray(_FILE)
    if how == "flip":
        blob[position] ^= 0x40
    elif how == "cut":
        del blob[position:]
    else:
        blob += _FILE[HEADER_SIZE:][: position % 64 + 1]
    with pytest.raises(IntegrityError):
        _feed(bytes(blob), cuts)
