"""backup_status's checks of the other stores: the attachments (database or S3) and Qdrant."""

from __future__ import annotations

import json
from typing import Any

from ..engram.schema_probe import SchemaProbe
from ..verdict import Verdict
from .common import Check, StatusContext

# --- attachments --------------------------------------------------------------------------


async def check_attachments(ctx: StatusContext) -> Check:
    settings = ctx.runtime.settings
    p = await ctx.probe()
    details: dict[str, Any] = {"backend": settings.storage_backend}
    estimates: list[str] = []
    if settings.storage_backend == "database":
        async with ctx.runtime.pool.acquire() as conn:
            details["storage_objects_bytes"] = await conn.fetchval(
                "SELECT pg_total_relation_size('storage_objects')"
            ) if p.has_table("storage_objects") else None
            details["storage_objects_estimate"] = p.estimates.get("storage_objects")
            estimates.append("storage_objects_estimate")
            if ctx.deep and p.has_table("storage_objects") and p.has_table("attachments"):
                details["missing_blobs"] = await conn.fetchval(
                    "SELECT count(*) FROM attachments a WHERE a.storage_key IS NOT NULL AND a.deleted_at IS NULL "
                    "AND NOT EXISTS (SELECT 1 FROM storage_objects o WHERE o.storage_key = a.storage_key)"
                )
                details["unreferenced_blobs"] = await conn.fetchval(
                    "SELECT count(*) FROM storage_objects o "
                    "WHERE NOT EXISTS (SELECT 1 FROM attachments a WHERE a.storage_key = o.storage_key)"
                )
        if not p.has_table("storage_objects"):
            return Check(
                component="attachments", status="fail", details=details,
                summary="STORAGE_BACKEND is 'database' but this database has no storage_objects table: "
                "is DATABASE_URL Engram's database, or should STORAGE_BACKEND be 's3'?",
            )
        summary = "attachments are stored in PostgreSQL (storage_objects): every database backup includes them"
        return drift_verdict(details, summary, estimates)

    # Imported only for an S3 backend: aioboto3 would be most of a database-backend `call`'s start-up.
    from ..stores import s3

    location = ctx.runtime.attachments_location()
    assert location is not None  # settings validation requires the credentials for s3
    details |= {"bucket": location.bucket, "endpoint": location.endpoint}
    try:
        async with s3.client(location) as client:
            await client.head_bucket(Bucket=location.bucket)
            details["versioning"] = await s3.versioning_status(client, location.bucket)
            count = size = 0
            keys: set[str] = set()
            truncated = False
            if ctx.deep:
                async for obj in s3.list_objects(client, location.bucket):
                    count, size = count + 1, size + obj.size
                    keys.add(obj.key)
            else:
                page = await client.list_objects_v2(Bucket=location.bucket, MaxKeys=1000)
                for item in page.get("Contents", ()):
                    count, size = count + 1, size + int(item["Size"])
                truncated = bool(page.get("IsTruncated"))
    except s3.S3_ERRORS as exc:
        raise s3.translate(exc, "check the attachments bucket", location) from exc
    details["objects"] = count if not truncated else f"more than {count} (exact with deep=true)"
    details["bytes"] = size if not truncated else f"more than {size} (exact with deep=true)"
    if ctx.deep and p.has_table("attachments"):
        async with ctx.runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT storage_key FROM attachments WHERE storage_key IS NOT NULL AND deleted_at IS NULL"
            )
        referenced = {r["storage_key"] for r in rows}
        blob_keys = {k for k in keys if "/objects/" in k}
        missing = sorted(referenced - keys)
        orphans = sorted(blob_keys - referenced)
        details["missing_blobs"] = len(missing)
        details["unreferenced_blobs"] = len(orphans)
        details["missing_examples"] = missing[:5]
        details["unreferenced_examples"] = orphans[:5]
    summary = f"bucket {location.bucket} reachable, versioning {details['versioning']}, {details['objects']} objects"
    checked = drift_verdict(details, summary, estimates)
    if details["versioning"] != "Enabled" and checked.status == "ok":
        checked.status = "warn"
        checked.summary += (
            "; versioning is off: an overwritten or deleted attachment cannot be recovered from the bucket itself "
            "(enable it with put-bucket-versioning)"
        )
    return checked


