"""The bulk of a seed: notes, their chunks and attachments, generated batch by batch.

Everything here is synchronous and CPU-bound so that it can run in a worker
thread while the previous batch streams into PostgreSQL. Rows are built as
tuples in a fixed column order and projected onto the columns the target schema
really has, so one generator serves every schema variant.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

# Absolute on purpose: `mypy tests` checks tests/testbed/ as a package named `testbed`, which
# resolves to this directory, and a `..core` import would then climb above the top level.
from engram_recovery.core.engram import crypto as ec

NOTE_COLUMNS = (
    *("id", "user_id", "vault_id", "version", "content_hash", "mtime", "deleted_at", "created_at"),
    *("updated_at", "embed_hash", "content_ciphertext", "content_nonce", "title_ciphertext", "title_nonce"),
    *("tags_ciphertext", "tags_nonce", "path_ciphertext", "path_nonce", "path_hmac", "folder_ciphertext"),
    *("folder_nonce", "folder_hmac", "tags_hmac", "dek_version", "kind", "seq", "embed_retry_after"),
    *("parse_status", "basename_hmac", "dense_indexed_hash"),
)
CHUNK_COLUMNS = (
    *("id", "note_id", "user_id", "position", "heading_path", "char_start", "char_end"),
    *("qdrant_point_id", "created_at", "vault_id", "token_count"),
)
ATTACHMENT_COLUMNS = (
    *("id", "user_id", "mime_type", "size_bytes", "mtime", "deleted_at", "created_at", "updated_at"),
    *("content_hash", "storage_key", "vault_id", "encryption_version", "content_nonce", "path_ciphertext"),
    *("path_nonce", "path_hmac", "dek_version", "seq", "version", "basename_hmac"),
)
STORAGE_COLUMNS = ("storage_key", "data", "byte_size", "inserted_at")

AAD_BOUND = ec.ROW_VERSION_AAD_BOUND
_AAD_CONTENT, _AAD_TITLE, _AAD_TAGS, _AAD_PATH, _AAD_FOLDER = (
    ec.row_aad("notes", column, uuid.UUID(int=0), AAD_BOUND)[:-16]
    for column in ("content", "title", "tags", "path", "folder")
)
_WORDS = (
    "archive backup canary cluster commit context draft embedding garden graph index inbox journal "
    "kernel ledger link marker meeting migration note outline paper plan project query recall review "
    "roadmap schema search snapshot source summary sync tenant thread topic vault vector weekly idea "
    "the a of and to in is for on with as by from at that this it be are was will can should "
    "café naïve Zürich résumé façade über"
).split()
_TAGS = ("project", "idea", "reading", "meeting", "todo", "research", "journal", "draft", "ops", "personal")
_FOLDERS = ("", "Inbox", "Projects/Alpha", "Projects/Beta", "Journal/2026", "Reading", "Areas/Ops", "Archive")


_V7_BITS = 0x7 << 76 | 0b10 << 62
_V4_BITS = 0x4 << 76 | 0b10 << 62
_V_MASK = ~(0xF << 76 | 0b11 << 62)


def uuid7_at(ms: int, rng: random.Random) -> uuid.UUID:
    """A version-7 UUID for the given Unix milliseconds, so ids sort like Engram's by creation."""
    return uuid.UUID(int=(ms & 0xFFFF_FFFF_FFFF) << 80 | (rng.getrandbits(80) & _V_MASK) | _V7_BITS)


def random_uuid4(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=(rng.getrandbits(128) & _V_MASK) | _V4_BITS)


def build_corpus(rng: random.Random, size: int) -> str:
    """Markdown-ish prose to cut note bodies from; a shared corpus keeps per-note cost low."""
    parts: list[str] = []
    length = 0
    while length < size:
        if rng.random() < 0.15:
            line = "## " + " ".join(rng.choices(_WORDS, k=rng.randint(2, 5))).capitalize()
        elif rng.random() < 0.2:
            line = f"- {' '.join(rng.choices(_WORDS, k=rng.randint(3, 8)))} [[{rng.choice(_WORDS)}]]"
        else:
            sentences = (" ".join(rng.choices(_WORDS, k=rng.randint(6, 16))).capitalize() + "." for _ in range(4))
            line = " ".join(sentences)
        parts.append(line)
        length += len(line) + 2
    return "\n\n".join(parts)


