"""A local directory as a repository: atomic writes, fsynced, with windowed read-back verification."""

from __future__ import annotations

import builtins
import fcntl
import itertools
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio

from ..errors import Busy, StoreUnreachable
from .base import READ_CHUNK, VERIFY_THREADS, Repository, StreamCheck
from .layout import TMP_MARK, check_key
from .localfs import (
    WINDOW,
    Checkpoint,
    HashedWriter,
    ReadBack,
    differing_windows,
    fsync_dir,
    hash_file,
    os_error,
)

# `flock` (not `fcntl` record locks) because it conflicts between two opens in the same process too.
LOCK_FILE = ".lock"


@dataclass
class Written:
    """What this instance knows of a file it wrote: the hash checkpoints, and the thread that re-read it."""

    checkpoints: list[Checkpoint]
    reader: ReadBack | None


class LocalRepository(Repository):
    def __init__(self, root: Path, window: int = WINDOW) -> None:
        self.root = root
        self.location = str(root)
        self._window = window
        # The hash checkpoints of what this instance wrote, for `verify` to re-read in parallel.
        self._written: dict[str, Written] = {}

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def unusable(self) -> str | None:
        if self.root.exists() and not self.root.is_dir():
            return f"the backup repository {self.root} is not a directory"
        return None

    def local_file(self, key: str) -> Path | None:
        return self._path(key)

    @asynccontextmanager
    async def lock(self, busy_hint: str) -> AsyncIterator[None]:
        """`flock` on `<root>/.lock`: two deployments writing (and pruning) the same directory."""
        path = self.root / LOCK_FILE
        fd = await anyio.to_thread.run_sync(lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise Busy(f"another backup is writing to the repository {self.root}", busy_hint) from exc
            yield
        finally:
            os.close(fd)  # releases the flock

    async def purge(self, prefix: str) -> None:
        await super().purge(prefix)
        await anyio.to_thread.run_sync(shutil.rmtree, self.root / prefix, True)

    async def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreUnreachable(
                f"the backup repository {self.root} is not a directory",
                "point ENGRAM_RECOVERY_REPOSITORY at a directory",
            )
        try:
            await anyio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))
            await self.put_bytes(".write-check", b"ok")
            await self.delete([".write-check"])
        except OSError as exc:
            raise os_error(exc, "create it", str(self.root)) from exc

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, read_back: bool = False, check: StreamCheck | None = None
    ) -> tuple[int, str]:
        final = self._path(key)
        temp = final.with_name(f".{final.name}{TMP_MARK}{secrets.token_hex(6)}")
        handle: IO[bytes] | None = None
        reader: ReadBack | None = None
        try:
            await anyio.to_thread.run_sync(lambda: final.parent.mkdir(parents=True, exist_ok=True))
            handle = await anyio.to_thread.run_sync(lambda: temp.open("wb"))

            def reread(start: Checkpoint, end: Checkpoint) -> None:
                # Each window is re-read as soon as it is written, beside the rest of the stream (a dump):
                # the verification after it then has only the windows this could not reach. The thread
                # starts with the first full window: a file shorter than that is verified whole, later.
                nonlocal reader
                if reader is None and end.offset >= self._window:
                    reader = ReadBack(temp, check)
                if reader is not None:
                    reader.window(start, end)

            writer = HashedWriter(handle, self._window, drop_behind=read_back, on_window=reread if read_back else None)
            async for chunk in chunks:
                # Hashing beside the write, in the worker thread, keeps the event loop free.
                await anyio.to_thread.run_sync(writer.write, chunk)
            digest = await anyio.to_thread.run_sync(writer.finish)
            size = writer.size
            handle.close()
            handle = None
            await anyio.to_thread.run_sync(os.replace, temp, final)
            await anyio.to_thread.run_sync(fsync_dir, final.parent)
            if len(writer.checkpoints) > 2:
                # Only files of several windows gain from a parallel re-read, and only they are kept: a
                # mirror writing a million small blobs must not hold a million hash states.
                self._written[key] = Written(writer.checkpoints, reader)
                reader = None
        except OSError as exc:
            raise os_error(exc, f"write {key}", str(self.root)) from exc
        finally:
            # Also on cancellation: nothing half-written stays behind under any name.
            if reader is not None:
                reader.stop()
            if handle is not None:
                handle.close()
            if temp.exists():
                temp.unlink(missing_ok=True)
        return size, digest

    async def get_stream(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        path = self._path(key)
        with self._reading(key):
            handle = await anyio.to_thread.run_sync(lambda: path.open("rb"))
        try:
            while chunk := await anyio.to_thread.run_sync(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def exists(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self._path(key).is_file)

    async def sha256(self, key: str) -> tuple[int, str]:
        # One thread call reading into one reused buffer: no per-block allocation or event-loop hop.
        path = self._path(key)
        with self._reading(key):
            return await anyio.to_thread.run_sync(hash_file, path)

    async def checksum(self, key: str, algorithm: str) -> tuple[int, str]:
        path = self._path(key)
        with self._reading(key):
            return await anyio.to_thread.run_sync(hash_file, path, algorithm)

    async def verify(self, key: str, size: int, sha256: str) -> str | None:
        """As Repository.verify; a file this instance wrote is re-read window by window on several cores.

        The windows its read-back thread already re-read while it was written (put_stream's
        `read_back`) are not read again, provided the file is still the one written (the same
        inode, the same size); their verdicts count as this verification's.
        """
        written = self._written.get(key)
        checkpoints = written.checkpoints if written is not None else None
        if not checkpoints or (checkpoints[-1].offset, checkpoints[-1].state.hexdigest()) != (size, sha256):
            return await super().verify(key, size, sha256)
        assert written is not None
        path = self._path(key)
        reader = written.reader
        read_back = await anyio.to_thread.run_sync(reader.complete) if reader is not None else {}
        refused = reader.refused if reader is not None else None
        with self._reading(key):
            stored = await anyio.to_thread.run_sync(path.stat)
            if stored.st_size != size:
                return f"stored {stored.st_size} bytes, {size} were written"
            if reader is None or stored.st_ino != reader.inode:
                # Another file now has this name: everything is read again, and what the thread saw says nothing.
                read_back, refused = {}, None
            windows = list(itertools.pairwise(checkpoints))
            unread = [(a, b) for a, b in windows if read_back.get(a.offset, (None, False))[0] != b.offset]
            differing = await differing_windows(path, unread, VERIFY_THREADS)
        differing += [(start, end) for start, (end, matched) in read_back.items() if not matched]
        if not differing and refused is not None:
            # Every byte is the one hashed, yet the file does not authenticate: it was written wrong.
            return f"the stored file does not authenticate as written: {refused}"
        if not differing:
            return None
        ranges = ", ".join(f"{a}-{b}" for a, b in sorted(differing))
        return f"bytes {ranges} do not read back as written (recorded {size} bytes with SHA-256 {sha256[:16]}...)"

    @contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """A failed read as an operator-facing error: a missing file means a damaged or pruned backup."""
        try:
            yield
        except FileNotFoundError as exc:
            raise StoreUnreachable(
                f"{key} is missing from the backup repository {self.root}",
                "the backup is damaged or was pruned: choose another recovery point",
            ) from exc
        except OSError as exc:
            raise os_error(exc, f"read {key}", str(self.root)) from exc

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        found = await anyio.to_thread.run_sync(self._list_sync, prefix)
        for key, size, _modified in found:
            yield key, size

    async def list_modified(self, prefix: str) -> AsyncIterator[tuple[str, int, float | None]]:
        # The same stat call that gives the size gives the time: nothing more is read.
        for item in await anyio.to_thread.run_sync(self._list_sync, prefix):
            yield item

    def _list_sync(self, prefix: str) -> builtins.list[tuple[str, int, float | None]]:
        # Walk only the directory the prefix names, not the whole repository.
        base = self.root / prefix[: prefix.rfind("/") + 1] if "/" in prefix else self.root
        out: builtins.list[tuple[str, int, float | None]] = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if TMP_MARK in name:
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = full.stat()
                    out.append((key, stat.st_size, stat.st_mtime))
        out.sort()
        return out

    async def delete(self, keys: Iterable[str]) -> int:
        paths = [self._path(k) for k in keys]

        def remove() -> None:
            parents: set[Path] = set()
            for path in paths:
                path.unlink(missing_ok=True)
                parents.add(path.parent)
            # Empty backup folders go too, so a pruned backup leaves no trace.
            for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
                while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent

        try:
            await anyio.to_thread.run_sync(remove)
        except OSError as exc:
            raise os_error(exc, "delete old files", str(self.root)) from exc
        return len(paths)

    async def sweep_temporary(self) -> builtins.list[str]:
        def sweep() -> builtins.list[str]:
            swept: builtins.list[str] = []
            if not self.root.is_dir():
                return swept
            for dirpath, _dirs, files in os.walk(self.root, topdown=False):
                directory = Path(dirpath)
                for name in files:
                    if TMP_MARK in name:
                        (directory / name).unlink(missing_ok=True)
                        swept.append((directory / name).relative_to(self.root).as_posix())
                # A folder an interrupted run created but never filled.
                if directory != self.root and not any(directory.iterdir()):
                    directory.rmdir()
            return swept

        return await anyio.to_thread.run_sync(sweep)
