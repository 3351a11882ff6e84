"""What a running server shares between tool calls: settings and store handles.

Built by the server's lifespan and closed with it (`async with Runtime(settings) as runtime:`).
Nothing connects at import or at start-up, so a server whose stores are down still starts and
each tool reports which store failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from .settings import Settings
from .stores.postgres import Pool

if TYPE_CHECKING:
    # The Qdrant and S3 clients are imported when first used, not here: a `call` of a tool that needs
    # neither (backup_status on a database-backend deployment, from cron) would pay over a second for them.
    from qdrant_client import AsyncQdrantClient

    from .stores.s3 import S3Location


@dataclass
class Runtime:
    settings: Settings
    pool: Pool = field(init=False)
    _qdrant: AsyncQdrantClient | None = field(default=None, init=False)
    _calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.pool = Pool(self.settings.database_url.get_secret_value())

    @property
    def dsn(self) -> str:
        return self.settings.database_url.get_secret_value()

    def attachments_location(self) -> S3Location | None:
        s = self.settings
        if s.storage_backend != "s3" or not s.storage_access_key_id or not s.storage_secret_access_key:
            return None
        from .stores.s3 import S3Location

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
            from .stores import qdrant

            self._qdrant = qdrant.open_client(self.settings)
        return self._qdrant

    @asynccontextmanager
    async def tool_call(self) -> AsyncIterator[None]:
        """One tool call. An embedded Qdrant folder admits one process: it is released when no call runs,
        so a long-running server (the demo's) does not lock out the cron line and the inspector beside it."""
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls and self._qdrant is not None and self.settings.qdrant_path not in (None, ":memory:"):
                client, self._qdrant = self._qdrant, None
                with anyio.CancelScope(shield=True):
                    await client.close()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.pool.close()
        if self._qdrant is not None:
            await self._qdrant.close()
            self._qdrant = None