@dataclass(frozen=True)
class UserKeys:
    """One user's DEK and the subkeys derived from it, built once per seed."""

    user_id: uuid.UUID
    dek: bytes
    cipher: ec.FieldCipher
    filter_key: bytes
    content_key: bytes

    @classmethod
    def for_user(cls, user_id: uuid.UUID, dek: bytes) -> UserKeys:
        return cls(user_id, dek, ec.FieldCipher(dek), ec.filter_key(dek), ec.content_hash_key(dek))

    def hmac(self, value: str) -> bytes:
        return ec.hmac_field(self.filter_key, value.encode("utf-8"))


@dataclass(frozen=True)
class VaultRef:
    id: uuid.UUID
    user: UserKeys
    deleted: bool


@dataclass(frozen=True)
class NoteSample:
    """A note whose plaintext the tests keep, to decrypt and compare."""

    id: uuid.UUID
    user_id: uuid.UUID
    vault_id: uuid.UUID
    kind: str
    deleted: bool
    vault_deleted: bool
    path: str | None
    folder: str
    title: str | None = None
    tags: tuple[str, ...] = ()
    content: bytes | None = None
    content_hash: str | None = None

    def with_text(self, title: str, tags: tuple[str, ...], content: bytes, content_hash: str) -> NoteSample:
        return replace(self, title=title, tags=tags, content=content, content_hash=content_hash)


@dataclass(frozen=True)
class AttachmentSample:
    id: uuid.UUID
    user_id: uuid.UUID
    vault_id: uuid.UUID
    storage_key: str
    plaintext: bytes
    content_hash: str


@dataclass
class Batch:
    size: int = 0
    notes: list[tuple[Any, ...]] = field(default_factory=list)
    chunks: list[tuple[Any, ...]] = field(default_factory=list)
    attachments: list[tuple[Any, ...]] = field(default_factory=list)
    objects: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Tally:
    live_notes: int = 0
    deleted_notes: int = 0
    folders: int = 0
    eligible_notes: int = 0
    pending_embeds: int = 0
    notes_per_user: dict[uuid.UUID, int] = field(default_factory=dict)
    unembedded_note_ids: list[uuid.UUID] = field(default_factory=list)


