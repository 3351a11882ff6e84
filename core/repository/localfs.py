"""Local-file primitives of the directory repository: errors with their fix, durable writes, fast hashing."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import anyio.to_thread

from ..errors import IntegrityError, RecoveryError, StoreUnreachable
from ..taskgroups import task_group
from .base import StreamCheck

if TYPE_CHECKING:
    from _hashlib import HASH

HASH_BLOCK = 4 << 20


def os_error(exc: OSError, what: str, where: str) -> RecoveryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnreachable(
            f"the backup repository {where} is full (while trying to {what})",
            "free space there or point ENGRAM_RECOVERY_REPOSITORY at a larger volume; nothing half-written was kept",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreUnreachable(
            f"the backup repository {where} is not writable (while trying to {what}): {exc.strerror}",
            "give this process write access to ENGRAM_RECOVERY_REPOSITORY or choose another directory",
        )
    return StoreUnreachable(
        f"the backup repository {where} failed while trying to {what}: {exc.strerror or exc}",
        "check that ENGRAM_RECOVERY_REPOSITORY is a reachable, mounted directory",
    )


# Each window of this many bytes gets its writeback started and a checkpoint once written.
WINDOW = 64 << 20
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _sync_file_range(flags: int) -> Callable[[int, int, int], bool] | None:
    """Linux's sync_file_range with these flags (WRITE alone: start writeback of a range, without waiting)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int) -> bool:
        # Advisory: should the kernel refuse, the final fsync still writes everything.
        result: int = function(fd, offset, length, flags)
        return result == 0

    return call


_start_writeback = _sync_file_range(_SYNC_FILE_RANGE_WRITE)
_wait_writeback = _sync_file_range(_SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER)


def _drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop a written range from the page cache once it is on the disk (advisory; 0 length: to the end)."""
    if _wait_writeback is not None and length:
        _wait_writeback(fd, offset, length)
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class Checkpoint:
    """The SHA-256 state after the first `offset` bytes of a file, taken as the file was written."""

    offset: int
    state: HASH  # a copy, never updated again


# O_DIRECT wants buffers, offsets and lengths aligned to the device's logical block (512 or 4096).
ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

Window = Callable[[Checkpoint, Checkpoint], None]


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False where the platform or filesystem refuses it."""
    if not _O_DIRECT:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


# A dump is written to the disk directly in pieces of this size (a divisor of the window, so every
# window's end is a piece's end and its bytes are on the disk when the read-back is told of it).
STAGE = 4 << 20


