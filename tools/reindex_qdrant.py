"""reindex_qdrant: rebuild Qdrant from PostgreSQL through Engram's own EmbedNote jobs.

Qdrant only holds vectors derived from notes, so after its loss the app must
re-embed. Enqueueing jobs is not enough: EmbedNote skips a note whose
`embed_hash` still equals its `content_hash`, so each batch also clears that
state for exactly the notes it enqueues. The Engram app does the embedding.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.progress import Progress
from ..core.reindex.run import ReindexReport, ReindexRequest, reindex
from ..core.runtime import Runtime
from .base import ToolAnnotations, ToolInput, ToolResult, ToolSpec


class ReindexInput(ToolInput):
    mode: Literal["all", "missing", "stale"] = Field(
        default="missing",
        description="'missing': notes with a chunk whose point is absent from Qdrant, and notes never embedded (no "
        "chunk, embed_hash NULL) (cheapest after a partial loss); 'all': every live note (after a total loss or a "
        "model change); 'stale': notes never embedded or changed since (embed_hash NULL or not content_hash).",
    )
    user_id: str | None = Field(default=None, description="Only this user's notes (uuid).")
    vault_id: str | None = Field(default=None, description="Only this vault's notes (uuid).")
    collection: str | None = Field(
        default=None, description="Optional safety check: must equal the configured QDRANT_COLLECTION."
    )
    recreate_collection: bool = Field(
        default=False,
        description="DESTRUCTIVE: drop the Qdrant collection and create it empty (dense vector of EMBED_DIMS, "
        "Cosine, plus the keyword sparse vector) before enqueueing; use after a dimension change or to rebuild "
        "from scratch. Implies every note is missing.",
    )
    delete_orphans: bool = Field(
        default=False, description="Also delete Qdrant points that no chunks row references (deleted notes)."
    )
    confirm: bool = Field(
        default=False, description="Without confirm=true this is a dry run that reports counts and changes nothing."
    )


class ReindexResult(ToolResult, ReindexReport):
    pass


async def reindex_qdrant(runtime: Runtime, params: ReindexInput, progress: Progress) -> ReindexResult:
    report = await reindex(runtime, ReindexRequest(**params.model_dump()), progress)
    return ReindexResult.model_validate(report.model_dump())


def confirmation(params: ReindexInput, dry: ReindexResult) -> str | None:
    """What a confirmed run would change, from the dry run; None when it would change nothing."""
    scope = "".join(
        f", {name} {value}" for name, value in (("user", params.user_id), ("vault", params.vault_id)) if value
    )
    changes: list[str] = []
    if params.recreate_collection:
        changes.append(f"DROP and recreate the Qdrant collection {dry.collection} ({dry.points_dropped or 0} "
                       "point(s) deleted)")
    if dry.notes_to_enqueue:
        changes.append(f"enqueue {dry.notes_to_enqueue} EmbedNote job(s): the Engram app re-embeds those notes, "
                       f"about {dry.estimated_tokens} embedding tokens billed")
    if dry.already_queued:
        changes.append(f"reset the embed state of {dry.already_queued} note(s) that already have a pending job")
    if dry.orphan_points:
        changes.append(f"delete {dry.orphan_points} orphan Qdrant point(s) (of notes that no longer exist)")
    if not changes:
        return None
    vaults = len(dry.per_vault)
    spread = f" across {vaults}{'+' if dry.per_vault_truncated else ''} vault(s)" if vaults else ""
    return (f"Rebuild Qdrant (mode {dry.mode}{scope}){spread}. A confirmed run will:\n- " + "\n- ".join(changes)
            + f"\nCurrent embedding backlog: {dry.backlog.total} job(s).")


SPEC = ToolSpec(
    name="reindex_qdrant",
    title="Rebuild Qdrant",
    description=(
        "Rebuild Qdrant's vectors from PostgreSQL after Qdrant was lost or restored without it, by enqueueing "
        "Engram's own EmbedNote jobs (the running Engram app embeds them; this bills embedding tokens). Modes: "
        "'missing' (notes whose points are absent from Qdrant), 'all', 'stale'; optionally scoped to a user or "
        "vault. Without confirm=true it is a dry run: it reports per user/vault how many notes would be enqueued "
        "and an estimate of the embedding tokens, and changes nothing. With confirm=true it clears the notes' "
        "embed_hash (else EmbedNote would skip them) and inserts jobs in short batches, never twice for a note (a "
        "note with a pending job is reset and counted as already_queued); "
        "recreate_collection=true first drops and recreates the collection (destructive), delete_orphans=true "
        "deletes points of notes that no longer exist. Safe to re-run after an interruption. The result's "
        "backlog says how many jobs remain; watch it drain with backup_status."
    ),
    input_model=ReindexInput,
    result_model=ReindexResult,
    run=reindex_qdrant,
    annotations=ToolAnnotations(
        title="Rebuild Qdrant", read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=True,
    ),
    writes=True,
    confirmation=confirmation,
)