class BulkFactory:
    """Generates notes and attachments for a fixed set of vaults; not thread-safe, one producer at a time."""

    def __init__(
        self,
        *,
        rng: random.Random,
        vaults: list[VaultRef],
        now: datetime,
        note_size: int,
        deleted_fraction: float,
        folder_fraction: float,
        embedded: bool,
        note_columns: set[str],
        sample_every: int,
    ) -> None:
        self.rng, self.vaults, self.now = rng, vaults, now
        self.note_size, self.deleted_fraction, self.embedded = note_size, deleted_fraction, embedded
        self.folder_fraction = folder_fraction if "kind" in note_columns else 0.0
        self.sample_every = sample_every
        self.corpus = build_corpus(rng, max(1 << 20, 4 * note_size))
        self.now_epoch = now.replace(tzinfo=UTC).timestamp()
        self.seq: dict[uuid.UUID, int] = {v.id: 0 for v in vaults}
        self.tally = Tally()
        self.note_samples: list[NoteSample] = []
        self._sample_shapes: set[tuple[str, bool, bool]] = set()
        self.attachment_samples: list[AttachmentSample] = []
        self._counter = 0

    def _moment(self) -> tuple[datetime, datetime, int, float]:
        """Created within the last year, edited since: naive UTC times, the creation ms, the edit epoch."""
        age = self.rng.random() * 365 * 86400
        edit_age = self.rng.random() * age
        created = self.now - timedelta(seconds=age)
        updated = self.now - timedelta(seconds=edit_age)
        return created, updated, int((self.now_epoch - age) * 1000), self.now_epoch - edit_age

    def _next_seq(self, vault: VaultRef) -> int:
        self.seq[vault.id] += 1
        return self.seq[vault.id]

    def notes(self, count: int) -> Batch:
        batch = Batch(size=count)
        for _ in range(count):
            self._note(batch)
        return batch

    def _note(self, batch: Batch) -> None:
        # The hot loop of a million-note seed: plain random() arithmetic instead of randint()
        # and friends, and AAD prefixes prepared once, keep Python overhead near the crypto cost.
        rng, tally, r = self.rng, self.tally, self.rng.random
        vault = self.vaults[int(r() * len(self.vaults))]
        user = vault.user
        self._counter += 1
        created, updated, ms, mtime = self._moment()
        note_id = uuid7_at(ms, rng)
        row = note_id.bytes
        is_folder = r() < self.folder_fraction
        deleted = r() < self.deleted_fraction
        deleted_at = updated if deleted else None
        folder = _FOLDERS[int(r() * len(_FOLDERS))]
        seal = user.cipher.encrypt_with_aad
        tally.notes_per_user[user.user_id] = tally.notes_per_user.get(user.user_id, 0) + 1
        if is_folder:
            # A folder marker: only the folder is stored, and it must be unique per vault.
            folder = f"{folder}/Empty {self._counter}".lstrip("/")
            folder_ct, folder_nonce = seal(folder.encode(), _AAD_FOLDER + row)
            batch.notes.append(
                (note_id, user.user_id, vault.id, 1, None, mtime, deleted_at, created, updated)
                + (None,) * 10
                + (folder_ct, folder_nonce, user.hmac(folder), [], AAD_BOUND, "folder", self._next_seq(vault))
                + (None, "ok", None, None)
            )
            tally.folders += 1
            if self._wants_sample("folder", deleted, vault):
                self.note_samples.append(
                    NoteSample(note_id, user.user_id, vault.id, "folder", deleted, vault.deleted, None, folder)
                )
            return
        words = [_WORDS[int(r() * len(_WORDS))] for _ in range(2 + int(r() * 4))]
        title = " ".join(words).capitalize()
        path = f"{folder}/{'-'.join(words)}-{self._counter}.md".lstrip("/")
        first_tag = int(r() * len(_TAGS))
        tags = (_TAGS + _TAGS)[first_tag : first_tag + int(r() * 4)]
        length = int(self.note_size * (0.25 + 1.5 * r()))
        offset = int(r() * (len(self.corpus) - length))
        content = f"# {title}\n\n{self.corpus[offset : offset + length]}\n".encode()
        content_hash = ec.content_hash_with_key(user.content_key, content)
        embed_hash, retry_after = self._embed_state(content_hash, deleted)
        content_ct, content_nonce = seal(content, _AAD_CONTENT + row)
        title_ct, title_nonce = seal(title.encode(), _AAD_TITLE + row)
        tags_ct, tags_nonce = seal(ec.encode_tags(tags), _AAD_TAGS + row)
        path_ct, path_nonce = seal(path.encode(), _AAD_PATH + row)
        folder_ct, folder_nonce = seal(folder.encode(), _AAD_FOLDER + row)
        basename = path.rsplit("/", 1)[-1].lower().removesuffix(".md")
        batch.notes.append(
            (note_id, user.user_id, vault.id, 1, content_hash, mtime, deleted_at, created, updated)
            + (embed_hash, content_ct, content_nonce, title_ct, title_nonce, tags_ct, tags_nonce, path_ct)
            + (path_nonce, user.hmac(path), folder_ct, folder_nonce, user.hmac(folder))
            + ([user.hmac(t) for t in tags], AAD_BOUND, "note", self._next_seq(vault), retry_after, "ok")
            + (user.hmac(basename), embed_hash)
        )
        if deleted:
            tally.deleted_notes += 1
        else:
            tally.live_notes += 1
            if not vault.deleted:
                tally.eligible_notes += 1
                tally.pending_embeds += embed_hash != content_hash
        if embed_hash is None and not deleted and not vault.deleted and len(tally.unembedded_note_ids) < 64:
            tally.unembedded_note_ids.append(note_id)
        if embed_hash is not None and not deleted:
            self._chunks(batch, note_id, vault, len(content), updated, int(mtime * 1000))
        if self._wants_sample("note", deleted, vault):
            self.note_samples.append(
                NoteSample(note_id, user.user_id, vault.id, "note", deleted, vault.deleted, path, folder).with_text(
                    title, tags, content, content_hash
                )
            )

    def _embed_state(self, content_hash: str, deleted: bool) -> tuple[str | None, datetime | None]:
        """Mostly embedded; a few never embedded, parked after failures, or stale after an edit."""
        if not self.embedded:
            return None, None
        roll = self.rng.random()
        if roll < 0.02 and not deleted:
            return None, None
        if roll < 0.025 and not deleted:
            return None, (self.now + timedelta(hours=6)).replace(tzinfo=UTC)
        if roll < 0.05:
            return f"{self.rng.getrandbits(256):064x}", None
        return content_hash, None

    def _chunks(self, batch: Batch, note_id: uuid.UUID, vault: VaultRef, size: int, at: datetime, ms: int) -> None:
        parts = 1 + int(self.rng.random() * 3)
        step = size // parts
        for position in range(parts):
            start, end = position * step, size if position == parts - 1 else (position + 1) * step
            batch.chunks.append(
                (uuid7_at(ms, self.rng), note_id, vault.user.user_id, position, None)
                + (start, end, random_uuid4(self.rng), at, vault.id, max(1, (end - start) // 4))
            )

    def _wants_sample(self, kind: str, deleted: bool, vault: VaultRef) -> bool:
        """Every n-th note, plus the first of each shape (folder, deleted, in a deleted vault)."""
        shape = (kind, deleted, vault.deleted)
        if len(self.note_samples) >= 48 or (self._counter % self.sample_every and shape in self._sample_shapes):
            return False
        self._sample_shapes.add(shape)
        return True

    def attachments(self, count: int, size: int) -> Batch:
        batch = Batch(size=count)
        rng = self.rng
        for _ in range(count):
            vault = rng.choice(self.vaults)
            user = vault.user
            self._counter += 1
            created, updated, ms, mtime = self._moment()
            att_id = uuid7_at(ms, rng)
            path = f"{rng.choice(_FOLDERS)}/attachments/image-{self._counter}.png".lstrip("/")
            plaintext = b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(0, size - 8))
            content_hash = ec.content_hash_with_key(user.content_key, plaintext)
            ciphertext, nonce = user.cipher.encrypt(plaintext, "attachments", "content", att_id, AAD_BOUND)
            path_ct, path_nonce = user.cipher.encrypt(path.encode(), "attachments", "path", att_id, AAD_BOUND)
            # A tombstone keeps its hash and nonce but no longer points at a blob.
            tombstone = rng.random() < self.deleted_fraction
            key = None if tombstone else f"{user.user_id}/{vault.id}/objects/{att_id}"
            batch.attachments.append(
                (att_id, user.user_id, "image/png", len(plaintext), mtime)
                + (updated if tombstone else None, created, updated, content_hash, key, vault.id, 1, nonce)
                + (path_ct, path_nonce, user.hmac(path), AAD_BOUND, self._next_seq(vault), 1)
                + (user.hmac(path.rsplit("/", 1)[-1].lower()),)
            )
            if key is None:
                continue
            batch.objects.append((key, ciphertext))
            if len(self.attachment_samples) < 8:
                self.attachment_samples.append(
                    AttachmentSample(att_id, user.user_id, vault.id, key, plaintext, content_hash)
                )
        return batch


def projector(full: tuple[str, ...], present: set[str]) -> tuple[list[str], itemgetter[Any]]:
    """The columns of ``full`` the schema has, and a getter cutting a full row down to them."""
    keep = [i for i, c in enumerate(full) if c in present]
    return [full[i] for i in keep], itemgetter(*keep)
