"""The framing of a custom-format dump read from a pipe: where its head ends, and where each data block is.

pg_dump writing a custom dump to a pipe puts, in this order: the header, the
table of contents (each entry with its dump id and an unset data offset), then one
block per entry with data, in TOC order: a type byte, the entry's dump id, then
length-prefixed chunks ending with a zero length (a large-object block: per object
its OID, then such chunks; a zero OID ends it). Nothing follows the last block.

Knowing only this framing (never the rows themselves), one decrypted stream can be
cut into its blocks, each held (in memory) as it arrives, so that stock
pg_restore processes load several tables at once, each fed the head and its
block(s) in stream order (as `pg_restore --jobs` loads from a file). The bytes are
passed on verbatim: pg_restore still reads and checks every one of them.
An archive version this does not know is refused (`Unsupported`) and the caller
falls back to one loader fed the whole stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import IntegrityError

MAGIC = b"PGDMP"
_FIX = "the dump is damaged: drop the target database, then restore another recovery point"
BLK_DATA, BLK_BLOBS = 1, 3
_CUSTOM = 1  # archCustom
SECTION_PRE_DATA, SECTION_POST_DATA = 2, 4  # teSection: NONE = 1, PRE_DATA, DATA, POST_DATA
_ALONE = frozenset({"INDEX", "CONSTRAINT", "CHECK CONSTRAINT"})  # post-data entries that touch one table only


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}  # struct codes of the archive's int sizes (a sign byte first)


class Unsupported(Exception):
    """Not a custom-format archive whose head this module can read."""


class _Short(Exception):
    """More bytes are needed."""


@dataclass(frozen=True)
class Head:
    size: int  # bytes of header and table of contents
    int_size: int
    data_ids: tuple[int, ...]  # dump ids of the entries with a data block (hadDumper), in TOC order
    entries: dict[int, str]  # dump id -> desc ("TABLE DATA", "SEQUENCE SET", ...), in TOC order
    sections: dict[int, int] = field(default_factory=dict)  # dump id -> section (SECTION_POST_DATA, ...)
    deps: dict[int, tuple[int, ...]] = field(default_factory=dict)  # dump id -> the dump ids it depends on

    def early_post_data(self, data_id: int) -> list[int]:
        """The indexes and constraints of the one table whose rows `data_id` holds, that need nothing else
        (no foreign keys, nothing on another post-data entry): they can be built as soon as those rows
        are in, while other tables still load, as `pg_restore --jobs` schedules them. TOC order."""
        tables = [d for d in self.deps.get(data_id, ()) if self.entries.get(d) == "TABLE"]
        if self.entries.get(data_id) != "TABLE DATA" or len(tables) != 1:
            return []
        out = []
        for i, desc in self.entries.items():
            deps = self.deps.get(i, ())
            if self.sections.get(i) != SECTION_POST_DATA or desc not in _ALONE or tables[0] not in deps:
                continue
            others = [d for d in deps if d != tables[0]]
            if all(self.sections.get(d) == SECTION_PRE_DATA and self.entries.get(d) != "TABLE" for d in others):
                out.append(i)
        return out


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data, self.pos, self.int_size = memoryview(data), 0, 4

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _Short
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Short
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos])

    def int(self) -> int:
        raw = self.take(self.int_size + 1)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def str(self) -> str | None:
        n = self.int()
        return None if n < 0 else self.take(n).decode("utf-8", errors="replace")


def parse_head(data: bytes | bytearray) -> Head | None:
    """The head of a custom dump starting `data`; None while `data` is too short to hold it all."""
    r = _Reader(data)
    try:
        if r.take(5) != MAGIC:
            raise Unsupported("not a custom-format dump")
        vmaj, vmin, _vrev = r.byte(), r.byte(), r.byte()
        version = (vmaj, vmin)
        # 1.14 (PostgreSQL 12) onwards: the fields read below; older archives go the one-loader way.
        if version < (1, 14) or version > (1, 16):
            raise Unsupported(f"archive version {vmaj}.{vmin}")
        r.int_size = r.byte()
        off_size = r.byte()
        if r.byte() != _CUSTOM or not 1 <= r.int_size <= 8 or not 1 <= off_size <= 16:
            raise Unsupported("not a custom-format dump")
        if version >= (1, 15):
            r.byte()  # compression algorithm
        else:
            r.int()  # compression level
        for _ in range(7):  # creation time
            r.int()
        r.str(), r.str(), r.str()  # database name, server version, pg_dump version
        count = r.int()
        data_ids: list[int] = []
        entries: dict[int, str] = {}
        sections: dict[int, int] = {}
        deps: dict[int, tuple[int, ...]] = {}
        for _ in range(count):
            dump_id, had_dumper = r.int(), r.int()
            r.str(), r.str()  # catalog table oid, oid
            r.str()  # tag
            desc = r.str() or ""
            section = r.int()
            for _field in range(6):  # definition, drop, copy statement, namespace, tablespace, table access method
                r.str()
            if version >= (1, 16):
                r.int()  # relkind
            r.str(), r.str()  # owner, "with oids"
            needs: list[int] = []
            while (dep := r.str()) is not None:  # dependencies, as decimal strings
                needs.append(int(dep) if dep.isdigit() else 0)
            r.byte()  # data offset: its flag, then the offset
            r.take(off_size)
            entries[dump_id], sections[dump_id], deps[dump_id] = desc, section, tuple(needs)
            if had_dumper:
                data_ids.append(dump_id)
    except _Short:
        return None
    return Head(r.pos, r.int_size, tuple(data_ids), entries, sections, deps)


@dataclass
class Block:
    dump_id: int
    parts: list[bytes] = field(default_factory=list, repr=False)  # its bytes so far (a reader may empty them)
    written: int = 0  # bytes in `parts` so far, read or not
    complete: bool = False


class Splitter:
    """Cuts the data blocks following the head into their bytes, block by block (call `feed` in a worker thread)."""

    def __init__(self, head: Head) -> None:
        self.int_size = head.int_size
        self.known = set(head.data_ids)
        self.blocks: list[Block] = []
        self._pending = b""
        self._state = "block"  # block | length | body | oid
        self._left = 0  # bytes of chunk body still to pass
        self._blobs = False
        code = _INT_CODES.get(head.int_size)
        self._unpack = struct.Struct("<B" + code).unpack_from if code else None

    def _int(self, data: bytes, pos: int) -> int:
        if self._unpack is not None:
            sign, value = self._unpack(data, pos)
        else:
            sign, value = data[pos], int.from_bytes(data[pos + 1 : pos + 1 + self.int_size], "little")
        return int(-value if sign else value)

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes of the stream; returns how many were added to the blocks' parts."""
        before = self._pending
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        view, pos, n, width = memoryview(data), 0, len(data), self.int_size + 1
        block = self.blocks[-1] if self.blocks and not self.blocks[-1].complete else None
        start = pos  # of the bytes of `block` not yet written
        # pg_dump writes one length-prefixed chunk per row: this loop runs once per row of the dump, so its
        # state lives in locals and a chunk body that is all here is hopped over in the same step as its length.
        state, left, read_int = self._state, self._left, self._int
        while pos < n:
            if state == "body":
                if left > n - pos:
                    left -= n - pos
                    pos = n
                    break
                pos += left
                left, state = 0, "length"
                continue
            if state == "block":
                if n - pos < 1 + width:
                    break
                kind = data[pos]
                dump_id = read_int(data, pos + 1)
                if kind not in (BLK_DATA, BLK_BLOBS) or dump_id not in self.known:
                    raise IntegrityError(f"unexpected data block (type {kind}, id {dump_id}) in the dump", _FIX)
                block = Block(dump_id)
                self.blocks.append(block)
                start, pos = pos, pos + 1 + width
                self._blobs = kind == BLK_BLOBS
                state = "oid" if self._blobs else "length"
                continue
            if n - pos < width:
                break
            value = read_int(data, pos)
            pos += width
            assert block is not None
            if state == "oid":
                if value == 0:
                    self._end(block, view[start:pos])
                    block, start = None, pos
                    state = "block"
                else:
                    state = "length"
            elif value == 0:  # the end of a block's chunks (or of one large object's)
                if self._blobs:
                    state = "oid"
                else:
                    self._end(block, view[start:pos])
                    block, start = None, pos
                    state = "block"
            elif value < 0:
                raise IntegrityError(f"a data block of the dump has a negative chunk length ({value})", _FIX)
            elif value <= n - pos:
                pos += value  # the whole chunk body is here
            else:
                left, state = value - (n - pos), "body"
                pos = n
        self._state, self._left = state, left
        if block is not None and pos > start:
            # A chunk that is all one block's (the usual case) is kept as it came: no copy.
            whole = start == 0 and pos == n and type(data) is bytes
            block.parts.append(data if whole else bytes(view[start:pos]))
            block.written += pos - start
        self._pending = bytes(view[pos:])
        return len(chunk) + len(before) - len(self._pending)

    def _end(self, block: Block, tail: memoryview) -> None:
        if tail:
            block.parts.append(bytes(tail))
            block.written += len(tail)
        block.complete = True

    def finish(self) -> None:
        if self._pending or self._state != "block":
            raise IntegrityError("the dump ends in the middle of a data block", _FIX)
