"""The manifest: one JSON document per recovery point that binds everything together.

It is written last; its presence is what makes a backup complete. It holds no
secret: the boot canary it records is a wrapped key (useless without the master
key) and lets plan_restore check a master key with no database at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = "engram-recovery/manifest@1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Artifact(_Model):
    name: str = Field(description="Path relative to the backup's folder, e.g. 'db.dump.zst.enc'.")
    kind: Literal["database", "attachments_inventory", "attachments_blob", "other"]
    size: int = Field(description="Bytes as stored in the repository.")
    sha256: str = Field(description="Lowercase hex SHA-256 of the stored bytes.")
    compression: Literal["zstd", "gzip", "none"] = "none"
    encryption: Literal["aes-256-gcm-chunked@1"] | None = None
    plain_size: int | None = Field(default=None, description="Bytes after decryption and decompression.")


class DatabaseInfo(_Model):
    name: str
    server_version: str
    server_major: int
    pg_dump_version: str = Field(description="`pg_dump --version` of the client that wrote the dump.")
    pg_dump_path: str | None = Field(default=None, description="That client's path (configured, PATH or bundled).")
    dump_format: Literal["custom", "directory", "plain"]
    wal_lsn_start: str | None = None
    engram_schema_version: int | None = None
    oban_version: int | None = None
    role: str
    row_counts: dict[str, int] = Field(default_factory=dict)
    roles_referenced: list[str] = Field(default_factory=list, description="Roles the dump's GRANT/OWNER name.")
    owner: str | None = Field(default=None, description="The source database's owner: a restore gives it the same.")
    object_owners: list[str] | None = Field(default=None, description="Roles owning the dumped objects; restoring "
                                            "as another role needs membership in each (None: not recorded).")
    extensions: list[str] | None = Field(default=None, description="Extensions the dump creates (None: not recorded).")
    row_security_tables: list[str] | None = Field(
        default=None, description="Tables with row-level security: restoring their rows needs BYPASSRLS or a superuser."
    )
    size_bytes: int | None = Field(default=None, description="pg_database_size at the snapshot.")
    snapshot_at: datetime | None = Field(default=None, description="Server clock when the snapshot was taken.")
    dump_artifacts: list[str] = Field(
        default_factory=list,
        description="Artifact names of the dump: one file (custom, plain) or one per file of a directory dump.",
    )
    dump_bytes: int | None = Field(default=None, description="Bytes pg_dump wrote, before compression.")


class AttachmentsInfo(_Model):
    backend: Literal["database", "s3"]
    source_bucket: str | None = None
    source_endpoint: str | None = None
    source_versioned: bool | None = None
    inventory: str | None = Field(default=None, description="Artifact name of the inventory (JSON lines).")
    objects: int = 0
    bytes: int = 0
    repository_prefix: str | None = Field(default=None, description="Where the mirrored blobs live.")
    in_database_dump: bool = Field(
        default=False, description="STORAGE_BACKEND=database: the attachment bytes are rows of the dump."
    )
    inventory_sha256: str | None = None
    copied_objects: int | None = None
    copied_bytes: int | None = None
    lacking: int | None = Field(
        default=None,
        description="Live attachment rows (not deleted, with a storage key) whose blob was not at the source "
        "(bucket or storage_objects) when the backup was taken: this backup lacks them. None: not recorded.",
    )
    lacking_keys: list[str] = Field(default_factory=list, description="The first of those storage keys.")


class CanaryInfo(_Model):
    present: bool
    id: str | None = None
    wrapped_dek_b64: str | None = None
    dek_sha256_hex: str | None = None
    wrap_format: str | None = None
    inserted_at: datetime | None = None
    matches_configured_key: bool | None = Field(
        default=None, description="The master key configured at backup time unwrapped this canary (None: no key)."
    )


class QdrantInfo(_Model):
    configured: bool
    collection: str | None = None
    exists: bool | None = None
    points: int | None = None
    dense_size: int | None = None
    distance: str | None = None
    sparse: list[str] = Field(default_factory=list)


class ObanInfo(_Model):
    embed_backlog: int | None = None
    by_state: dict[str, int] = Field(default_factory=dict)


class Manifest(_Model):
    format: str = MANIFEST_FORMAT
    backup_id: str
    tool_version: str
    started_at: datetime
    finished_at: datetime
    database: DatabaseInfo
    attachments: AttachmentsInfo
    canary: CanaryInfo
    qdrant: QdrantInfo
    oban: ObanInfo
    master_key_fingerprint: str | None = Field(
        default=None, description="Short non-reversible fingerprint of the master key that unwrapped the canary."
    )
    backup_key_fingerprint: str | None = None
    artifacts: list[Artifact]
    total_bytes: int
    durations: dict[str, float] = Field(default_factory=dict)
    verified: bool | None = Field(default=None, description="Artifacts re-read and their SHA-256 matched.")
    verified_at: datetime | None = None
    warnings: list[str] = Field(default_factory=list, description="What the operator should know about this point.")

    def artifact(self, name: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == name), None)
