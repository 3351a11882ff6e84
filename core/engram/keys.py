"""Engram's key rules, stated once for every tool that judges a master key.

Engram reads keys two ways (lib/engram/crypto/boot_canary.ex, key_provider.ex):

* the boot canary is unwrapped with ENCRYPTION_MASTER_KEY only; a canary that
  opens only with ENCRYPTION_MASTER_KEY_PREVIOUS makes the app refuse to boot;
* a user's DEK is unwrapped with the current key, then with the previous one,
  so rows keep reading in the middle of a rotation.

backup_status (the live canary), plan_restore (the canary in the manifest) and
restore_drill (the restored canary and the sampled rows) all judge through
here, so one key gets one verdict, with one code and one wording, everywhere.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import SecretStr

from ..settings import Settings
from . import crypto as engram_crypto

KeyCode = Literal["ok", "kms_wrapped", "previous_key_only", "canary_corrupt", "wrong_key"]
Status = Literal["ok", "warn", "fail"]
Opener = Literal["current", "previous"]

PREVIOUS_ONLY = (
    "{what} opens with ENCRYPTION_MASTER_KEY_PREVIOUS, not ENCRYPTION_MASTER_KEY: Engram checks the boot canary "
    "with the current key only and would refuse to boot (PREVIOUS only opens users' keys). Boot with the previous "
    "key as ENCRYPTION_MASTER_KEY, or finish the key rotation"
)


@dataclass(frozen=True)
class MasterKeys:
    """ENCRYPTION_MASTER_KEY and ENCRYPTION_MASTER_KEY_PREVIOUS as configured, decoded here and nowhere
    else (never serialised). A malformed key is not an exception: each caller words it as its finding."""

    current: bytes | None
    current_error: str | None  # why the configured current key cannot be used (None: absent or fine)
    previous: bytes | None
    previous_error: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> MasterKeys:
        current, current_error = _decode(settings.encryption_master_key)
        previous, previous_error = _decode(settings.encryption_master_key_previous)
        return cls(current, current_error, previous, previous_error)

    @property
    def current_set(self) -> bool:
        return self.current is not None or self.current_error is not None


def _decode(secret: SecretStr | None) -> tuple[bytes | None, str | None]:
    if secret is None:
        return None, None
    try:
        return engram_crypto.decode_master_key(secret.get_secret_value()), None
    except engram_crypto.InvalidMasterKey as exc:
        return None, str(exc)


@dataclass(frozen=True)
class CanaryJudgement:
    status: Status
    code: KeyCode
    verdict: engram_crypto.CanaryVerdict  # what the current key alone concludes
    summary: str
    details: dict[str, str] = field(default_factory=dict)


def judge_canary(
    current: bytes, previous: bytes | None, wrapped: bytes, dek_sha256: bytes, *, what: str
) -> CanaryJudgement:
    """What Engram's boot would conclude about `what` (e.g. "the backup's boot canary") with these keys."""
    fingerprint = engram_crypto.key_fingerprint(current)
    verdict = engram_crypto.check_canary(current, wrapped, dek_sha256)
    details = {"fingerprint": fingerprint, "canary": verdict}
    if verdict == "match":
        return CanaryJudgement("ok", "ok", verdict, f"master key {fingerprint} unwraps {what}: Engram will boot "
                               "with it", details)  # fmt: skip
    if verdict == "kms":
        return CanaryJudgement("warn", "kms_wrapped", verdict, f"{what} is wrapped by AWS KMS, so no local key can "
                               "check it offline: make sure the KMS key and the permission to use it exist",
                               details)  # fmt: skip
    if previous is not None and engram_crypto.check_canary(previous, wrapped, dek_sha256) == "match":
        details |= {"canary_matches": "previous", "previous_fingerprint": engram_crypto.key_fingerprint(previous)}
        return CanaryJudgement("fail", "previous_key_only", verdict, PREVIOUS_ONLY.format(what=what), details)
    if verdict in ("sha_mismatch", "malformed"):
        return CanaryJudgement("fail", "canary_corrupt", verdict, f"{what} is unusable ({verdict}): it is damaged",
                               details)  # fmt: skip
    return CanaryJudgement("fail", "wrong_key", verdict, f"ENCRYPTION_MASTER_KEY (fingerprint {fingerprint}) does "
                           f"not unwrap {what}: Engram would refuse to boot and no row could be read",
                           details)  # fmt: skip


def unwrap_user_dek(
    current: bytes, previous: bytes | None, blob: bytes, user_id: str | uuid.UUID
) -> tuple[bytes, Opener]:
    """A user's DEK as Engram's key provider opens it: the current key, then the previous one."""
    try:
        return engram_crypto.unwrap_dek(current, blob, user_id), "current"
    except engram_crypto.WrongKey:
        if previous is None:
            raise
    try:
        return engram_crypto.unwrap_dek(previous, blob, user_id), "previous"
    except engram_crypto.WrongKey:
        raise engram_crypto.WrongKey(
            "the wrapped DEK opens with neither ENCRYPTION_MASTER_KEY nor ENCRYPTION_MASTER_KEY_PREVIOUS"
        ) from None
