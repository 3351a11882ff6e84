"""Is the restored database the backed-up one? Its tables, constraints and indexes, and its row counts.

The manifest records every table's row count but no object list; the dump's own
table of contents (`pg_restore --list`) stands for that list: every table,
constraint and index it names must exist after the restore. A plain dump has no
TOC, and only the tables the counts name are checked then, which the result says.
Findings are collected, not raised: the caller reports them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..repository.manifest import Manifest
from ..stores import postgres
from ..stores.postgres import quote_ident
from ..taskgroups import task_group


@dataclass(frozen=True)
class SchemaCheck:
    """The restored database against the backup."""

    tables: int
    constraints: int
    indexes: int
    missing: list[str]  # "index public.notes_user_id_index", ...
    counts_wrong: dict[str, tuple[int, int]]  # table -> (manifest, restored)
    objects_from: str  # where the object list came from

    @property
    def ok(self) -> bool:
        return not self.missing and not self.counts_wrong

    @property
    def summary(self) -> str:
        if self.ok:
            return (f"{self.tables} tables, {self.constraints} constraints and {self.indexes} indexes present; "
                    f"row counts match the manifest ({self.objects_from})")  # fmt: skip
        parts = [f"missing: {', '.join(self.missing[:10])}"] if self.missing else []
        parts += [f"row counts differ: {self.counts_wrong}"] if self.counts_wrong else []
        return "; ".join(parts)


@dataclass(frozen=True)
class TocEntry:
    kind: Literal["table", "constraint", "index"]
    schema: str
    name: str  # the table, the index, or "table constraint"

    def describe(self) -> str:
        return f"{self.kind} {self.schema}.{self.name.replace(' ', '.')}"


# Longest first; None: an entry of another kind whose name starts like one of ours.
_KINDS: list[tuple[str, Literal["table", "constraint", "index"] | None, int]] = [
    ("FK CONSTRAINT ", "constraint", 2), ("CONSTRAINT ", "constraint", 2), ("INDEX ATTACH ", None, 0),
    ("INDEX ", "index", 1), ("TABLE DATA ", None, 0), ("TABLE ATTACH ", None, 0), ("TABLE ", "table", 1),
]  # fmt: skip


def parse_toc(text: str) -> list[TocEntry]:
    """Tables, constraints and indexes from `pg_restore --list` output (`id; catalog oid TYPE schema tag owner`)."""
    out: list[TocEntry] = []
    for line in text.splitlines():
        if line.startswith(";") or "; " not in line:
            continue
        rest = line.split("; ", 1)[1].split(" ", 2)
        if len(rest) < 3:
            continue
        for prefix, kind, words in _KINDS:
            if rest[2].startswith(prefix):
                tokens = rest[2][len(prefix) :].split()
                if kind is not None and len(tokens) >= 1 + words:
                    out.append(TocEntry(kind, tokens[0], " ".join(tokens[1 : 1 + words])))
                break
    return out


def _qualified(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return (schema or "public", name)


async def check_restored(dsn: str, manifest: Manifest, toc: list[TocEntry]) -> SchemaCheck:
    """Every table, constraint and index of `toc` present at `dsn`, and every row count as the manifest says."""
    async with postgres.connection(dsn) as conn:
        tables = {(r["s"], r["n"]) for r in await conn.fetch(
            "SELECT n.nspname AS s, c.relname AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p')")}  # fmt: skip
        indexes = {(r["s"], r["n"]) for r in await conn.fetch(
            "SELECT n.nspname AS s, c.relname AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('i', 'I')")}  # fmt: skip
        constraints = {(r["s"], f"{r['t']} {r['n']}") for r in await conn.fetch(
            "SELECT n.nspname AS s, c.relname AS t, co.conname AS n FROM pg_constraint co "
            "JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = co.connamespace")}  # fmt: skip
    present = {"table": tables, "index": indexes, "constraint": constraints}
    expected = list(toc)
    if not toc:  # a plain dump: only the tables the counts name
        expected = [TocEntry("table", *(t.split(".", 1) if "." in t else ("public", t)))
                    for t in manifest.database.row_counts]  # fmt: skip
    missing = [e.describe() for e in expected if (e.schema, e.name) not in present[e.kind]]
    absent = {e.name for e in expected if e.kind == "table" and (e.schema, e.name) not in tables}
    # A table the manifest counts but the restore lacks (and the TOC does not name) is a wrong count, not a query
    # that fails: the manifest names public tables unqualified.
    absent |= {t for t in manifest.database.row_counts if _qualified(t) not in tables}
    wrong: dict[str, tuple[int, int]] = {}
    names = sorted(t for t in manifest.database.row_counts if t not in absent)

    async def count(share: list[str]) -> None:
        async with postgres.connection(dsn) as conn:
            for table in share:
                qualified = ".".join(quote_ident(p) for p in table.split(".", 1))
                actual = int(await conn.fetchval(f"SELECT count(*) FROM {qualified}"))
                if actual != manifest.database.row_counts[table]:
                    wrong[table] = (manifest.database.row_counts[table], actual)

    # Two connections: the big tables' scans overlap instead of queueing.
    async with task_group() as tg:
        for share in (names[0::2], names[1::2]):
            if share:
                tg.start_soon(count, share)
    for table in sorted(absent & set(manifest.database.row_counts)):
        wrong[table] = (manifest.database.row_counts[table], 0)
    return SchemaCheck(
        tables=sum(e.kind == "table" for e in expected), constraints=sum(e.kind == "constraint" for e in expected),
        indexes=sum(e.kind == "index" for e in expected), missing=missing, counts_wrong=dict(sorted(wrong.items())),
        objects_from="the dump's table of contents" if toc else "plain dump: tables from the row counts only",
    )  # fmt: skip
