"""stdio and Streamable HTTP.

HTTP is bound to loopback unless told otherwise and always needs a bearer token
(compared in constant time) and a trusted `Origin`, because a backup server can
read every note's ciphertext and drop databases.
"""

from __future__ import annotations

import hmac
import logging
import sys
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.errors import ConfigurationError
from ..core.runtime import Runtime
from ..core.settings import Settings
from .app import build_server

log = logging.getLogger("engram_recovery.http")


class BearerAndOrigin:
    """ASGI middleware: 401 without the right bearer token, 403 for an untrusted browser Origin."""

    def __init__(self, app: ASGIApp, token: str, allowed_origins: tuple[str, ...]) -> None:
        self._app = app
        self._token = token.encode()
        self._origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and origin not in self._origins:
            await _plain(send, 403, "Forbidden: untrusted Origin (add it to ENGRAM_RECOVERY_HTTP_ALLOWED_ORIGINS)")
            return
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
            await _plain(send, 401, "Unauthorized: send 'Authorization: Bearer <ENGRAM_RECOVERY_HTTP_TOKEN>'",
                         extra=[(b"www-authenticate", b'Bearer realm="engram-recovery"')])
            return
        await self._app(scope, receive, send)


async def _plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    *(extra or [])],
    })
    await send({"type": "http.response.body", "body": body})


def http_app(server: MCPServer[Runtime], settings: Settings, host: str, port: int) -> ASGIApp:
    if settings.http_token is None or len(settings.http_token.get_secret_value()) < 16:
        raise ConfigurationError(
            "serving HTTP needs ENGRAM_RECOVERY_HTTP_TOKEN (at least 16 characters)",
            "set ENGRAM_RECOVERY_HTTP_TOKEN or ENGRAM_RECOVERY_HTTP_TOKEN_FILE, e.g. to the output of "
            "`openssl rand -hex 32`",
        )
    origins = settings.http_allowed_origins or (
        f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}",
    )
    hosts = [f"{host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", host]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=host in ("127.0.0.1", "localhost", "::1"),
        allowed_hosts=hosts,
        allowed_origins=list(origins),
    )
    inner = server.streamable_http_app(transport_security=security, host=host)
    return BearerAndOrigin(inner, settings.http_token.get_secret_value(), tuple(origins))


def serve(
    settings: Settings | ConfigurationError, *, http: bool, host: str | None = None, port: int | None = None
) -> None:
    """Serve stdio (settings may be the ConfigurationError to answer every call with) or HTTP."""
    server = build_server(settings)
    if not http:
        anyio.run(server.run_stdio_draining)
        return
    if isinstance(settings, ConfigurationError):
        raise settings
    import uvicorn

    bind_host = host or settings.http_host
    bind_port = port or settings.http_port
    app: Any = http_app(server, settings, bind_host, bind_port)
    print(f"engram-recovery: serving MCP on http://{bind_host}:{bind_port}/mcp (bearer token required)",
          file=sys.stderr)
    uvicorn.run(app, host=bind_host, port=bind_port, log_level="warning")
