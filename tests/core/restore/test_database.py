"""The database restore engine against the bundled PostgreSQL 18 and backups made by run_backup."""

from __future__ import annotations

import base64
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import pytest
from support import EngramDB, engram_env, fingerprints, make_engram_db, pg_bin

from engram_recovery import testbed
from engram_recovery.core.artifact import encryption as backup_crypto
from engram_recovery.core.errors import IntegrityError, UnsafeOperation
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.layout import BACKUPS
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.manifest import Artifact, Manifest
from engram_recovery.core.restore.database import HEAD_ROOM, DumpRestore, choose_mode, plain_size, restore_database
from engram_recovery.core.restore.dumpfile import Splitter, Unsupported, parse_head
from engram_recovery.core.restore.feed import shares
from engram_recovery.core.restore.schema_check import check_restored, parse_toc
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.pgclient.commands import RestoreClients
from engram_recovery.tools.run_backup import RunBackupInput, run_backup

BACKUP_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
Backed = tuple[EngramDB, Path, Manifest]


async def backup_of(db: EngramDB, base: Path, fmt: str) -> Manifest:
    runtime = Runtime(load_settings(environ=engram_env(db, base, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)))
    try:
        result = await run_backup(runtime, RunBackupInput(format=fmt), silent)  # type: ignore[arg-type]
    finally:
        await runtime.aclose()
    assert result.verified and result.backup_id
    return Manifest.model_validate_json((base / "repo" / BACKUPS / result.backup_id / "manifest.json").read_bytes())


@pytest.fixture(scope="module")
async def backed_up(admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Backed]]:
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), notes=200, attachments=20):
        out: dict[str, Backed] = {}
        for fmt in ("custom", "directory", "plain"):
            base = tmp_path_factory.mktemp(f"dbrestore-{fmt}")
            out[fmt] = (db, base, await backup_of(db, base, fmt))
        yield out


def clients() -> RestoreClients:
    return RestoreClients(pg_bin("pg_restore"), pg_bin("psql"))


def key() -> bytes:
    return backup_crypto.parse_key(BACKUP_KEY)


@pytest.mark.anyio
@pytest.mark.parametrize(("fmt", "jobs", "scratch", "mode", "loaders"), [
    ("custom", 2, None, "parallel", 1),  # its tables' blocks loaded 2 at a time
    ("custom", 2, "head", "parallel", 1),  # room for the head is all that needs
    ("custom", 2, "no-memory", "parallel", 1),  # blocks held to a budget of 1 byte: decryption waits, no deadlock
    ("custom", 2, "old-archive", "parallel", 1),  # a head not understood: one loader fed the stream
    ("custom", 2, "old-archive", "parallel", 2),  # ... or loaders side by side, each reading the whole stream
    ("custom", 2, "none", "streamed", 1),  # scratch space short: one streamed pass
    ("custom", 1, None, "streamed", 1),
    ("directory", 2, None, "directory", 1),
    ("plain", 2, None, "streamed", 1),
])  # fmt: skip
async def test_a_restored_backup_equals_the_source_at_backup_time_whatever_the_way_in(
    backed_up: dict[str, Backed], admin_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fmt: str, jobs: int, scratch: str | None, mode: str, loaders: int,
) -> None:  # fmt: skip
    db, base, manifest = backed_up[fmt]
    if scratch == "no-memory":
        from engram_recovery.core.restore import feed as feed_module

        monkeypatch.setattr(feed_module, "MEMORY_BUDGET", 1)
    elif scratch == "old-archive":
        from engram_recovery.core.restore import feed as feed_module

        def unsupported(data: bytes | bytearray) -> None:
            raise Unsupported("archive version 1.13")

        monkeypatch.setattr(feed_module, "parse_head", unsupported)
    elif scratch is not None:
        real = shutil.disk_usage
        free = (plain_size(manifest) or 0) if scratch == "head" else 0
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    source = await fingerprints(db.dsn)
    async with testbed.scratch_database(admin_dsn) as target, LocalRepository(base / "repo") as repo:
        said: list[tuple[float, float | None, str | None]] = []

        async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
            said.append((done, total, message))

        run = DumpRestore(repo, manifest, key(), target, clients(), jobs=jobs, scratch=tmp_path, progress=progress,
                          loaders=loaders)  # fmt: skip
        result = await restore_database(run)
        assert result.mode == mode
        if mode == "parallel":  # the stream cut into blocks, unless the archive's head is not understood
            assert ("first_load" in result.timings) is (scratch != "old-archive")
        assert [(d, t) for d, t, _m in said] == [(0, 2), (1, 2), (2, 2)] and result.why in (said[0][2] or "")
        assert result.check.ok, result.check.summary
        assert await fingerprints(target) == source
    if fmt != "plain":  # the TOC named the schema's objects, and each was found
        assert result.check.tables >= 10 and result.check.indexes > 0 and result.check.constraints > 0
    assert result.plain_bytes > 0 and result.timings["total"] > 0 and "verify" in result.timings
    assert not await anyio.to_thread.run_sync(lambda: list(tmp_path.iterdir()))  # scratch space left empty


