"""`engram-recovery decrypt backup:<id>`: a recovery point's dump, read from the repository and
checked against its manifest, as the stock file pg_dump wrote (core/artifact/extract.py does each
artifact)."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread

from ..artifact.extract import Extracted, extract, plain_name
from ..errors import StoreUnreachable
from ..repository.base import Repository
from ..repository.layout import backup_prefix, manifest_key
from ..repository.manifest import Manifest


async def extract_backup(repo: Repository, backup_id: str, key: bytes | None, output: Path) -> list[Extracted]:
    """The database dump of a recovery point, checked against its manifest, as stock pg_dump output.

    A custom or plain dump becomes the file `output`; a directory dump becomes the directory `output`.
    """
    folder = backup_prefix(backup_id)
    if not await repo.exists(manifest_key(backup_id)):
        raise StoreUnreachable(
            f"there is no complete backup {backup_id} in {repo.location}",
            "list the recovery points with backup_status, and pass one of their ids",
        )
    manifest = Manifest.model_validate_json(await repo.get_bytes(manifest_key(backup_id)))
    names = manifest.database.dump_artifacts
    if manifest.database.dump_format == "directory":
        await anyio.to_thread.run_sync(lambda: output.mkdir(mode=0o700, parents=True, exist_ok=True))
    results: list[Extracted] = []
    for name in names:
        artifact = manifest.artifact(name)
        assert artifact is not None
        target = output / plain_name(name.split("/", 1)[1]) if manifest.database.dump_format == "directory" else output
        results.append(await extract(repo.get_stream(folder + name), key, target, artifact.sha256))
    return results
