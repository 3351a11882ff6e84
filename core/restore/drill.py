"""A restore drill's moving parts: a scratch database and the proofs (the restore itself is database.py's).

The scratch database is named `engram_drill_<unix time>_<random>`, so a drill
that died without dropping its database (a killed process) leaves a name whose
age tells the next drill it may sweep it. Nothing here touches a database whose
name does not start with that prefix.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ..artifact.codec import Decoder, decode_stream
from ..engram import crypto as engram_crypto
from ..engram import keys as key_rules
from ..engram.canary import read_canary
from ..errors import RecoveryError
from ..progress import Progress
from ..repository.base import Repository
from ..repository.manifest import Artifact, Manifest
from ..repository.records import DrillStep
from ..stores import postgres
from ..stores.postgres import quote_ident
from .schema_check import SchemaCheck

PREFIX = "engram_drill_"
_NAME = re.compile(r"^engram_drill_(\d{9,11})_[0-9a-f]{8}$")
STALE_AFTER = timedelta(hours=6)
STOCK_FIX = "the dump could not be restored with stock tools: see the message"


T = TypeVar("T")


class Steps:
    """A drill's steps as they run (the dump drill's and the point-in-time one's): each timed, recorded ok
    or failed with its cause, the client told which step is running."""

    def __init__(self, progress: Progress) -> None:
        self.steps: list[DrillStep] = []
        self.progress = progress

    async def step(self, name: str, fn: Callable[[], Awaitable[T]], done: Callable[[T], str]) -> T:
        await self.progress(len(self.steps), None, f"drill: {name}")
        started = time.perf_counter()
        try:
            value = await fn()
        except RecoveryError as exc:
            self.steps.append(DrillStep(name=name, ok=False, seconds=round(time.perf_counter() - started, 3),
                                        summary=str(exc).replace("\n", " ")))  # fmt: skip
            raise
        self.steps.append(DrillStep(name=name, ok=True, seconds=round(time.perf_counter() - started, 3),
                                    summary=done(value)))  # fmt: skip
        return value

    def proof(self, proof: Proof, seconds: float) -> None:
        self.steps.append(DrillStep(name=f"prove_{proof.name}", ok=proof.ok, seconds=round(seconds, 3),
                                    summary=proof.summary, details=proof.details, code=proof.code))  # fmt: skip

    async def prove(self, prove: Callable[[], Awaitable[Proof]]) -> None:
        await self.progress(len(self.steps), None, "drill: proving")
        started = time.perf_counter()
        self.proof(await prove(), time.perf_counter() - started)


def scratch_name(now: datetime) -> str:
    return f"{PREFIX}{int(now.timestamp())}_{secrets.token_hex(4)}"


async def create_scratch(conn: postgres.Connection, name: str, owner: str | None = None) -> str:
    """Create the scratch database, owned by `owner` (the source's owner) when that role exists; returns its owner."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a drill database name")
    exists = owner is not None and await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", owner)
    owned = f" OWNER {quote_ident(owner)}" if owner is not None and exists else ""
    try:
        await conn.execute(f"CREATE DATABASE {quote_ident(name)}{owned} TEMPLATE template0")
    except postgres.PostgresError as exc:
        raise RecoveryError(
            f"could not create the scratch database {name}{f' owned by {owner}' if owned else ''}: {exc}",
            "the drill needs a role with CREATEDB on the server of DATABASE_URL, and membership in the source "
            "database's owner (or a superuser)",
        ) from exc
    return str(await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name))


async def drop_scratch(conn: postgres.Connection, name: str) -> None:
    if not _NAME.match(name):  # never anything that is not ours
        raise ValueError(f"refusing to drop {name!r}: not a drill database")
    await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


async def sweep_leftovers(conn: postgres.Connection, now: datetime) -> list[str]:
    """Drop drill databases older than STALE_AFTER: left by drills that were killed half-way."""
    rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'engram\\_drill\\_%'")
    dropped: list[str] = []
    for row in rows:
        match = _NAME.match(row["datname"])
        if match and now.timestamp() - int(match.group(1)) > STALE_AFTER.total_seconds():
            await drop_scratch(conn, row["datname"])
            dropped.append(row["datname"])
    return dropped


async def scratch_exists(conn: postgres.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))


