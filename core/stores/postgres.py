"""The one place that talks to PostgreSQL (through asyncpg).

Everything else asks this module for a connection and gets our own exceptions
back, with the DSN's password scrubbed.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from ..errors import RecoveryError, StoreUnreachable


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted (for the names SQL cannot take as parameters)."""
    return '"' + name.replace('"', '""') + '"'


def with_database(dsn: str, database: str) -> str:
    """The same connection URL pointing at another database of the server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


CONNECT_TIMEOUT = 5.0

Connection = asyncpg.Connection
PostgresError = asyncpg.PostgresError
InterfaceError = asyncpg.InterfaceError


async def connect(dsn: str, *, connect_timeout: float = CONNECT_TIMEOUT, **kwargs: Any) -> asyncpg.Connection:
    """Open one connection, turning every way it can fail into `StoreUnreachable`."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=connect_timeout, **kwargs)
    except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise connect_failure(exc, dsn) from exc
    return conn


def _where(dsn: str) -> tuple[str, str]:
    """(host:port, user) of a DSN for messages; never the password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the host in DATABASE_URL", "the user in DATABASE_URL"
    return f"{host}:{port}", parts.username or "the default user"


def connect_failure(exc: BaseException, dsn: str) -> StoreUnreachable:
    """Why a connection could not be opened, each common cause with its own fix."""
    where, user = _where(dsn)
    text = str(exc)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StoreUnreachable(
            f"PostgreSQL at {where} rejected the password of role {user!r}",
            "check the user and password in DATABASE_URL (or DATABASE_URL_FILE)",
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return StoreUnreachable(
            f"PostgreSQL at {where} has no database of that name ({text})",
            "check the database name at the end of DATABASE_URL; `psql -l` lists the databases",
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError) and "does not exist" in text:
        return StoreUnreachable(
            f"PostgreSQL at {where} has no role {user!r} ({text})",
            "check the user name in DATABASE_URL (Engram's compose file uses 'engram')",
        )
    if isinstance(exc, asyncpg.PostgresError) and ("no encryption" in text or "SSL off" in text):
        return StoreUnreachable(
            f"PostgreSQL at {where} requires TLS for this connection ({text})",
            "add ?sslmode=require to DATABASE_URL",
        )
    if isinstance(exc, asyncpg.PostgresError):
        return StoreUnreachable(f"PostgreSQL at {where} refused the connection: {text}", "check DATABASE_URL")
    if isinstance(exc, socket.gaierror):
        return StoreUnreachable(
            f"the host name in DATABASE_URL ({where}) does not resolve from this machine",
            "a compose service name such as 'postgres' resolves only inside the compose network: run this tool "
            "in that network (docker compose run), or publish the database port and use 127.0.0.1:<port>",
        )
    if isinstance(exc, ConnectionRefusedError):
        return StoreUnreachable(
            f"nothing accepts connections at {where} (connection refused)",
            "start PostgreSQL, or correct the host and port in DATABASE_URL",
        )
    if "SSL" in text or "TLS" in text:
        return StoreUnreachable(
            f"PostgreSQL at {where} does not offer TLS ({text})",
            "remove sslmode=require from DATABASE_URL or enable ssl on the server",
        )
    if isinstance(exc, TimeoutError):
        return StoreUnreachable(
            f"PostgreSQL at {where} did not answer within {CONNECT_TIMEOUT:g} s",
            "check that the host and port in DATABASE_URL are reachable from here (firewall, VPN, published port)",
        )
    return StoreUnreachable(
        f"PostgreSQL at {where} is unreachable: {exc.__class__.__name__}: {text}",
        "check that the database server is running and that DATABASE_URL names its host and port",
    )


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
                raise connect_failure(exc, self._dsn) from exc
        return self._pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get()
        try:
            # The pool opens connections lazily: this is where a wrong database, role or password shows.
            conn = await pool.acquire(timeout=CONNECT_TIMEOUT)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise connect_failure(exc, self._dsn) from exc
        try:
            # The proxy behaves as a Connection; asyncpg's stubs type it separately.
            yield cast(asyncpg.Connection, conn)
        except (OSError, asyncpg.InterfaceError) as exc:
            raise StoreUnreachable(
                f"the connection to PostgreSQL was lost: {exc.__class__.__name__}: {exc}",
                "check that the database server is still running, then run it again",
            ) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)

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
    if isinstance(exc, asyncpg.QueryCanceledError):
        return StoreUnreachable(
            f"PostgreSQL cancelled a statement: {exc} (statement_timeout or a cancel request)",
            "raise statement_timeout for this role (ALTER ROLE ... SET statement_timeout = 0) or run at a quieter "
            "time; the operation changed nothing",
        )
    if isinstance(exc, asyncpg.DiskFullError):
        return StoreUnreachable(
            f"the PostgreSQL server is out of disk space: {exc}", "free space on the database server's volume"
        )
    return RecoveryError(f"PostgreSQL error: {exc}", "see the message above; the operation changed nothing")
