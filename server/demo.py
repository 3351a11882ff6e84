"""`engram-recovery demo`: a demo Engram database, its env file, and the server against it.

It creates (or recreates) the database `engram_demo` with the test bed's
Engram schema and realistic encrypted data, writes `.demo/engram.env` that
points every setting at it, prints backup_status, then serves MCP over
Streamable HTTP on 127.0.0.1 with a token it generated.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio

from ..core import engram_crypto
from ..core.errors import ConfigurationError
from ..core.settings import load_settings

DEMO_DB = "engram_demo"


def _with_db(admin_url: str, db: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _secret_file(path: Path, make: str) -> str:
    if not path.exists():
        path.write_text(make + "\n", encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


async def _prepare(admin_url: str, directory: Path, database: str) -> Path:
    from .. import testbed
    from ..core.postgres import connection

    key_b64 = (directory / "master.key").read_text(encoding="utf-8").strip()
    async with connection(admin_url) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = _with_db(admin_url, database)
    await testbed.demo(dsn, engram_crypto.decode_master_key(key_b64))
    env = directory / "engram.env"
    env.write_text(
        "# Written by `engram-recovery demo`: the settings of the demo deployment.\n"
        f"DATABASE_URL={dsn}\n"
        f"ENCRYPTION_MASTER_KEY_FILE={(directory / 'master.key').resolve()}\n"
        f"ENGRAM_RECOVERY_REPOSITORY={(directory / 'backups').resolve()}\n"
        f"ENGRAM_RECOVERY_QDRANT_PATH={(directory / 'qdrant').resolve()}\n"
        f"ENGRAM_RECOVERY_HTTP_TOKEN_FILE={(directory / 'http.token').resolve()}\n"
        "ENGRAM_RECOVERY_KEY_ESCROW=demo key file .demo/master.key,printed copy in the demo safe\n",
        encoding="utf-8",
    )
    return env


def run_demo(admin_url: str, directory: str, *, serve: bool, database: str = DEMO_DB) -> int:
    from .cli import _call
    from .transports import serve as serve_mcp

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _secret_file(root / "master.key", engram_crypto.encode_master_key(secrets.token_bytes(32)))
    _secret_file(root / "http.token", secrets.token_hex(32))
    if not database.replace("_", "").isalnum():
        raise ConfigurationError(
            f"demo database name {database!r} is not a plain identifier", "use letters, digits and _"
        )
    env_file = anyio.run(_prepare, admin_url, root, database)
    print(f"demo: database {database} created; settings in {env_file}", file=sys.stderr)
    settings = load_settings(environ={k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL",
                                       "ENGRAM_RECOVERY_", "ENCRYPTION_", "STORAGE_", "QDRANT_"))},
                             env_file=env_file)
    print("demo: backup_status says:", file=sys.stderr)
    # A fresh demo has no backup yet, so its status fails; that is the demo's point, not an error of it.
    anyio.run(_call, settings, "backup_status", {})
    if not serve:
        return 0
    print(
        json.dumps({"url": f"http://{settings.http_host}:{settings.http_port}/mcp",
                    "authorization": "Bearer <contents of .demo/http.token>",
                    "stdio": f"engram-recovery --env-file {env_file} serve"}, indent=2),
        file=sys.stderr,
    )
    serve_mcp(settings, http=True)
    return 0
