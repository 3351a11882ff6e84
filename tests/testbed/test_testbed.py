"""The test bed is only worth trusting if it looks like Engram: schema, roles, RLS and real ciphertexts."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as ec

NOTE_FIELDS = ("content", "title", "tags", "path", "folder")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Seeded:
    dsn: str
    name: str
    master_key: bytes
    report: testbed.SeedReport

    def as_role(self, role: str) -> str:
        return testbed.dsn_for(self.dsn, self.name, user=role)


async def build(admin_dsn: str, variant: testbed.Variant, **options: object) -> AsyncIterator[Seeded]:
    master_key = secrets.token_bytes(32)
    async with testbed.scratch_database(admin_dsn) as dsn:
        name = dsn.rsplit("/", 1)[-1]
        conn = await asyncpg.connect(dsn)
        try:
            await testbed.create_engram_schema(conn, variant=variant)
            await testbed.create_roles(conn, name)
            settings: dict[str, object] = {"users": 3, "vaults_per_user": 2, "notes": 300, "attachments": 10} | options
            report = await testbed.seed(conn, master_key=master_key, **settings)  # type: ignore[arg-type]
        finally:
            await conn.close()
        yield Seeded(dsn, name, master_key, report)


@pytest.fixture(scope="module")
async def seeded(admin_dsn: str) -> AsyncIterator[Seeded]:
    """One realistic database shared by the read-only tests below."""
    async for db in build(admin_dsn, "synthetic-next"):
        yield db


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def older(admin_dsn: str) -> AsyncIterator[Seeded]:
    """An older Engram whose attachments live in S3: the seeder hands the objects back."""
    async for db in build(admin_dsn, "older", storage="s3", attachments=6, deleted_fraction=0.0):
        yield db


async def check_schema(dsn: str, variant: testbed.Variant) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        columns = {
            (r["table_name"], r["column_name"])
            for r in await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
            )
        }
        notes_indexes = await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'notes'")
        comment = await conn.fetchval("SELECT obj_description('public.oban_jobs'::regclass, 'pg_class')")
        states = await conn.fetchval("SELECT enum_range(NULL::oban_job_state)::text[]")
        embed_index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'oban_jobs_embed_note_note_id_index'"
        )
        forced = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT relname FROM pg_class WHERE relrowsecurity AND relforcerowsecurity"
                " AND relnamespace = 'public'::regnamespace"
            )
        }
        policies = await conn.fetch("SELECT tablename, qual FROM pg_policies WHERE schemaname = 'public'")
        newest = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        default = await conn.fetchval(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = 'oban_jobs' AND column_name = 'inserted_at'"
        )
        owners = await conn.fetch("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    release = variant != "older"
    for column in ("kind", "seq", "embed_retry_after", "parse_status"):
        assert (("notes", column) in columns) is release, column
    assert (("vaults", "change_seq") in columns) is release
    assert (("notes", "dense_indexed_hash") in columns) is (variant == "synthetic-next")
    assert {("notes", "content_ciphertext"), ("users", "encrypted_dek"), ("system_canaries", "dek_sha256")} <= columns
    # Also proves the seeder put back every index it dropped for the bulk load.
    assert notes_indexes == {"older": 8, "0.18.1": 13, "synthetic-next": 14}[variant]
    assert comment == "14"
    assert states == [
        "available",
        "suspended",
        "scheduled",
        "executing",
        "retryable",
        "completed",
        "discarded",
        "cancelled",
    ]
    assert default == "timezone('UTC'::text, now())"
    if release:
        assert "((args ->> 'note_id'::text))" in embed_index and "Engram.Workers.EmbedNote" in embed_index
    else:
        assert embed_index is None
    assert forced == set(testbed.rls_tables(variant)) >= {"notes", "chunks", "attachments", "vaults", "api_keys"}
    assert {p["tablename"] for p in policies} == forced
    assert all("current_setting('app.current_tenant'::text, true)" in p["qual"] for p in policies)
    assert newest == testbed.migration_versions(variant)[-1]
    assert [r["tableowner"] for r in owners] == [testbed.OWNER_ROLE]


@pytest.mark.anyio
async def test_each_variant_has_the_columns_indexes_and_oban_table_of_its_release(
    seeded: Seeded, older: Seeded, admin_dsn: str
) -> None:
    await check_schema(seeded.dsn, "synthetic-next")
    await check_schema(older.dsn, "older")
    async with testbed.scratch_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await testbed.create_engram_schema(conn, variant="0.18.1")
            await testbed.create_roles(conn, dsn.rsplit("/", 1)[-1])
            await testbed.create_roles(conn, dsn.rsplit("/", 1)[-1])  # idempotent: roles are shared
        finally:
            await conn.close()
        await check_schema(dsn, "0.18.1")


@pytest.mark.anyio
async def test_an_unknown_variant_is_refused(admin_dsn: str) -> None:
    async with testbed.scratch_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            with pytest.raises(ValueError, match="unknown Engram schema variant"):
                await testbed.create_engram_schema(conn, variant="0.1")  # type: ignore[arg-type]
        finally:
            await conn.close()


@pytest.mark.anyio
async def test_row_level_security_hides_rows_from_every_role_without_bypass(seeded: Seeded) -> None:
    total = sum(seeded.report.notes_per_user.values())
    user = seeded.report.user_ids[0]
    for role, expected in (
        (testbed.APP_ROLE, 0),
        (testbed.OWNER_ROLE, 0),
        (testbed.SUPER_ROLE, total),
        (testbed.BACKUP_ROLE, total),
    ):
        rows = await fetch(seeded.as_role(role), "SELECT count(*) AS n FROM notes")
        assert rows[0]["n"] == expected, role
    conn = await asyncpg.connect(seeded.as_role(testbed.APP_ROLE))
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 3
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant', $1, true)", str(user))
            assert await conn.fetchval("SELECT count(*) FROM notes") == seeded.report.notes_per_user[user]
            assert await conn.fetchval("SELECT count(DISTINCT user_id) FROM chunks") == 1
        assert await conn.fetchval("SELECT count(*) FROM vaults") == 0
        attributes = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls, rolinherit FROM pg_roles WHERE rolname = current_user"
        )
        assert attributes is not None and tuple(attributes) == (False, False, False)
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_every_seeded_note_decrypts_with_its_users_dek_and_matches_its_content_hash(seeded: Seeded) -> None:
    report, master = seeded.report, seeded.master_key
    for row in await fetch(seeded.dsn, "SELECT id, encrypted_dek, dek_version FROM users"):
        assert ec.wrap_format(row["encrypted_dek"]) == "v2" and row["dek_version"] == 1
        assert ec.unwrap_dek(master, row["encrypted_dek"], row["id"]) == report.deks[row["id"]]
    notes = await fetch(seeded.dsn, "SELECT * FROM notes")
    samples = {s.id: s for s in report.sample_notes}
    assert {(s.kind, s.deleted) for s in samples.values()} >= {("note", False), ("note", True), ("folder", False)}
    for note in notes:
        cipher = ec.FieldCipher(report.deks[note["user_id"]])
        assert note["dek_version"] == 2
        plain = {
            f: cipher.decrypt(note[f"{f}_ciphertext"], note[f"{f}_nonce"], ec.RowField("notes", f, note["id"], 2))
            for f in NOTE_FIELDS
            if note[f"{f}_ciphertext"] is not None
        }
        assert note["folder_hmac"] == ec.path_hmac(report.deks[note["user_id"]], plain["folder"].decode())
        if note["kind"] == "folder":
            assert set(plain) == {"folder"} and note["path_hmac"] is None
            continue
        dek = report.deks[note["user_id"]]
        assert ec.check_content_hash(dek, plain["content"], note["content_hash"]) == "match"
        assert note["path_hmac"] == ec.path_hmac(dek, plain["path"].decode())
        assert note["dense_indexed_hash"] == note["embed_hash"]
        if note["id"] in samples:
            sample = samples[note["id"]]
            assert (plain["content"], plain["title"].decode()) == (sample.content, sample.title)
            assert tuple(ec.decode_tags(plain["tags"])) == sample.tags
    live = [n for n in notes if n["kind"] == "note" and n["deleted_at"] is None]
    embedded = sum(n["embed_hash"] == n["content_hash"] for n in live)
    assert 0 < len(live) - embedded < len(live) // 5, "mostly embedded, a few stale or never embedded"
    assert sum(n["deleted_at"] is not None and n["kind"] == "note" for n in notes) == report.deleted_notes > 0
    assert len(notes) == report.counts["notes"] == 300


@pytest.mark.anyio
async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(seeded: Seeded) -> None:
    rows = await fetch(
        seeded.dsn, "SELECT id, user_id, content_ciphertext, content_nonce FROM notes WHERE kind = 'note' LIMIT 2"
    )
    donor, target = rows
    cipher = ec.FieldCipher(seeded.report.deks[donor["user_id"]])
    with pytest.raises(ec.DecryptFailed):
        moved = ec.RowField("notes", "content", target["id"], 2)
        cipher.decrypt(donor["content_ciphertext"], donor["content_nonce"], moved)


@pytest.mark.anyio
async def test_chunks_attachments_and_vaults_are_consistent_with_their_notes(seeded: Seeded) -> None:
    report = seeded.report
    orphans = await fetch(
        seeded.dsn,
        "SELECT count(*) AS n FROM chunks c LEFT JOIN notes n ON n.id = c.note_id"
        " WHERE n.id IS NULL OR n.embed_hash IS NULL OR n.deleted_at IS NOT NULL OR n.kind <> 'note'",
    )
    assert orphans[0]["n"] == 0 and report.counts["chunks"] > 0
    for vault in await fetch(seeded.dsn, "SELECT * FROM vaults"):
        cipher = ec.FieldCipher(report.deks[vault["user_id"]])
        name = ec.RowField("vaults", "name", vault["id"], 2)
        assert cipher.decrypt(vault["name_ciphertext"], vault["name_nonce"], name)
        top = await fetch(seeded.dsn, "SELECT max(seq) AS s FROM notes WHERE vault_id = $1", vault["id"])
        assert vault["change_seq"] >= (top[0]["s"] or 0)
    assert len(report.deleted_vault_ids) == 1
    blobs = await fetch(
        seeded.dsn,
        "SELECT a.id, a.user_id, a.vault_id, a.content_nonce, a.content_hash, a.size_bytes, a.storage_key, o.data"
        " FROM attachments a LEFT JOIN storage_objects o USING (storage_key)",
    )
    for blob in blobs:
        if blob["storage_key"] is None:
            continue
        assert blob["storage_key"] == f"{blob['user_id']}/{blob['vault_id']}/objects/{blob['id']}"
        dek = report.deks[blob["user_id"]]
        field = ec.RowField("attachments", "content", blob["id"], 2)
        plain = ec.decrypt_field(dek, blob["data"], blob["content_nonce"], field)
        assert len(plain) == blob["size_bytes"] and ec.content_hash(dek, plain) == blob["content_hash"]
    assert report.counts["storage_objects"] == sum(b["storage_key"] is not None for b in blobs) > 0


@pytest.mark.anyio
async def test_the_newest_canary_verifies_with_the_master_key_and_no_other(seeded: Seeded) -> None:
    rows = await fetch(seeded.dsn, "SELECT wrapped_dek, dek_sha256 FROM system_canaries ORDER BY id DESC")
    assert len(rows) == 2, "one current canary above one left by a rotated-away master key"
    newest, retired = rows
    assert newest["dek_sha256"] == seeded.report.canary_dek_sha256
    assert ec.check_canary(seeded.master_key, newest["wrapped_dek"], newest["dek_sha256"]) == "match"
    assert ec.check_canary(secrets.token_bytes(32), newest["wrapped_dek"], newest["dek_sha256"]) == "wrong_key"
    assert ec.check_canary(seeded.master_key, retired["wrapped_dek"], retired["dek_sha256"]) == "wrong_key"


@pytest.mark.anyio
async def test_oban_holds_embed_jobs_in_each_state_and_finished_cron_runs(seeded: Seeded) -> None:
    jobs = await fetch(seeded.dsn, "SELECT state::text, worker, queue, args, priority, max_attempts FROM oban_jobs")
    embed = [j for j in jobs if j["worker"] == "Engram.Workers.EmbedNote"]
    assert {j["state"] for j in embed} == {
        *("available", "scheduled", "executing", "retryable", "completed", "discarded", "cancelled"),
    }
    assert all(j["queue"] == "embed" and j["max_attempts"] == 5 for j in embed)
    incomplete = await fetch(
        seeded.dsn,
        "SELECT (args->>'note_id')::uuid AS note_id FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'"
        " AND state IN ('available', 'scheduled', 'executing', 'retryable')",
    )
    assert sorted(r["note_id"] for r in incomplete) == sorted(seeded.report.embed_job_note_ids)
    assert sum(j["worker"] == "Engram.Workers.ReconcileEmbeddings" and j["state"] == "completed" for j in jobs) == 3


@pytest.mark.anyio
async def test_an_older_schema_seeds_what_it_can_hold_and_s3_objects_are_handed_back(older: Seeded) -> None:
    report = older.report
    assert report.folder_markers == 0 and report.counts["storage_objects"] == 0
    keys = await fetch(older.dsn, "SELECT id, user_id, content_nonce, storage_key FROM attachments")
    assert sorted(k for k, _ in report.attachment_objects) == sorted(r["storage_key"] for r in keys)
    row = keys[0]
    data = dict(report.attachment_objects)[row["storage_key"]]
    dek = report.deks[row["user_id"]]
    field = ec.RowField("attachments", "content", row["id"], 2)
    assert ec.decrypt_field(dek, data, row["content_nonce"], field).startswith(b"\x89PNG")
    assert [r["n"] for r in await fetch(older.dsn, "SELECT count(*) AS n FROM notes")] == [300]


@pytest.mark.anyio
async def test_seeding_needs_a_connection_that_sees_every_row(seeded: Seeded) -> None:
    conn = await asyncpg.connect(seeded.as_role(testbed.OWNER_ROLE))
    try:
        with pytest.raises(ValueError, match="superuser or a BYPASSRLS"):
            await testbed.seed(conn, master_key=seeded.master_key, users=1, vaults_per_user=1, notes=1, attachments=0)
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_twenty_thousand_notes_seed_in_batches(admin_dsn: str) -> None:
    started = time.perf_counter()
    async for db in build(admin_dsn, "synthetic-next", users=2, vaults_per_user=2, notes=20_000, attachments=0,
                          batch_size=5_000):
        assert db.report.counts["notes"] == 20_000
        total = time.perf_counter() - started
        print(f"\n20,000 notes: seed {db.report.seconds:.1f} s, {total:.1f} s with schema and roles")


@pytest.mark.anyio
async def test_demo_builds_a_small_deployment_and_refuses_a_used_database(admin_dsn: str) -> None:
    async with testbed.scratch_database(admin_dsn, prefix="engram_demo_test") as dsn:
        key = secrets.token_bytes(32)
        report = await testbed.demo(dsn, key)
        assert (len(report.user_ids), report.counts["notes"]) == (3, 200)
        assert report.canary_dek_sha256 is not None
        with pytest.raises(ValueError, match="already has Engram tables"):
            await testbed.demo(dsn, key)


@pytest.mark.anyio
async def test_scratch_databases_are_dropped_even_while_connected(admin_dsn: str) -> None:
    async with testbed.scratch_database(admin_dsn) as dsn:
        name = dsn.rsplit("/", 1)[-1]
        lingering = await asyncpg.connect(dsn)
        assert await lingering.fetchval("SELECT current_database()") == name
    assert not await fetch(admin_dsn, "SELECT 1 FROM pg_database WHERE datname = $1", name)
    assert lingering.is_closed() or not await _alive(lingering)


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return False
    finally:
        await conn.close()
    return True


def test_dsn_for_switches_database_and_role_and_drops_the_password() -> None:
    admin = "postgresql://postgres:secret@127.0.0.1:5432/postgres?sslmode=disable"
    assert testbed.dsn_for(admin, "engram_x") == "postgresql://postgres:secret@127.0.0.1:5432/engram_x?sslmode=disable"
    assert testbed.dsn_for(admin, "engram_x", user=testbed.APP_ROLE) == (
        "postgresql://engram_app@127.0.0.1:5432/engram_x?sslmode=disable"
    )
    with pytest.raises(ValueError):
        testbed.dsn_for("host=localhost dbname=x", "y")


def test_a_seaweedfs_takes_a_whole_sessions_worth_of_buckets() -> None:
    # Each bucket is a SeaweedFS collection with volumes of its own; at `weed mini`'s default volume
    # limit, PutObject answered InternalError after some 65 buckets, failing whichever S3 test came late.
    import boto3

    from engram_recovery.testbed.seaweedfs import seaweedfs

    with seaweedfs() as weed:
        s3 = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=weed.access_key_id,
                          aws_secret_access_key=weed.secret_access_key, region_name="us-east-1")  # fmt: skip
        for i in range(120):
            s3.create_bucket(Bucket=f"many-{i:03d}")
            s3.put_object(Bucket=f"many-{i:03d}", Key="blob", Body=b"x" * 64)
        assert s3.get_object(Bucket="many-119", Key="blob")["Body"].read() == b"x" * 64
