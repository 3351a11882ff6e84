"""The plan token: the premises a restore plan was verified under, carried and sealed.

`ptk2.<base64url(canonical premises JSON)>.<mac>`: the token itself says which
recovery point, target database and choices the plan named, so run_restore can
redo the plan from the token alone, recompute the premises and refuse a token
whose premises no longer hold (another manifest, key, target state or tool
version). The MAC is an HMAC under a key derived from the master key, so the
premises cannot be altered or forged without it; a plan made without a master key
gets a plain hash instead, which run_restore refuses (it needs the key anyway).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime

from pydantic import BaseModel, ValidationError

from ..engram import crypto as engram_crypto
from ..errors import ConfigurationError, UnsafeOperation
from ..repository.manifest import Manifest
from .plan import Observed

PREFIX = "ptk2"
_SUBKEY_LABEL = b"engram-recovery-plan-token-v2"
REPLAN = "run plan_restore again and use the plan_token it returns"


class Premises(BaseModel):
    """What the plan token is bound to: a change in any of these invalidates the plan."""

    backup_id: str
    manifest_sha256: str
    key_fingerprint: str | None
    target_database: str
    target_state: str
    target_server_major: int | None
    pg_restore_major: int | None
    allow_non_empty_target: bool
    app_version: str | None
    work_dir: str | None = None
    # recovery_point="at:<time>": the time recovered to (backup_id is then Barman's base backup id); None for a dump.
    point_in_time: datetime | None = None

    @property
    def recovery_point(self) -> str:
        """What plan_restore was asked for, to plan it again."""
        return f"at:{self.point_in_time.isoformat()}" if self.point_in_time else self.backup_id


def _canonical(premises: Premises) -> bytes:
    return json.dumps(premises.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def _mac(canonical: bytes, key: bytes | None) -> str:
    if key is None:
        return "h-" + hashlib.sha256(canonical).hexdigest()
    subkey = hmac.digest(key, _SUBKEY_LABEL, "sha256")
    return base64.urlsafe_b64encode(hmac.digest(subkey, canonical, "sha256")).decode().rstrip("=")


def plan_token(premises: Premises, key: bytes | None) -> str:
    """The premises, sealed: an HMAC under the master key when there is one, so they cannot be forged."""
    canonical = _canonical(premises)
    payload = base64.urlsafe_b64encode(canonical).decode().rstrip("=")
    return f"{PREFIX}.{payload}.{_mac(canonical, key)}"


def verify_plan_token(token: str, premises: Premises, key: bytes | None) -> bool:
    """True only if `token` was issued for exactly these premises (and this key)."""
    return hmac.compare_digest(token.encode(), plan_token(premises, key).encode())


def open_plan_token(token: str, key: bytes) -> Premises:
    """The premises a token carries, once its MAC under `key` is proven; refused (with the fix) otherwise."""
    parts = token.strip().split(".")
    if parts[0] == "ptk1":
        raise ConfigurationError("this plan_token comes from an older plan_restore that did not record its premises",
                                 f"re-plan: {REPLAN}")  # fmt: skip
    if len(parts) != 3 or parts[0] != PREFIX:
        raise ConfigurationError("plan_token is not a token plan_restore issued", REPLAN)
    try:
        canonical = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError("plan_token is damaged (its premises do not decode)", REPLAN) from exc
    if parts[2].startswith("h-"):
        raise ConfigurationError("this plan_token was issued without a master key, so it proves nothing",
                                 "set ENCRYPTION_MASTER_KEY (or ENCRYPTION_MASTER_KEY_FILE), then " + REPLAN)
    if not hmac.compare_digest(parts[2].encode(), _mac(canonical, key).encode()):
        raise UnsafeOperation("plan_token was not issued under this ENCRYPTION_MASTER_KEY, or was altered: "
                              "nothing was changed", REPLAN)  # fmt: skip
    try:
        return Premises.model_validate_json(canonical)
    except ValidationError as exc:
        raise ConfigurationError("plan_token carries premises this version cannot read", REPLAN) from exc


def premises_of(manifest: Manifest, observed: Observed, work_dir: str | None = None) -> Premises:
    keys = observed.keys
    return Premises(
        backup_id=manifest.backup_id,
        manifest_sha256=observed.manifest_sha256,
        key_fingerprint=engram_crypto.key_fingerprint(keys.current) if keys.current else None,
        target_database=observed.target.database,
        target_state=observed.target.state,
        target_server_major=observed.target.server_major,
        pg_restore_major=observed.tools.pg_restore_major,
        allow_non_empty_target=observed.allow_non_empty_target,
        app_version=observed.app_version,
        work_dir=work_dir,
    )


def changed(planned: Premises, now: Premises, *, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Which premises differ, each as 'name: planned -> now' (pure)."""
    a, b = planned.model_dump(), now.model_dump()
    return [f"{name}: {a[name]!r} -> {b[name]!r}" for name in a if name not in ignore and a[name] != b[name]]
