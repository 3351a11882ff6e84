"""`engram-recovery backups`: a table for people, JSON for machines, exit 2 with cause and fix when it cannot read.

Real backups of an Engram test bed whose attachments live on SeaweedFS, kept in
an S3 repository on SeaweedFS; the command runs as a process with only the
repository's settings (no DATABASE_URL).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import pytest
from support import EngramDB, engram_env, make_engram_db

from engram_recovery.core.progress import silent
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.run_backup import RunBackupInput, RunBackupResult, run_backup

EXE = str(Path(sys.executable).with_name("engram-recovery"))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env})  # fmt: skip


async def _arun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(_run, args, env)


async def new_bucket(weed: SeaweedFS, objects: dict[str, bytes]) -> str:
    bucket = f"cat-{secrets.token_hex(4)}"
    location = s3.S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, bucket)
    async with s3.client(location) as client:
        await client.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            await client.put_object(Bucket=bucket, Key=key, Body=data)
    return bucket


@pytest.fixture
async def s3_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=20, attachments=6):
        yield db


@pytest.mark.anyio
async def test_backups_lists_an_s3_repository_as_a_table_and_as_json_without_a_database(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    objects = dict(s3_db.report.attachment_objects)
    source = await new_bucket(weed, objects)
    repository = await new_bucket(weed, {})
    host, port = weed.endpoint.removeprefix("http://").split(":")
    repo_env = {
        "ENGRAM_RECOVERY_REPOSITORY": f"s3://{repository}/engram", "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": weed.endpoint,
        "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": weed.access_key_id,
        "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": weed.secret_access_key,
    }  # fmt: skip
    env = engram_env(
        s3_db, tmp_path, STORAGE_BACKEND="s3", STORAGE_BUCKET=source, STORAGE_HOST=host, STORAGE_PORT=port,
        STORAGE_SCHEME="http://", STORAGE_ACCESS_KEY_ID=weed.access_key_id,
        STORAGE_SECRET_ACCESS_KEY=weed.secret_access_key, **repo_env,
    )  # fmt: skip
    results: list[RunBackupResult] = []
    for _ in range(2):
        runtime = Runtime(load_settings(environ=env))
        try:
            results.append(await run_backup(runtime, RunBackupInput(), silent))
        finally:
            await runtime.aclose()
    older, newer = results

    listed = await _arun(["backups", "--json"], repo_env)
    assert listed.returncode == 0, listed.stderr
    view = json.loads(listed.stdout)
    assert view["repository"].startswith(f"s3://{repository}/engram")
    assert [b["backup_id"] for b in view["backups"]] == [newer.backup_id, older.backup_id]
    entry = view["backups"][0]
    assert entry["attachments_backend"] == "s3" and entry["attachment_objects"] == len(objects)
    assert entry["attachment_bytes"] == sum(len(data) for data in objects.values())
    assert entry["size_bytes"] == newer.stored_bytes and entry["encrypted"] is False
    assert entry["verified"]["how"] == "at write" and entry["retention"]["action"] == "keep"

    shown = await _arun(["backups"], repo_env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "SNAPSHOT", "(UTC)"]
    assert lines[2].startswith(str(newer.backup_id)) and lines[3].startswith(str(older.backup_id))
    assert "custom/zstd" in lines[2] and "ok at write" in lines[2] and "keep (newest verified, last 1" in lines[2]
    assert "2 complete, 0 incomplete, 0 unreadable" in shown.stdout
    assert weed.secret_access_key not in shown.stdout + listed.stdout


def test_backups_of_an_absent_repository_says_there_are_none(tmp_path: Path) -> None:
    shown = _run(["backups"], {"ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "none-yet")})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("no backups yet") and str(tmp_path / "none-yet") in shown.stdout


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("file", "is not a directory"),
        ("unreachable s3", "S3 is unreachable"),
        ("s3 without credentials", "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID"),
    ],
)
def test_backups_exits_2_with_one_line_of_cause_and_one_of_fix(tmp_path: Path, case: str, expected: str) -> None:
    secret = "repo-secret-" + secrets.token_hex(6)
    (tmp_path / "a-file").write_text("x")
    env = {
        "file": {"ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "a-file")},
        "unreachable s3": {"ENGRAM_RECOVERY_REPOSITORY": "s3://bucket/engram",
                           "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
                           "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": "id",
                           "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": secret},
        "s3 without credentials": {"ENGRAM_RECOVERY_REPOSITORY": "s3://bucket/engram"},
    }[case]  # fmt: skip
    result = _run(["backups"], env)
    assert result.returncode == 2
    assert result.stdout == ""
    cause, fix = result.stderr.rstrip("\n").split("\n")
    assert cause.startswith("engram-recovery: ") and expected in cause
    assert fix.startswith("Fix: ")
    assert "Traceback" not in result.stderr and secret not in result.stderr
