"""run_restore's point-in-time pieces without Barman: the target server's major, the comparison with the recovered
server, and the attachments roll-back on real SeaweedFS buckets (an unversioned bucket is left as it is; a row with no
version at the time is named, and an object changed since is copied back from its version of then)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from support import EngramDB, bucket_contents, bucket_env, engram_env, make_engram_db, new_bucket

from engram_recovery.core.progress import silent
from engram_recovery.core.restore.pitr_plan import target_server_check
from engram_recovery.core.restore.pitr_run import Catalog, Comparison, rollback_attachments
from engram_recovery.core.restore.plan import KeyMaterial
from engram_recovery.core.restore.run_steps import Context, DumpSource, RestoreRequest, RestoreStep
from engram_recovery.core.restore.token import Premises
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS


def test_the_target_server_must_be_the_base_backups_major_or_newer() -> None:
    older = target_server_check(17, 18)
    assert older is not None and older.status == "fail" and older.code == "target_server_too_old"
    same = target_server_check(18, 18)
    assert same is not None and same.status == "ok"
    assert target_server_check(None, 18) is None and target_server_check(18, None) is None


def test_the_comparison_names_what_the_target_lacks_and_every_count_that_differs() -> None:
    objects = {"table": frozenset({"public.notes", "public.users"}), "index": frozenset({"public.notes_pkey"}),
               "constraint": frozenset({"public.notes.notes_pkey"})}  # fmt: skip
    reference = Catalog(objects, {"public.notes": 5, "public.users": 2})
    assert not Comparison(reference, reference).missing and not Comparison(reference, reference).counts_wrong
    assert "every row count equal to the recovered server's" in Comparison(reference, reference).summary
    restored = Catalog(objects | {"index": frozenset()}, {"public.notes": 4, "public.users": 2})
    check = Comparison(reference, restored)
    assert check.missing == ["index public.notes_pkey"] and check.counts_wrong == {"public.notes": (5, 4)}
    assert "missing: index public.notes_pkey" in check.summary and "row counts differ" in check.summary


@pytest.fixture
async def s3_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=10, attachments=4):
        yield db


async def _roll_back(db: EngramDB, where: S3Location, tmp_path: Path, moment: datetime) -> RestoreStep:
    """The attachments step of a point-in-time run whose target is `db` (its rows say which keys matter)."""
    env = engram_env(db, tmp_path, **bucket_env(where))
    premises = Premises(backup_id="b", manifest_sha256="x", key_fingerprint=None, target_database=db.name,
                        target_state="absent", target_server_major=18, pg_restore_major=None,
                        allow_non_empty_target=False, app_version=None, point_in_time=moment)  # fmt: skip
    async with Runtime(load_settings(environ=env)) as runtime:
        ctx = Context(runtime=runtime, repo=None, request=RestoreRequest(plan_token="t"),  # type: ignore[arg-type]
                      premises=premises, keys=KeyMaterial(db.master_key, None, None), run_id="t", progress=silent,
                      own_partial=False, source=DumpSource("b"))  # fmt: skip
        return await rollback_attachments(ctx, moment)


@pytest.mark.anyio
async def test_an_unversioned_bucket_is_left_as_it_is_and_said_so(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    objects = dict(s3_db.report.attachment_objects)
    gone = sorted(objects)[0]
    where = await new_bucket(weed, {k: v for k, v in objects.items() if k != gone}, versioned=False)
    before = await bucket_contents(where)
    step = await _roll_back(s3_db, where, tmp_path, datetime.now(UTC))
    assert step.status == "warn" and "is not versioned: no attachment can be rolled back" in step.summary
    assert step.details["versioned"] is False and step.details["absent_now"] == [gone] and not step.changed
    assert await bucket_contents(where) == before


@pytest.mark.anyio
async def test_a_versioned_bucket_gets_its_versions_of_the_time_back_and_a_row_without_one_is_named(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    objects = dict(s3_db.report.attachment_objects)
    late, spoiled = sorted(objects)[:2]
    where = await new_bucket(weed, {k: v for k, v in objects.items() if k != late}, versioned=True)
    await anyio.sleep(1.2)  # S3 times are whole seconds
    moment = datetime.now(UTC)
    await anyio.sleep(1.2)
    async with s3.client(where) as c:
        await c.put_object(Bucket=where.bucket, Key=spoiled, Body=b"spoiled after the time")
        await c.put_object(Bucket=where.bucket, Key=late, Body=objects[late])  # uploaded only after the time
    step = await _roll_back(s3_db, where, tmp_path, moment)
    assert step.status == "warn" and step.details["lacking_keys"] == [late] and "will not open" in step.summary
    assert step.details["copied_keys"] == [spoiled] and step.changed
    assert (await bucket_contents(where))[spoiled] == objects[spoiled]
    # Again: everything is as of the time already, nothing is copied (what a resume relies on).
    again = await _roll_back(s3_db, where, tmp_path, moment)
    assert again.details["copied"] == 0 and again.details["already_as_of"] == len(objects) - 1
