"""The one place that talks to Qdrant (through qdrant-client).

A real server when QDRANT_URL is set; the local (embedded) mode when
ENGRAM_RECOVERY_QDRANT_PATH is set (":memory:" or a directory), which is what
the tests use.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ..errors import ConfigurationError, RecoveryError, StoreUnreachable
from ..settings import Settings

QDRANT_ERRORS = (ResponseHandlingException, UnexpectedResponse, OSError, TimeoutError, ValueError)


@dataclass(frozen=True)
class CollectionState:
    exists: bool
    points: int | None = None
    dense_size: int | None = None
    dense_distance: str | None = None
    sparse: tuple[str, ...] = ()
    status: str | None = None


def open_client(settings: Settings) -> AsyncQdrantClient:
    if settings.qdrant_path:
        if settings.qdrant_path == ":memory:":
            return AsyncQdrantClient(location=":memory:")
        in_use = StoreUnreachable(
            f"the embedded Qdrant folder {settings.qdrant_path} is in use by another process",
            "wait for the other engram-recovery call to finish, or point QDRANT_URL at a Qdrant server (which "
            "admits many clients); Qdrant is optional: backups, plans and drills do not need it",
        )
        # Embedded Qdrant locks its folder: one process at a time (e.g. the demo's server holds it). Asked
        # first, because the client leaks its lock file's handle when it finds the folder locked.
        if _folder_locked(Path(settings.qdrant_path)):
            raise in_use
        try:
            return AsyncQdrantClient(path=settings.qdrant_path)
        except RuntimeError as exc:
            raise in_use from exc
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"ENGRAM_RECOVERY_QDRANT_PATH={settings.qdrant_path} cannot be opened: {exc}",
                "point ENGRAM_RECOVERY_QDRANT_PATH at a writable directory (or ':memory:'), or unset it",
            ) from exc
    if settings.qdrant_url:
        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        try:
            # We report reachability ourselves; the client's background version probe only warns from a thread.
            return AsyncQdrantClient(url=settings.qdrant_url, api_key=api_key, timeout=5, check_compatibility=False)
        except ValueError as exc:
            raise ConfigurationError(
                f"QDRANT_URL={settings.qdrant_url!r} is not a usable URL: {exc}",
                "set QDRANT_URL to the Qdrant server, e.g. http://127.0.0.1:6333",
            ) from exc
    raise ConfigurationError(
        "Qdrant is not configured", "set QDRANT_URL (or ENGRAM_RECOVERY_QDRANT_PATH for an embedded Qdrant)"
    )


def _folder_locked(folder: Path) -> bool:
    """Whether another client holds the embedded folder's lock (the `flock` qdrant-client takes on `.lock`)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR)
    except OSError:
        return False  # no lock file yet: nobody has opened the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's own lock with the descriptor
    return False


def translate(exc: Exception, what: str) -> RecoveryError:
    return StoreUnreachable(
        f"Qdrant did not answer while trying to {what}: {exc.__class__.__name__}",
        "check that Qdrant is running and that QDRANT_URL (and QDRANT_API_KEY) are right",
    )


async def collection_state(client: AsyncQdrantClient, name: str) -> CollectionState:
    if not await client.collection_exists(name):
        return CollectionState(exists=False)
    info = await client.get_collection(name)
    vectors = info.config.params.vectors
    size: int | None = None
    distance: str | None = None
    if isinstance(vectors, dict) and "dense" in vectors:
        size, distance = vectors["dense"].size, str(vectors["dense"].distance.value)
    elif vectors is not None and not isinstance(vectors, dict):
        size, distance = vectors.size, str(vectors.distance.value)
    sparse = tuple((info.config.params.sparse_vectors or {}).keys())
    count = await client.count(name, exact=True)
    return CollectionState(
        exists=True,
        points=count.count,
        dense_size=size,
        dense_distance=distance,
        sparse=sparse,
        status=str(info.status.value) if info.status else None,
    )


# --- rebuild support (reindex_qdrant) ----------------------------------------------------

DENSE_VECTOR = "dense"
SPARSE_VECTOR = "keyword"
RETRIEVE_PAGE = 512


async def recreate_collection(client: AsyncQdrantClient, name: str, dense_size: int) -> int | None:
    """Drop `name` if it exists and create it as Engram does; returns the points dropped."""
    dropped: int | None = None
    if await client.collection_exists(name):
        dropped = (await client.count(name, exact=True)).count
        await client.delete_collection(name)
    await client.create_collection(
        name,
        vectors_config={DENSE_VECTOR: models.VectorParams(size=dense_size, distance=models.Distance.COSINE)},
        sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams()},
    )
    return dropped


async def existing_point_ids(client: AsyncQdrantClient, name: str, ids: Sequence[str]) -> set[str]:
    """Which of `ids` are points of `name`, asked in pages (no payloads, no vectors)."""
    if not ids or not await client.collection_exists(name):
        return set()
    found: set[str] = set()
    for start in range(0, len(ids), RETRIEVE_PAGE):
        points = await client.retrieve(
            name, ids=list(ids[start : start + RETRIEVE_PAGE]), with_payload=False, with_vectors=False
        )
        found.update(str(p.id) for p in points)
    return found


async def scroll_points(
    client: AsyncQdrantClient, name: str, page: int = 1_000
) -> AsyncIterator[list[tuple[str, str | None]]]:
    """Every point of `name` as (id, payload user_id), one page at a time."""
    if not await client.collection_exists(name):
        return
    offset: models.ExtendedPointId | None = None
    while True:
        points, offset = await client.scroll(
            name, limit=page, offset=offset, with_payload=["user_id"], with_vectors=False
        )
        if points:
            yield [(str(p.id), _user_of(p.payload)) for p in points]
        if offset is None:
            return


async def delete_points(client: AsyncQdrantClient, name: str, ids: Sequence[str]) -> None:
    if ids:
        await client.delete(name, points_selector=models.PointIdsList(points=list(ids)), wait=True)


def _user_of(payload: dict[str, Any] | None) -> str | None:
    value = (payload or {}).get("user_id")
    return str(value) if value is not None else None