def drift_verdict(details: dict[str, Any], summary: str, estimates: list[str]) -> Check:
    missing = details.get("missing_blobs") or 0
    orphans = details.get("unreferenced_blobs") or 0
    status: Verdict = "ok"
    if missing:
        status = "fail"
        summary += f"; {missing} attachment row(s) point to a blob that does not exist"
    if orphans:
        status = "warn" if status == "ok" else status
        summary += f"; {orphans} blob(s) are referenced by no attachment row"
    if "missing_blobs" not in details:
        summary += " (cross-store drift not checked: pass deep=true)"
    return Check(component="attachments", status=status, summary=summary, details=details, estimates=estimates)


# --- qdrant -------------------------------------------------------------------------------


async def check_qdrant(ctx: StatusContext) -> Check:
    settings = ctx.runtime.settings
    if not settings.qdrant_url and not settings.qdrant_path:
        return Check(
            component="qdrant", status="warn",
            summary="Qdrant is not configured here (QDRANT_URL unset): vectors cannot be checked; they can always "
            "be rebuilt from PostgreSQL with reindex_qdrant",
        )
    p = await ctx.probe()
    details: dict[str, Any] = {"collection": settings.qdrant_collection}
    estimates = ["chunks"]
    async with ctx.runtime.pool.acquire() as conn:
        if ctx.deep:
            details["chunks"] = await conn.fetchval("SELECT count(*) FROM chunks")
            estimates = []
        else:
            details["chunks"] = p.estimates.get("chunks")
        details["notes_waiting_for_embedding"] = await waiting_for_embedding(conn, p, ctx.deep)
        if not ctx.deep:
            estimates.append("notes_waiting_for_embedding")
    # Imported only when Qdrant is configured: qdrant_client alone costs a cron `call` about half a second.
    from ..stores import qdrant

    try:
        state = await qdrant.collection_state(ctx.runtime.qdrant(), settings.qdrant_collection)
    except qdrant.QDRANT_ERRORS as exc:
        raise qdrant.translate(exc, "read the collection") from exc
    if not state.exists:
        return Check(
            component="qdrant", status="warn", details=details, estimates=estimates,
            summary=f"collection {settings.qdrant_collection} does not exist: semantic search has no vectors. "
            "Rebuild it with reindex_qdrant (Engram creates the collection on the first embed)",
        )
    details |= {"points": state.points, "dense_size": state.dense_size, "status": state.status}
    status: Verdict = "ok"
    summary = f"collection {settings.qdrant_collection}: {state.points} points beside ~{details['chunks']} chunks"
    chunks = details["chunks"] or 0
    waiting = details["notes_waiting_for_embedding"] or 0
    if state.points is not None and chunks and state.points < 0.9 * chunks:
        status = "warn"
        summary += (
            f": vectors are missing; ~{waiting} note(s) are waiting for embedding, so a rebuild may be draining "
            "(see the oban check's backlog). If the backlog is 0, run reindex_qdrant(mode='missing')"
            if waiting
            else ": vectors are missing, run reindex_qdrant(mode='missing')"
        )
    return Check(component="qdrant", status=status, summary=summary, details=details, estimates=estimates)


async def waiting_for_embedding(conn: Any, p: SchemaProbe, exact: bool) -> int | None:
    if not p.has_column("notes", "embed_hash"):
        return None
    where = "deleted_at IS NULL AND embed_hash IS DISTINCT FROM content_hash"
    if p.has_column("notes", "kind"):
        where += " AND kind = 'note'"
    if exact:
        return int(await conn.fetchval(f"SELECT count(*) FROM notes WHERE {where}"))
    # The planner's estimate costs no scan; the exact count is a deep check.
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM notes WHERE {where}")
    return int(json.loads(plan)[0]["Plan"]["Plan Rows"])
