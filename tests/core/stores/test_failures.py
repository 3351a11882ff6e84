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


@pytest.mark.parametrize(
    ("code", "error", "message", "hint"),
    [
        ("AccessDenied", {}, ["denied access"], ["s3:ListBucket"]),
        ("InvalidAccessKeyId", {}, ["refused the credentials"], []),
        ("NoSuchBucket", {}, ["does not exist"], ["create the bucket"]),
        ("AuthorizationHeaderMalformed", {"Region": "eu-west-1"}, ["another region than 'us-east-1'", "eu-west-1"],
         ["STORAGE_REGION", "ENGRAM_RECOVERY_REPOSITORY_REGION"]),
    ],
)  # fmt: skip
def test_each_s3_refusal_has_its_own_message_and_fix(
    code: str, error: dict[str, str], message: list[str], hint: list[str]
) -> None:
    where = s3.S3Location(endpoint=None, access_key_id="AKIA", secret_access_key="s3-secret-1", region="us-east-1",
                          bucket="engram-attachments")  # fmt: skip
    translated = s3.translate(_client_error(code, **error), "list the bucket", where)
    assert all(part in translated.message for part in message), translated.message
    assert all(part in translated.hint for part in hint), translated.hint
    assert "s3-secret-1" not in str(translated)


@pytest.mark.parametrize(
    ("exc", "message", "hint"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), "the disk is full (/tmp/x)", "free space"),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/r"), "permission denied (/srv/r)", ""),
        (ExceptionGroup("in a task group", [OSError(errno.ENOSPC, "full")]), "the disk is full", ""),
    ],
    ids=["disk full", "permission denied", "inside a task group"],
)
def test_unexpected_exceptions_are_explained_by_kind(exc: BaseException, message: str, hint: str) -> None:
    explained = failures.explain(exc, "run_backup")
    assert message in explained.message and hint in explained.hint


def test_an_exception_of_no_known_kind_is_a_bug_report_with_its_type() -> None:
    bug = failures.explain(KeyError("oops"), "plan_restore")
    assert bug.message == "plan_restore failed unexpectedly: KeyError: 'oops'" and "--debug" in bug.hint