@pytest.mark.anyio
async def test_a_tampered_row_count_and_a_missing_index_are_reported(
    backed_up: dict[str, Backed], admin_dsn: str, tmp_path: Path
) -> None:
    db, base, manifest = backed_up["custom"]
    counts = dict(manifest.database.row_counts)
    counts["notes"] += 1
    tampered = manifest.model_copy(update={"database": manifest.database.model_copy(update={"row_counts": counts})})
    toc = parse_toc(await toc_of(base, manifest))
    index = next(e for e in toc if e.kind == "index")
    async with testbed.scratch_database(admin_dsn) as target, LocalRepository(base / "repo") as repo:
        result = await restore_database(DumpRestore(repo, tampered, key(), target, clients(), scratch=tmp_path))
        assert result.check.counts_wrong == {"notes": (counts["notes"], counts["notes"] - 1)}
        assert not result.check.missing and "notes" in result.check.summary
        conn = await asyncpg.connect(target)
        try:
            await conn.execute(f'DROP INDEX public."{index.name}"')
        finally:
            await conn.close()
        check = await check_restored(target, manifest, toc)
    assert not check.ok and not check.counts_wrong
    assert check.missing == [f"index public.{index.name}"]
    assert index.name in check.summary


def with_another_checksum(manifest: Manifest) -> tuple[Artifact, Manifest]:
    """The manifest's dump artifact, and the manifest with another SHA-256 recorded for it."""
    dump = next(a for a in manifest.artifacts if a.kind == "database")
    return dump, manifest.model_copy(update={"artifacts": [
        a.model_copy(update={"sha256": "0" * 64}) if a is dump else a for a in manifest.artifacts]})  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("jobs", [2, 1], ids=["parallel", "streamed"])
async def test_a_dump_that_is_not_the_one_recorded_is_refused_by_its_checksum(
    backed_up: dict[str, Backed], admin_dsn: str, tmp_path: Path, jobs: int
) -> None:
    db, base, manifest = backed_up["custom"]
    # A well-formed artifact whose bytes are not the recorded ones (a plain one would have no other protection).
    dump, other = with_another_checksum(manifest)
    async with testbed.scratch_database(admin_dsn) as target, LocalRepository(base / "repo") as repo:
        with pytest.raises(IntegrityError, match=f"{dump.name} is not what the backup stored") as refused:
            await restore_database(DumpRestore(repo, other, key(), target, clients(), jobs=jobs, scratch=tmp_path))
    assert "drop it" in refused.value.hint


@pytest.mark.anyio
async def test_an_artifact_verified_just_before_is_not_hashed_again(
    backed_up: dict[str, Backed], admin_dsn: str, tmp_path: Path
) -> None:
    # restore_drill's verify step has just compared the artifact with the manifest: the engine then only decodes
    # and loads it (its records still authenticated), so the recorded checksum it refuses above is not read again.
    db, base, manifest = backed_up["custom"]
    _dump, other = with_another_checksum(manifest)
    async with testbed.scratch_database(admin_dsn) as target, LocalRepository(base / "repo") as repo:
        result = await restore_database(DumpRestore(repo, other, key(), target, clients(), scratch=tmp_path,
                                                    verified=True))  # fmt: skip
    assert result.plain_bytes > 0 and not result.check.missing


@pytest.mark.anyio
async def test_nothing_is_restored_into_a_database_that_is_not_empty(backed_up: dict[str, Backed]) -> None:
    db, base, manifest = backed_up["custom"]
    before = await fingerprints(db.dsn)
    async with LocalRepository(base / "repo") as repo:
        with pytest.raises(UnsafeOperation, match="is not empty") as refused:
            await restore_database(DumpRestore(repo, manifest, key(), db.dsn, clients()))
    assert "empty database" in refused.value.hint
    assert await fingerprints(db.dsn) == before


async def toc_of(base: Path, manifest: Manifest) -> str:
    from engram_recovery.core.restore.decrypt import extract_backup

    async with LocalRepository(base / "repo") as repo:
        plain = base / f"toc-{secrets.token_hex(3)}.dump"
        await extract_backup(repo, manifest.backup_id, key(), plain)
    done = await anyio.run_process([pg_bin("pg_restore"), "--list", str(plain)])
    plain.unlink()
    return done.stdout.decode()


def test_the_mode_follows_format_jobs_and_scratch_space(backed_up: dict[str, Backed]) -> None:
    manifest = backed_up["custom"][2]
    size = manifest.database.dump_bytes or 0
    assert choose_mode(manifest, 2, size * 2).mode == "parallel"
    head = min(plain_size(manifest) or size, HEAD_ROOM)  # room for the dump's TOC is all the parallel path needs
    assert choose_mode(manifest, 2, head).mode == "parallel"
    assert choose_mode(manifest, 2, head - 1).mode == "streamed"
    assert choose_mode(manifest, 1, size * 2).mode == "streamed"
    assert choose_mode(backed_up["plain"][2], 2, size * 10).mode == "streamed"
    with pytest.raises(Exception, match="directory dump"):
        choose_mode(backed_up["directory"][2], 2, 0)