async def plaintext(repo: Repository, key: str, artifact: Artifact, backup_key: bytes | None) -> AsyncIterator[bytes]:
    """The artifact as pg_dump wrote it: decrypted, then decompressed, chunk by chunk (as its manifest says)."""
    decoder = Decoder(backup_key, compression=artifact.compression, encrypted=artifact.encryption is not None,
                      name=artifact.name)  # fmt: skip
    async for out in decode_stream(repo.get_stream(key), decoder):
        yield out


@dataclass
class Proof:
    name: str
    ok: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    code: str | None = None  # a machine-readable verdict where the proof has several ways to fail


async def prove_canary(conn: postgres.Connection, manifest: Manifest, keys: Keys) -> Proof:
    return await prove_canary_of(conn, manifest.canary.id, keys)


async def prove_canary_of(conn: postgres.Connection, expected_id: str | None, keys: Keys) -> Proof:
    """The restored canary under Engram's key rules; `expected_id` None where no manifest names one (a PITR)."""
    canary = await read_canary(conn)
    if canary is None:
        return Proof("canary", False, "the restored system_canaries is EMPTY: Engram would adopt any key at boot",
                     code="canary_empty")  # fmt: skip
    # Engram's boot rule: the current key only (key_rules), PREVIOUS named as its own verdict.
    judged = key_rules.judge_canary(keys.current, keys.previous, canary.wrapped_dek, canary.dek_sha256,
                                    what="the restored boot canary")  # fmt: skip
    details: dict[str, Any] = {"verdict": judged.verdict, "canary_id": canary.id} | judged.details
    if expected_id is not None and expected_id != canary.id:
        return Proof("canary", False, "the restored canary is not the one the manifest recorded", details,
                     code="canary_replaced")  # fmt: skip
    return Proof("canary", judged.code == "ok", judged.summary, details, code=judged.code)


def schema_proofs(check: SchemaCheck, counted: int) -> list[Proof]:
    """The restore engine's check (schema_check.py) as two proofs: the objects, then the `counted` row counts."""
    objects = {"tables": check.tables, "constraints": check.constraints, "indexes": check.indexes,
               "objects_from": check.objects_from}  # fmt: skip
    if check.missing:
        schema = Proof("schema", False, f"{len(check.missing)} object(s) of the backup are missing after the restore: "
                       + ", ".join(check.missing[:10]), objects | {"missing": check.missing[:50]})  # fmt: skip
    else:
        schema = Proof("schema", True, f"{check.tables} tables, {check.constraints} constraints and {check.indexes} "
                       f"indexes present ({check.objects_from})", objects)  # fmt: skip
    wrong = {t: {"manifest": expected, "restored": actual} for t, (expected, actual) in check.counts_wrong.items()}
    if wrong:
        counts = Proof("row_counts", False, f"{len(wrong)} of {counted} table(s) differ from the manifest: {wrong}",
                       wrong)  # fmt: skip
    else:
        counts = Proof("row_counts", True, f"all {counted} table counts match the manifest")
    return [schema, counts]


@dataclass(frozen=True)
class Keys:
    """The master keys the drill reads with (never serialised)."""

    current: bytes
    previous: bytes | None = None


class _Deks:
    """Users' DEKs, unwrapped once each as Engram does: the current key, then the previous one."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._cache: dict[str, engram_crypto.FieldCipher] = {}
        self._raw: dict[str, bytes] = {}
        self.by_previous: set[str] = set()

    def get(self, user_id: str, wrapped: bytes) -> tuple[engram_crypto.FieldCipher, bytes]:
        if user_id not in self._cache:
            dek, opener = key_rules.unwrap_user_dek(self.keys.current, self.keys.previous, wrapped, user_id)
            if opener == "previous":
                self.by_previous.add(user_id)
            self._raw[user_id] = dek
            self._cache[user_id] = engram_crypto.FieldCipher(dek)
        return self._cache[user_id], self._raw[user_id]

    def note(self) -> str:
        """What an operator should know about keys that opened only with PREVIOUS (mid-rotation is normal)."""
        if not self.by_previous:
            return ""
        return (f"; {len(self.by_previous)} user key(s) opened only with ENCRYPTION_MASTER_KEY_PREVIOUS, as Engram "
                "does mid-rotation: keep that key until the rotation re-wraps them")


def check_blob(deks: _Deks, table: str, row: Any, ciphertext: bytes) -> str | None:
    """None if the blob decrypts with its user's DEK and matches its content hash; else what went wrong."""
    try:
        cipher, dek = deks.get(str(row["user_id"]), bytes(row["encrypted_dek"]))
        field = engram_crypto.RowField(table, "content", uuid.UUID(str(row["id"])), int(row["dek_version"]))
        plain = cipher.decrypt(ciphertext, bytes(row["nonce"]), field)
    except engram_crypto.EngramCryptoError as exc:
        return f"{table} {row['id']}: {exc}"
    verdict = engram_crypto.check_content_hash(dek, plain, row["content_hash"])
    return None if verdict in ("match", "legacy") else f"{table} {row['id']}: content hash {verdict}"