class HashedWriter:
    """Writes a file, hashes what it writes, and checkpoints the hash; `finish` makes the file durable.

    Windows end at exact multiples of `window`. The checkpoints (the hash state at each
    window's end) let the file be verified window by window in parallel
    (`verify_window`): SHA-256 itself cannot be split. `on_window(start, end)` is told of
    each window once its bytes are in the file.

    With `drop_behind` (a dump, re-read as it is written), the bytes bypass the page cache
    where the filesystem allows it (O_DIRECT): gathered into an aligned 4 MiB piece, each
    piece written straight to the disk. On the bench VM, whose host reclaims freed guest
    memory, copying 1 GiB into fresh page-cache pages cost our process about 0.7 s of CPU;
    the direct writes cost a copy into one reused buffer, and a 4 MiB direct write takes
    about 2 ms there, far ahead of the ~250 MB/s a dump produces (docs/benchmarks.md,
    run_backup). Where direct writes are refused, each window's writeback starts as soon as
    it is written, and each window leaves the page cache once on the disk, one window behind
    the writing, so the dirty pages of a GiB-sized artifact never pile up and the cache
    reuses the same few pages. A read-back then reads the disk either way, not a cached copy.
    Without `drop_behind` (a small file) only the writeback is started early.
    """

    def __init__(
        self, handle: IO[bytes], window: int = WINDOW, *, drop_behind: bool = False, on_window: Window | None = None
    ) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self._window = window
        self._drop_behind = drop_behind
        self._on_window = on_window
        self.size = 0
        self.checkpoints = [Checkpoint(0, self._digest.copy())]
        self._stage: mmap.mmap | None = None
        self._staged = 0
        if drop_behind and window % STAGE == 0 and _set_direct(handle.fileno(), True):
            self._stage = mmap.mmap(-1, STAGE)  # page-aligned, as direct writes want

    @property
    def direct(self) -> bool:
        """Whether the bytes go to the disk without the page cache."""
        return self._stage is not None

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        with memoryview(chunk) as whole:
            view = whole
            while view:
                # Split at the window's end, so every checkpoint falls on a multiple of the window.
                part = view[: self._window - (self.size - self.checkpoints[-1].offset)]
                self._digest.update(part)
                self._put(part)
                self.size += len(part)
                view = view[len(part) :]
                if self.size - self.checkpoints[-1].offset == self._window:
                    self._end_window()

    def _put(self, part: memoryview) -> None:
        while part:
            stage = self._stage
            if stage is None:
                self._handle.write(part)
                return
            take = min(STAGE - self._staged, len(part))
            stage[self._staged : self._staged + take] = part[:take]
            self._staged += take
            part = part[take:]
            if self._staged == STAGE:
                self._write_stage()

    def _write_stage(self) -> None:
        """Write the staged piece: directly while the filesystem takes it, through the cache from then on."""
        assert self._stage is not None
        fd = self._handle.fileno()
        refused = False
        with memoryview(self._stage) as view:
            done = 0
            while done < self._staged:
                try:
                    done += os.write(fd, view[done : self._staged])
                except OSError as exc:
                    # A direct write refused late (an odd filesystem, or a piece cut short): go on cached.
                    if exc.errno != errno.EINVAL or not _set_direct(fd, False):
                        raise
                    self._handle.write(view[done : self._staged])
                    refused = True
                    break
        self._staged = 0
        if refused:
            self._release_stage()

    def _release_stage(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    def _end_window(self) -> None:
        start = self.checkpoints[-1].offset
        self.checkpoints.append(Checkpoint(self.size, self._digest.copy()))
        if self._stage is None:  # through the cache: written back early, and dropped one window behind
            self._handle.flush()
            fd = self._handle.fileno()
            if _start_writeback is not None:
                _start_writeback(fd, start, self.size - start)
            if self._drop_behind and len(self.checkpoints) > 2:
                # The window before this one: its writeback, started a window ago, is done or nearly.
                behind, ahead = self.checkpoints[-3].offset, self.checkpoints[-2].offset
                _drop_cached(fd, behind, ahead - behind)
        if self._on_window is not None:
            self._on_window(self.checkpoints[-2], self.checkpoints[-1])

    def finish(self) -> str:
        """Flush and fsync; return the SHA-256 (hex) of everything written."""
        if self._stage is not None:
            if self._staged:
                # The last piece is not a whole number of blocks: it goes through the cache.
                _set_direct(self._handle.fileno(), False)
                with memoryview(self._stage) as view:
                    self._handle.write(view[: self._staged])
                self._staged = 0
            self._release_stage()
        flush_sync(self._handle)
        if self._drop_behind:
            _drop_cached(self._handle.fileno(), 0, 0)  # all clean now: nothing to wait for
        if self.checkpoints[-1].offset != self.size:
            self.checkpoints.append(Checkpoint(self.size, self._digest.copy()))
            if self._on_window is not None:
                self._on_window(self.checkpoints[-2], self.checkpoints[-1])
        return self._digest.hexdigest()


def _open_for_reading(path: Path) -> tuple[int, bool]:
    """(fd, direct): O_DIRECT where the filesystem allows it, so a read-back reads the device, not the cache."""
    if _O_DIRECT:
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def _read_range(fd: int, direct: bool, offset: int, end: int, stop: threading.Event | None) -> Generator[memoryview]:
    """[offset, end) of `fd`, in pieces read into one reused, aligned buffer (direct reads where the file takes
    them); it ends early when `stop` is set or the file is shorter. Each piece is valid until the next."""
    remaining = end - offset
    buffer = mmap.mmap(-1, max(ALIGN, min(HASH_BLOCK, -(-remaining // ALIGN) * ALIGN)))
    direct = direct and offset % ALIGN == 0
    try:
        with memoryview(buffer) as view:
            while remaining > 0 and not (stop is not None and stop.is_set()):
                want = min(len(buffer), remaining)
                # A direct read asks for whole blocks; at the end of the file it returns what there is.
                asked = -(-want // ALIGN) * ALIGN if direct else want
                try:
                    count = os.preadv(fd, [view[:asked]], offset)
                except OSError as exc:
                    if not direct or exc.errno != errno.EINVAL:
                        raise
                    # Opened direct, but the filesystem refuses direct reads: read through the cache.
                    _set_direct(fd, False)
                    direct, asked = False, want
                    count = os.preadv(fd, [view[:asked]], offset)
                count = min(count, want)
                if not count:
                    return
                yield view[:count]
                offset += count
                remaining -= count
    finally:
        # A consumer that failed may still hold a piece: the mapping then goes with it.
        with contextlib.suppress(BufferError):
            buffer.close()


def window_matches(
    fd: int, direct: bool, start: Checkpoint, end: Checkpoint, stop: threading.Event | None = None
) -> bool | None:
    """Does the file behind `fd` carry the hash from `start`'s state to `end`'s? None: stopped before the end."""
    digest = start.state.copy()
    read = 0
    with contextlib.closing(_read_range(fd, direct, start.offset, end.offset, stop)) as pieces:
        for piece in pieces:
            digest.update(piece)
            read += len(piece)
    if read < end.offset - start.offset:
        return None if stop is not None and stop.is_set() else False  # stopped, or shorter than written
    return digest.digest() == end.state.digest()


def verify_window(path: Path, start: Checkpoint, end: Checkpoint) -> bool:
    """Re-read `path` from start.offset to end.offset: does it carry the hash from `start`'s state to `end`'s?

    When every window of a file does, the file hashes to the final checkpoint's digest:
    each window's bytes are the ones written (short of a SHA-256 collision).
    """
    fd, direct = _open_for_reading(path) if start.offset % ALIGN == 0 else (os.open(path, os.O_RDONLY), False)
    try:
        return window_matches(fd, direct, start, end) is True
    finally:
        os.close(fd)


async def differing_windows(
    path: Path, windows: Iterable[tuple[Checkpoint, Checkpoint]], threads: int
) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of `path` that do not read back as written, re-read `threads` at a time."""
    limiter = anyio.CapacityLimiter(threads)
    differing: list[tuple[int, int]] = []

    async def check(start: Checkpoint, end: Checkpoint) -> None:
        if not await anyio.to_thread.run_sync(verify_window, path, start, end, limiter=limiter):
            differing.append((start.offset, end.offset))

    async with task_group() as tg:
        for start, end in windows:
            tg.start_soon(check, start, end)
    return sorted(differing)


def _lower_priority() -> None:
    """This thread only: run when a core would otherwise idle (SCHED_IDLE), never ahead of the dump."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined,unused-ignore]


def _normal_priority(thread: threading.Thread) -> None:
    """`thread` back to the normal policy: what is left of its work is now waited for."""
    if thread.native_id is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(thread.native_id, os.SCHED_OTHER, os.sched_param(0))  # type: ignore[attr-defined,unused-ignore]


class ReadBack:
    """Re-reads each finished window of a file while the file is still being written, on a thread of its own.

    A backup's verification is a re-read of every byte it wrote. Done after the dump, it
    adds its whole time to the run; here each window is re-read as soon as it is in the
    file, at idle priority (SCHED_IDLE, so it only fills cores the dump leaves idle), and
    the final verification re-reads only what this thread has not (`stop`, then
    `results`). The thread reads through its own descriptor, so the file's rename does
    not disturb it; when stopped mid-window it drops that window, and exits.

    With a `check` (a StreamCheck), the windows are proved by it instead of by their
    SHA-256 checkpoints: read in order, each fed to the check, and `complete` waits for the
    last one and the check's end. Should the check refuse (`refused` says why) or a read
    error break the order, the windows not yet proved are left to the final verification,
    by their checkpoints.
    """

    def __init__(self, path: Path, check: StreamCheck | None = None) -> None:
        self._fd, self._direct = _open_for_reading(path)
        self.inode = os.fstat(self._fd).st_ino
        self._check = check
        self._queue: queue.SimpleQueue[tuple[Checkpoint, Checkpoint] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._results: dict[int, tuple[int, bool]] = {}
        # Why the check refused the bytes re-read, if it did (the checkpoints then say where).
        self.refused: str | None = None
        self._thread = threading.Thread(target=self._run, name="engram-recovery read-back", daemon=True)
        self._thread.start()

    def window(self, start: Checkpoint, end: Checkpoint) -> None:
        self._queue.put((start, end))

    @property
    def reread(self) -> int:
        """How many windows this thread has re-read so far."""
        with self._lock:
            return len(self._results)

    def stop(self) -> dict[int, tuple[int, bool]]:
        """Stop re-reading; the windows re-read so far: start offset -> (end offset, bytes as written)."""
        self._stop.set()
        self._queue.put(None)
        with self._lock:
            return dict(self._results)

    def complete(self) -> dict[int, tuple[int, bool]]:
        """Blocking: with a check, let the thread prove every window given and end the check; then as `stop`.

        Call it once the file is whole (every window given). The thread goes back to normal priority
        first: at idle priority, on a host kept busy by others (Engram itself, say), it could wait for a
        free core indefinitely.
        """
        if self._check is not None:
            self._queue.put(None)
            _normal_priority(self._thread)
            self._thread.join()
        return self.stop()

    def _run(self) -> None:
        _lower_priority()
        try:
            if self._check is not None:
                self._run_checked(self._check)
                return
            while (item := self._queue.get()) is not None:
                start, end = item
                try:
                    matched = window_matches(self._fd, self._direct and start.offset % ALIGN == 0, start, end,
                                             self._stop)  # fmt: skip
                except OSError:
                    continue  # left to the final verification, which reports it
                if matched is None:
                    break
                self._record(start, end, matched)
        finally:
            os.close(self._fd)

    def _record(self, start: Checkpoint, end: Checkpoint, matched: bool) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._results[start.offset] = (end.offset, matched)

    def _feed(self, offset: int, end: int, check: StreamCheck) -> bool:
        """Read [offset, end) of the file into `check`, in order; False: stopped before the end."""
        read = 0
        with contextlib.closing(_read_range(self._fd, self._direct, offset, end, self._stop)) as pieces:
            for piece in pieces:
                check.update(piece)
                read += len(piece)
        if read < end - offset:
            if self._stop.is_set():
                return False
            raise IntegrityError("the file is shorter than what was written", "write it again")
        return True

    def _run_checked(self, check: StreamCheck) -> None:
        # The last window fed counts as proved only once the next one is fed, or at the check's end: a
        # record may straddle the boundary, and its tag covers both sides. A failure proves nothing
        # either way here: the windows not proved are re-read by their checkpoints, which say where.
        fed: tuple[Checkpoint, Checkpoint] | None = None
        while (item := self._queue.get()) is not None:
            start, end = item
            try:
                if not self._feed(start.offset, end.offset, check):
                    return  # stopped
            except OSError:
                return  # the order is broken: the rest is left to the final verification
            except IntegrityError as exc:
                self.refused = exc.message
                return
            if fed is not None:
                self._record(*fed, True)
            fed = item
        if self._stop.is_set():
            return
        try:
            check.finish()
        except IntegrityError as exc:
            self.refused = exc.message
            return
        if fed is not None:
            self._record(*fed, True)


def _feed(handle: FileIO, digest: HASH, limit: int | None = None) -> int:
    """Hash what `handle` reads from where it stands, `limit` bytes at most (None: to the end); return the count."""
    buffer = bytearray(HASH_BLOCK if limit is None else max(1, min(HASH_BLOCK, limit)))
    done = 0
    with memoryview(buffer) as view:
        while limit is None or done < limit:
            count = handle.readinto(view if limit is None else view[: min(len(buffer), limit - done)])
            if not count:
                break
            digest.update(view[:count])
            done += count
    return done


def hash_file(path: Path, algorithm: str = "sha256") -> tuple[int, str]:
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with path.open("rb", buffering=0) as handle:
        size = _feed(handle, digest)
    return size, digest.hexdigest()


def flush_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