def test_the_toc_parser_reads_tables_constraints_and_indexes() -> None:
    text = (";\n; Archive created at 2026-11-25\n"
            "215; 1259 16390 TABLE public notes engram\n"
            "3345; 2606 16400 CONSTRAINT public notes notes_pkey engram\n"
            "3350; 1259 16410 INDEX public notes_user_id_index engram\n"
            "3360; 2606 16420 FK CONSTRAINT public notes notes_user_id_fkey engram\n"
            "3400; 0 16390 TABLE DATA public notes engram\n")  # fmt: skip
    assert [(e.kind, e.name) for e in parse_toc(text)] == [
        ("table", "notes"), ("constraint", "notes notes_pkey"), ("index", "notes_user_id_index"),
        ("constraint", "notes notes_user_id_fkey"),
    ]  # fmt: skip


def test_the_loaders_share_the_table_data_and_the_first_keeps_everything_else() -> None:
    toc = (";\n; comment\n"
           "10; 1259 1 TABLE public a o\n"
           "20; 0 1 TABLE DATA public a o\n"
           "21; 0 2 TABLE DATA public b o\n"
           "22; 0 3 TABLE DATA public c o\n"
           "30; 0 0 SEQUENCE SET public s o\n")  # fmt: skip
    first, second = shares(toc, 2)
    assert first.splitlines() == ["10; 1259 1 TABLE public a o", "20; 0 1 TABLE DATA public a o",
                                  "22; 0 3 TABLE DATA public c o", "30; 0 0 SEQUENCE SET public s o"]  # fmt: skip
    assert second.splitlines() == ["21; 0 2 TABLE DATA public b o"]
    assert len(shares(toc, 8)) == 3 and len(shares("10; 1259 1 TABLE public a o\n", 2)) == 1


@pytest.mark.anyio
async def test_a_custom_dump_is_cut_into_its_head_and_one_verbatim_block_per_table(
    backed_up: dict[str, Backed], tmp_path: Path
) -> None:
    from engram_recovery.core.restore.decrypt import extract_backup

    db, base, manifest = backed_up["custom"]
    plain = tmp_path / "plain.dump"
    async with LocalRepository(base / "repo") as repo:
        await extract_backup(repo, manifest.backup_id, key(), plain)
    data = plain.read_bytes()
    head = parse_head(data)
    assert head is not None and 0 < head.size < len(data)
    assert parse_head(data[: head.size - 1]) is None  # a head not yet all there: wait for more
    toc = await anyio.run_process([pg_bin("pg_restore"), "--list", str(plain)])
    listed = {int(line.split(";")[0]) for line in toc.stdout.decode().splitlines() if line and line[0].isdigit()}
    # The listing leaves out the entries pg_restore handles itself (ENCODING, STDSTRINGS, ...): all else is read.
    assert listed <= set(head.entries) and len(listed) > len(head.entries) - 6
    assert {i for i, desc in head.entries.items() if desc == "TABLE DATA"} <= set(head.data_ids)
    splitter = Splitter(head)
    added = 0
    for at in range(head.size, len(data), 997):  # odd chunk sizes: every length and id split somewhere
        added += splitter.feed(data[at : at + 997])
    assert added == len(data) - head.size  # what it holds is counted (the memory budget relies on it)
    splitter.finish()
    assert sorted(b.dump_id for b in splitter.blocks) == sorted(head.data_ids)
    assert all(b.complete and b.written == sum(map(len, b.parts)) for b in splitter.blocks)
    assert data[: head.size] + b"".join(p for b in splitter.blocks for p in b.parts) == data
    cut = Splitter(head)
    cut.feed(data[head.size : -3])
    with pytest.raises(IntegrityError, match="ends in the middle of a data block"):
        cut.finish()
    with pytest.raises(Unsupported):
        parse_head(b"PGDMP\x01\x0d\x00" + data[8:])  # archive 1.13 (PostgreSQL 11): the one-loader way
    with pytest.raises(Unsupported):
        parse_head(b"PGDMX" + data[5:])


def test_the_memory_budget_is_a_quarter_of_what_is_available_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from engram_recovery.core.restore import feed as feed_module

    real = psutil.virtual_memory

    def available(n: int) -> None:
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=n))

    available(4 << 30)
    assert feed_module.memory_budget() == 1 << 30
    available(100 << 20)
    assert feed_module.memory_budget() == feed_module.MEMORY_BUDGET_MIN
    available(64 << 30)
    assert feed_module.memory_budget() == feed_module.MEMORY_BUDGET_MAX
