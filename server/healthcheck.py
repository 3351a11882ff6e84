"""The container's HEALTHCHECK: is the MCP HTTP server up and refusing callers without the token?

`python -m engram_recovery.server.healthcheck [URL]` asks `URL` (default http://127.0.0.1:
$ENGRAM_RECOVERY_HTTP_PORT/mcp) with no credentials and is healthy only on the server's 401 with
its `Bearer` challenge: that proves the process answers HTTP and the bearer check is in force,
without the token in the healthcheck's command line or environment. Standard library only, so a
check every 30 s costs a few milliseconds, not the package's import time.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    request = urllib.request.Request(url, headers={"Accept": "application/json, text/event-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return False, f"{url} answered {response.status} without a token: the bearer check is not in force"
    except urllib.error.HTTPError as exc:
        challenge = exc.headers.get("WWW-Authenticate", "")
        if exc.code == 401 and challenge.lower().startswith("bearer"):
            return True, f"{url} is up and asks for its bearer token"
        return False, f"{url} answered {exc.code}, not the expected 401 with a Bearer challenge"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url} did not answer: {reason}"


def main(argv: list[str]) -> int:
    port = os.environ.get("ENGRAM_RECOVERY_HTTP_PORT", "8765")
    url = argv[0] if argv else f"http://127.0.0.1:{port}/mcp"
    healthy, message = check(url)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
