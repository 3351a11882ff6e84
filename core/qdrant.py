"""The one place that talks to Qdrant (through qdrant-client).

A real server when QDRANT_URL is set; the local (embedded) mode when
ENGRAM_RECOVERY_QDRANT_PATH is set (":memory:" or a directory), which is what
the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from .errors import ConfigurationError, RecoveryError, StoreUnreachable
from .settings import Settings

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
        return AsyncQdrantClient(location=":memory:") if settings.qdrant_path == ":memory:" else (
            AsyncQdrantClient(path=settings.qdrant_path)
        )
    if settings.qdrant_url:
        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return AsyncQdrantClient(url=settings.qdrant_url, api_key=api_key, timeout=5)
    raise ConfigurationError(
        "Qdrant is not configured", "set QDRANT_URL (or ENGRAM_RECOVERY_QDRANT_PATH for an embedded Qdrant)"
    )


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
