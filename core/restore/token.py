"""The plan token: binds a restore plan to the premises it was verified under.

A later execution recomputes the premises and refuses a token that no longer
matches them (another manifest, key, target state or tool version). With a
master key the token is an HMAC under a key derived from it, so it cannot be
forged by someone who does not hold the key; without one it is a plain hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from pydantic import BaseModel

from ..engram import crypto as engram_crypto
from ..repository.manifest import Manifest
from .plan import Observed


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


def plan_token(premises: Premises, key: bytes | None) -> str:
    """A token bound to the premises; keyed by the master key when there is one, so it cannot be forged."""
    canonical = json.dumps(premises.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    if key is None:
        return "ptk1.h." + hashlib.sha256(canonical).hexdigest()
    subkey = hmac.digest(key, b"engram-recovery-plan-token-v1", "sha256")
    return "ptk1.m." + hmac.digest(subkey, canonical, "sha256").hex()


def verify_plan_token(token: str, premises: Premises, key: bytes | None) -> bool:
    """True only if `token` was issued for exactly these premises (and this key)."""
    return hmac.compare_digest(token.encode(), plan_token(premises, key).encode())


def premises_of(manifest: Manifest, observed: Observed) -> Premises:
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
    )
