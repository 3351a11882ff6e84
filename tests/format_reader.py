"""An independent reader of encrypted backup artifacts, written only from docs/backup-format.md.

It imports nothing from engram_recovery: only the standard library, `cryptography`
and `zstandard`, as someone without this tool would have them. Every layout
constant it needs (the header's size and fields, the KDF's info string, the
record layout, the associated data) is read from the document itself, so when the
document disagrees with what run_backup writes, this reader fails to decrypt.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


@dataclass(frozen=True)
class Layout:
    header_size: int
    fields: dict[str, tuple[int, int]]  # field name -> (offset, size)
    file_key_info: bytes
    record_fields: list[tuple[int, str]]  # (size, field) before the ciphertext
    aad_header_bytes: int
    last_flag: int


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    following = doc.find("\n#", start + len(heading))
    return doc[start : following if following != -1 else len(doc)]


def layout_from(doc_path: Path) -> Layout:
    doc = doc_path.read_text()
    heading = re.search(r"^### Header \((\d+) bytes\)", doc, re.MULTILINE)
    assert heading, "the document names no header size"
    header = _section(doc, heading.group(0))
    fields: dict[str, tuple[int, int]] = {}
    for offset, size, name in re.findall(r"^\| (\d+) \| (\d+) \| ([^|]+?) \|", header, re.MULTILINE):
        fields[name.split(":")[0].split(",")[0].split()[0]] = (int(offset), int(size))
    file_key = _section(doc, "### File key")
    info = re.search(r'info = "([^"]+)"', file_key)
    assert info, "the document names no HKDF info"
    records = _section(doc, "### Records")
    record_fields = [
        (int(size), name.strip())
        for size, name in re.findall(r"^\| (\d+) \| ([^|]+) \|", records, re.MULTILINE)
    ]
    aad = re.search(r"header \((\d+) bytes\) ‖ i as u64 ‖ flags \(1 byte\) ‖ n as u32", records)
    assert aad, "the document does not spell out the associated data"
    last = re.search(r"bit (\d+) = LAST", records)
    assert last, "the document names no LAST flag"
    return Layout(
        header_size=int(heading.group(1)), fields=fields, file_key_info=info.group(1).encode(),
        record_fields=record_fields, aad_header_bytes=int(aad.group(1)), last_flag=1 << int(last.group(1)),
    )


def decrypt(data: bytes, backup_key: bytes, layout: Layout) -> bytes:
    """The plaintext of one encrypted artifact (still compressed, if it was)."""
    header = data[: layout.header_size]
    salt_at, salt_size = layout.fields["salt"]
    salt = header[salt_at : salt_at + salt_size]
    file_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=layout.file_key_info).derive(backup_key)
    aead = AESGCM(file_key)
    sizes = [size for size, _name in layout.record_fields]  # flags, length, nonce
    flags_size, length_size, nonce_size = sizes[:3]
    position, index, out, done = layout.header_size, 0, bytearray(), False
    while position < len(data):
        assert not done, "data after the LAST record"
        flags = int.from_bytes(data[position : position + flags_size], "big")
        position += flags_size
        length = int.from_bytes(data[position : position + length_size], "big")
        position += length_size
        nonce = data[position : position + nonce_size]
        position += nonce_size
        sealed = data[position : position + length + 16]
        position += length + 16
        aad = data[: layout.aad_header_bytes] + struct.pack(">QBI", index, flags, length)
        out += aead.decrypt(nonce, sealed, aad)
        index += 1
        done = bool(flags & layout.last_flag)
    assert done, "truncated: no LAST record"
    return bytes(out)


def read_artifact(path: Path, backup_key: bytes, doc_path: Path) -> bytes:
    """What pg_dump wrote: decrypted per the document, then zstd-decompressed when the name says `.zst`."""
    plain = decrypt(path.read_bytes(), backup_key, layout_from(doc_path))
    if ".zst" in path.name:
        # The document promises one standard frame (with a content checksum).
        out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(plain)
        return out
    return plain
