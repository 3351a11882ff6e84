"""What a running server shares between tool calls: settings and store handles.

Built by the server's lifespan and closed with it. Nothing connects at import
or at start-up, so a server whose stores are down still starts and each tool
reports which store failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdrant_client import AsyncQdrantClient

from . import qdrant
from .postgres import Pool
from .s3 import S3Location
from .settings import Settings


@dataclass
class Runtime:
    settings: Settings
    pool: Pool = field(init=False)
    _qdrant: AsyncQdrantClient | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.pool = Pool(self.settings.database_url.get_secret_value())

    @property
    def dsn(self) -> str:
        return self.settings.database_url.get_secret_value()

    def attachments_location(self) -> S3Location | None:
        s = self.settings
        if s.storage_backend != "s3" or not s.storage_access_key_id or not s.storage_secret_access_key:
            return None
        return S3Location(
            endpoint=s.storage_endpoint,
            access_key_id=s.storage_access_key_id,
            secret_access_key=s.storage_secret_access_key.get_secret_value(),
            region=s.storage_region,
            bucket=s.storage_bucket,
        )

    def qdrant(self) -> AsyncQdrantClient:
        # Local mode holds a file lock on its directory: one client per process.
        if self._qdrant is None:
            self._qdrant = qdrant.open_client(self.settings)
        return self._qdrant

    async def aclose(self) -> None:
        await self.pool.close()
        if self._qdrant is not None:
            await self._qdrant.close()
            self._qdrant = None