async def prove_notes(conn: postgres.Connection, keys: Keys, sample: int) -> Proof:
    rows = await conn.fetch(
        "SELECT n.id::text AS id, n.user_id::text AS user_id, n.dek_version, n.content_ciphertext AS ct, "
        "n.content_nonce AS nonce, n.content_hash, u.encrypted_dek FROM notes n JOIN users u ON u.id = n.user_id "
        "WHERE n.content_ciphertext IS NOT NULL AND u.encrypted_dek IS NOT NULL ORDER BY random() LIMIT $1",
        sample,
    )
    deks = _Deks(keys)
    problems = [p for r in rows if (p := check_blob(deks, "notes", r, bytes(r["ct"])))]
    if not rows:
        return Proof("notes", True, "no encrypted note to sample (empty database)", {"sampled": 0})
    details = {"sampled": len(rows), "users_by_previous_key": len(deks.by_previous)}
    if problems:
        return Proof("notes", False, f"{len(problems)} of {len(rows)} sampled note(s) failed: {problems[0]}",
                     details | {"failed": problems[:10]}, code="decrypt_failed")  # fmt: skip
    return Proof("notes", True, f"{len(rows)} sampled note(s) decrypt with their users' DEKs and match their "
                 "content hash" + deks.note(), details)  # fmt: skip


async def prove_attachments_in_db(conn: postgres.Connection, keys: Keys, sample: int) -> Proof:
    rows = await conn.fetch(
        "SELECT a.id::text AS id, a.user_id::text AS user_id, a.dek_version, a.content_nonce AS nonce, "
        "a.content_hash, o.data, u.encrypted_dek FROM attachments a "
        "JOIN storage_objects o ON o.storage_key = a.storage_key JOIN users u ON u.id = a.user_id "
        "WHERE a.deleted_at IS NULL AND a.content_nonce IS NOT NULL ORDER BY random() LIMIT $1",
        sample,
    )
    return _attachment_proof(keys, [(r, bytes(r["data"])) for r in rows])


async def prove_attachments_mirrored(
    conn: postgres.Connection, keys: Keys, sample: int, repo: Repository, pool: dict[str, str]
) -> Proof:
    rows = await conn.fetch(
        "SELECT a.id::text AS id, a.user_id::text AS user_id, a.dek_version, a.content_nonce AS nonce, "
        "a.content_hash, a.storage_key, u.encrypted_dek FROM attachments a JOIN users u ON u.id = a.user_id "
        "WHERE a.deleted_at IS NULL AND a.content_nonce IS NOT NULL AND a.storage_key = ANY($2::text[]) "
        "ORDER BY random() LIMIT $1",
        sample, list(pool),
    )  # fmt: skip
    pairs = [(r, await repo.get_bytes(pool[r["storage_key"]])) for r in rows]
    return _attachment_proof(keys, pairs)


def _attachment_proof(keys: Keys, pairs: list[tuple[Any, bytes]]) -> Proof:
    if not pairs:
        return Proof("attachments", True, "no attachment to sample", {"sampled": 0})
    deks = _Deks(keys)
    problems = [p for r, blob in pairs if (p := check_blob(deks, "attachments", r, blob))]
    if problems:
        return Proof("attachments", False, f"{len(problems)} of {len(pairs)} sampled attachment(s) failed: "
                     f"{problems[0]}", {"sampled": len(pairs), "failed": problems[:10]},
                     code="decrypt_failed")  # fmt: skip
    return Proof("attachments", True, f"{len(pairs)} sampled attachment(s) decrypt and match their content hash"
                 + deks.note(), {"sampled": len(pairs)})  # fmt: skip
