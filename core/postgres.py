"""The one place that talks to PostgreSQL (through asyncpg).

Everything else asks this module for a connection and gets our own exceptions
back, with the DSN's password scrubbed.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg

from .errors import RecoveryError, StoreUnreachable

CONNECT_TIMEOUT = 5.0

Connection = asyncpg.Connection
PostgresError = asyncpg.PostgresError


async def connect(dsn: str, *, connect_timeout: float = CONNECT_TIMEOUT, **kwargs: Any) -> asyncpg.Connection:
    """Open one connection, turning every way it can fail into `StoreUnreachable`."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=connect_timeout, **kwargs)
    except asyncpg.InvalidPasswordError as exc:
        raise StoreUnreachable(
            "PostgreSQL rejected the credentials in DATABASE_URL", "check the user and password in DATABASE_URL"
        ) from exc
    except asyncpg.InvalidCatalogNameError as exc:
        raise StoreUnreachable(
            f"PostgreSQL has no database of that name ({exc})", "check the database name in DATABASE_URL"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise StoreUnreachable(f"PostgreSQL refused the connection: {exc}", "check DATABASE_URL") from exc
    except (OSError, TimeoutError, socket.gaierror, asyncpg.InterfaceError) as exc:
        raise StoreUnreachable(
            f"PostgreSQL is unreachable: {exc.__class__.__name__}: {exc}",
            "check that the database server is running and that DATABASE_URL names its host and port",
        ) from exc
    return conn


@asynccontextmanager
async def connection(dsn: str, **kwargs: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(dsn, **kwargs)
    try:
        yield conn
    finally:
        await conn.close(timeout=2)


class Pool:
    """A lazily opened pool: a server whose database is down still starts, and says so per call."""

    def __init__(self, dsn: str, *, max_size: int = 4) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def _get(self) -> asyncpg.Pool:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=0, max_size=self._max_size, timeout=CONNECT_TIMEOUT
                )
            except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
                # Delegate to `connect` for the operator-facing wording of each failure.
                conn = await connect(self._dsn)
                await conn.close()
                raise StoreUnreachable(f"PostgreSQL pool could not start: {exc}", "check DATABASE_URL") from exc
        return self._pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get()
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                # The proxy behaves as a Connection; asyncpg's stubs type it separately.
                yield cast(asyncpg.Connection, conn)
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise StoreUnreachable(
                f"PostgreSQL is unreachable: {exc.__class__.__name__}: {exc}",
                "check that the database server is running",
            ) from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def describe(exc: asyncpg.PostgresError) -> RecoveryError:
    """A database error as an operator-facing one (insufficient privilege gets its own advice)."""
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return RecoveryError(
            f"PostgreSQL denied access: {exc}",
            "connect as the database owner, a superuser, or a role with BYPASSRLS",
        )
    return RecoveryError(f"PostgreSQL error: {exc}", "see the message above; the operation changed nothing")
