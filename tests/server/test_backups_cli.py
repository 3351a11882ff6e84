"""`engram-recovery backups`: a table for people, JSON for machines, exit 2 with cause and fix when it cannot read.

Real backups of an Engram test bed whose attachments live on SeaweedFS, kept in
an S3 repository on SeaweedFS; the command runs as a process with only the
repository's settings (no DATABASE_URL).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from support import EngramDB, arun_cli, backup, engram_env, free_port, new_bucket, repository_env, run_cli, storage_env

from engram_recovery.testbed.seaweedfs import SeaweedFS


@pytest.mark.anyio
async def test_backups_lists_an_s3_repository_as_a_table_and_as_json_without_a_database(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    objects = dict(s3_db.report.attachment_objects)
    source = (await new_bucket(weed, objects)).bucket
    repository = (await new_bucket(weed)).bucket
    repo_env = repository_env(weed, repository, "engram")
    env = engram_env(s3_db, tmp_path, **storage_env(weed, source), **repo_env)
    older, newer = [await backup(env) for _ in range(2)]

    listed = await arun_cli(["backups", "--json"], repo_env)
    assert listed.returncode == 0, listed.stderr
    view = json.loads(listed.stdout)
    assert view["repository"].startswith(f"s3://{repository}/engram")
    assert [b["backup_id"] for b in view["backups"]] == [newer.backup_id, older.backup_id]
    entry = view["backups"][0]
    assert entry["attachments_backend"] == "s3" and entry["attachment_objects"] == len(objects)
    assert entry["attachment_bytes"] == sum(len(data) for data in objects.values())
    assert entry["size_bytes"] == newer.stored_bytes and entry["encrypted"] is False
    assert entry["verified"]["how"] == "at write" and entry["retention"]["action"] == "keep"

    shown = await arun_cli(["backups"], repo_env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "SNAPSHOT", "(UTC)"]
    assert lines[2].startswith(str(newer.backup_id)) and lines[3].startswith(str(older.backup_id))
    assert "custom/zstd" in lines[2] and "ok at write" in lines[2] and "keep (newest verified, last 1" in lines[2]
    assert "2 complete, 0 incomplete, 0 unreadable" in shown.stdout
    assert weed.secret_access_key not in shown.stdout + listed.stdout


def test_backups_of_an_absent_repository_says_there_are_none(tmp_path: Path) -> None:
    shown = run_cli(["backups"], {"ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "none-yet")})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("no backups yet") and str(tmp_path / "none-yet") in shown.stdout


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
                           "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                           "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": "id",
                           "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": secret},
        "s3 without credentials": {"ENGRAM_RECOVERY_REPOSITORY": "s3://bucket/engram"},
    }[case]  # fmt: skip
    result = run_cli(["backups"], env)
    assert result.returncode == 2
    assert result.stdout == ""
    cause, fix = result.stderr.rstrip("\n").split("\n")
    assert cause.startswith("engram-recovery: ") and expected in cause
    assert fix.startswith("Fix: ")
    assert "Traceback" not in result.stderr and secret not in result.stderr
