"""Each common failure is named with its own fix: real ones where this machine can produce them.

A full disk (a tiny tmpfs), a repository that cannot be written (/sys), TLS that the
server does not offer, a statement timeout: real. Failures this machine's servers cannot
produce (a rejected password on a trust-only PostgreSQL, a pg_hba rule demanding TLS,
S3's AccessDenied and wrong-region answers that SeaweedFS does not give) are checked on
the drivers' own exception objects, as those servers raise them.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from botocore.exceptions import ClientError
from mcp import Client
from support import EngramDB, engram_env, fingerprints

from engram_recovery.core.errors import StoreUnreachable
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import failures, postgres, s3
from engram_recovery.server.app import build_server


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def unwritable() -> Path:
    """sysfs: nothing can be created there, even by root (file modes would not stop root)."""
    probe = Path("/sys/engram-recovery-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("/sys accepts new directories here")


@pytest.mark.anyio
async def test_a_full_repository_disk_is_named_and_leaves_nothing_half_written(
    engram_db: EngramDB, tmp_path: Path, tiny_volume: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(tiny_volume / "repo"),
                     ENGRAM_RECOVERY_QDRANT_PATH="")
    before = await fingerprints(engram_db.dsn)
    async with Client(build_server(load_settings(environ=env))) as client:
        result = await client.call_tool("run_backup", {"compression": "none"})
    text = " ".join(getattr(b, "text", "") for b in result.content)
    assert result.is_error and "is full" in text and "free space there" in text, text
    assert not list((tiny_volume / "repo").rglob("manifest.json"))
    assert await fingerprints(engram_db.dsn) == before


@pytest.mark.anyio
async def test_a_repository_that_cannot_be_written_is_named(
    engram_db: EngramDB, tmp_path: Path, unwritable: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(unwritable / "engram-backups"))
    async with Client(build_server(load_settings(environ=env))) as client:
        result = await client.call_tool("run_backup", {})
    text = " ".join(getattr(b, "text", "") for b in result.content)
    assert result.is_error and "not writable" in text and "give this process write access" in text, text


@pytest.mark.anyio
async def test_tls_the_server_does_not_offer_is_named(engram_db: EngramDB) -> None:
    with pytest.raises(StoreUnreachable) as raised:
        await postgres.connect(engram_db.dsn + "?sslmode=require")
    assert "does not offer TLS" in raised.value.message and "sslmode" in raised.value.hint


def test_password_rejected_and_tls_required_are_named_as_the_server_raises_them() -> None:
    dsn = "postgresql://engram:pw-secret-7@db.example:5432/engram"
    rejected = postgres.connect_failure(asyncpg.InvalidPasswordError('password authentication failed for user'), dsn)
    assert "rejected the password of role 'engram'" in rejected.message and "password in DATABASE_URL" in rejected.hint
    tls = postgres.connect_failure(asyncpg.InvalidAuthorizationSpecificationError(
        'no pg_hba.conf entry for host "10.0.0.9", user "engram", database "engram", no encryption'), dsn)
    assert "requires TLS" in tls.message and "sslmode=require" in tls.hint
    assert "pw-secret-7" not in str(rejected) + str(tls)


def _client_error(code: str, **error: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code, **error}}, "ListObjectsV2")


def test_s3_access_denied_no_such_bucket_and_wrong_region_each_have_their_fix() -> None:
    where = s3.S3Location(endpoint=None, access_key_id="AKIA", secret_access_key="s3-secret-1", region="us-east-1",
                          bucket="engram-attachments")
    denied = s3.translate(_client_error("AccessDenied"), "list the bucket", where)
    assert "denied access" in denied.message and "s3:ListBucket" in denied.hint
    keys = s3.translate(_client_error("InvalidAccessKeyId"), "list the bucket", where)
    assert "refused the credentials" in keys.message
    missing = s3.translate(_client_error("NoSuchBucket"), "list the bucket", where)
    assert "does not exist" in missing.message and "create the bucket" in missing.hint
    region = s3.translate(_client_error("AuthorizationHeaderMalformed", Region="eu-west-1"), "list the bucket", where)
    assert "another region than 'us-east-1'" in region.message and "eu-west-1" in region.message
    assert "STORAGE_REGION" in region.hint and "ENGRAM_RECOVERY_REPOSITORY_REGION" in region.hint


def test_unexpected_exceptions_are_explained_by_kind() -> None:
    full = failures.explain(OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), "run_backup")
    assert "the disk is full (/tmp/x)" in full.message and "free space" in full.hint
    denied = failures.explain(PermissionError(errno.EACCES, "Permission denied", "/srv/r"), "run_backup")
    assert "permission denied (/srv/r)" in denied.message
    grouped = failures.explain(ExceptionGroup("in a task group", [OSError(errno.ENOSPC, "full")]), "run_backup")
    assert "the disk is full" in grouped.message
    bug = failures.explain(KeyError("oops"), "plan_restore")
    assert bug.message == "plan_restore failed unexpectedly: KeyError: 'oops'" and "--debug" in bug.hint
