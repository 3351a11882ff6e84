"""The exceptions operators see.

Every failure the tools anticipate is a `RecoveryError`: a message that names the
problem and a hint that names the fix. The server turns them into MCP tool errors
and the CLI into exit code 2; driver exceptions are caught at the store boundary
and re-raised as one of these, with credentials scrubbed.
"""

from __future__ import annotations

import re


class RecoveryError(Exception):
    """A failure an operator can act on."""

    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(scrub(message))
        self.message = scrub(message)
        self.hint = scrub(hint)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nFix: {self.hint}"
        return self.message


class ConfigurationError(RecoveryError):
    """A setting is missing, malformed or contradicts another."""

    kind = "configuration"


class StoreUnreachable(RecoveryError):
    """Postgres, S3, Qdrant or the backup repository did not answer."""

    kind = "unreachable"


class IntegrityError(RecoveryError):
    """Data is not what it claims to be: a checksum, a key or a manifest disagrees."""

    kind = "integrity"


class UnsafeOperation(RecoveryError):
    """The operation would destroy or hide data without an explicit confirmation."""

    kind = "unsafe"


class Busy(RecoveryError):
    """Another run holds the lock this one needs."""

    kind = "busy"


class NotImplementedYet(RecoveryError):
    """A registered tool whose behaviour has not landed."""

    kind = "not_implemented"


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")
_KEYVALUE_SECRET = re.compile(
    r"(?i)(?P<k>password|passwd|secret|token|api[_-]?key|master[_-]?key|aws_secret_access_key)"
    r"(?P<sep>\s*[=:]\s*)(?P<v>[^\s,;'\"]+)"
)
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that `scrub` removes it wherever it appears."""
    if value and len(value) >= 4:
        _registered.add(value)


def scrub(text: str) -> str:
    """Remove credentials from text that may reach an operator, a log or a manifest."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _KEYVALUE_SECRET.sub(lambda m: f"{m['k']}{m['sep']}***", text)
    for secret in sorted(_registered, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
