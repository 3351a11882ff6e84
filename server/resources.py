"""MCP resources: the catalog, each backup's manifest, the restore drill records.

Resources are what an assistant (or a person in an MCP client) can read without
calling a tool: they change nothing, so they are registered in read-only access
too. Every read opens the repository afresh, so a resource is never stale. The
SDK gives static resources no request context, so each reader closes over the
settings instead of the lifespan's Runtime (the catalog needs no database).
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp_types import Annotations

from ..core.errors import RecoveryError, scrub
from ..core.settings import Settings
from ..core.status.catalog import NoSuchBackup, open_catalog

SCHEME = "engram-recovery://"
BACKUPS_URI = f"{SCHEME}backups"
MANIFEST_URI = f"{SCHEME}backups/{{backup_id}}/manifest"
DRILLS_URI = f"{SCHEME}drills"
BACKUP_DRILLS_URI = f"{SCHEME}backups/{{backup_id}}/drills"
JSON = "application/json"
_FOR_BOTH = Annotations(audience=["user", "assistant"])


def _as_resource_error(exc: RecoveryError) -> ResourceError:
    """The operator's message and fix, as the protocol error a client shows (unknown ids are 'not found')."""
    if isinstance(exc, NoSuchBackup):
        return ResourceNotFoundError(str(exc))
    return ResourceError(str(exc))


def _json(value: Any) -> str:
    return scrub(json.dumps(value, indent=2, default=str))


def register_resources(server: MCPServer[Any], settings: Settings) -> None:
    @server.resource(
        BACKUPS_URI, name="backups", title="Backup catalog", mime_type=JSON, annotations=_FOR_BOTH,
        description="Every recovery point in the backup repository, newest first: snapshot time, size, format, "
        "encryption, last verification and drill, and what retention will do to it (as the list_backups tool).",
    )
    async def backups() -> str:
        try:
            async with open_catalog(settings) as catalog:
                view = await catalog.view()
        except RecoveryError as exc:
            raise _as_resource_error(exc) from exc
        return scrub(view.model_dump_json(indent=2))

    @server.resource(
        MANIFEST_URI, name="backup_manifest", title="Backup manifest", mime_type=JSON, annotations=_FOR_BOTH,
        description="One backup's manifest as stored: versions, row counts, WAL position, artifacts with SHA-256, "
        "the attachments inventory, the boot canary (a wrapped key; no secret is in a manifest).",
    )
    async def manifest(backup_id: str) -> str:
        try:
            async with open_catalog(settings) as catalog:
                return await catalog.manifest_text(backup_id)
        except RecoveryError as exc:
            raise _as_resource_error(exc) from exc

    @server.resource(
        DRILLS_URI, name="drills", title="Restore drill records", mime_type=JSON, annotations=_FOR_BOTH,
        description="Every restore drill recorded in the repository, newest first: the backup drilled, the result, "
        "the RTO and each step.",
    )
    async def drills() -> str:
        try:
            async with open_catalog(settings) as catalog:
                return _json(await catalog.drill_records())
        except RecoveryError as exc:
            raise _as_resource_error(exc) from exc

    @server.resource(
        BACKUP_DRILLS_URI, name="backup_drills", title="Restore drills of one backup", mime_type=JSON,
        annotations=_FOR_BOTH, description="The restore drill records of one backup, newest first.",
    )
    async def backup_drills(backup_id: str) -> str:
        try:
            async with open_catalog(settings) as catalog:
                return _json(await catalog.drill_records(backup_id))
        except RecoveryError as exc:
            raise _as_resource_error(exc) from exc
