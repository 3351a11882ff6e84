"""One command family for PostgreSQL's client binaries: argv and environment, built without running anything.

`PgClientCommand` builds `<prefix> <binary> <arguments>` (the prefix is
ENGRAM_RECOVERY_PG_CLIENT_PREFIX, e.g. `docker compose exec -T postgres`) and the
environment from ONE filter, `client_env`; `PgDumpCommand`, `PgRestoreCommand`
(a file or directory, stdin, sections, a use-list, or only `--list`) and
`PsqlCommand` add their arguments. process.py runs them.

The environment filter: the DSN says where to connect and as whom, so every
PG* variable that could point a client elsewhere or change its session is
dropped (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSERVICE, PGOPTIONS,
PGTZ, PGCLIENTENCODING, ...). Only the ones that secure or bound the
connection the DSN names pass: TLS and GSS (PGSSL*, PGREQUIRESSL, PGGSS*,
PGKRBSRVNAME, PGCHANNELBINDING, PGREQUIREAUTH), PGCONNECT_TIMEOUT, and
PGPASSFILE (a password file only answers for the host, port, database and user
of the DSN). The DSN's password travels in PGPASSWORD, never in argv; PGAPPNAME
is ours when the command names one. Variables that are not PG* pass unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

PASSING = frozenset({"PGREQUIRESSL", "PGKRBSRVNAME", "PGCHANNELBINDING", "PGREQUIREAUTH", "PGCONNECT_TIMEOUT",
                     "PGPASSFILE"})  # fmt: skip
PASSING_PREFIXES = ("PGSSL", "PGGSS")


def passes(name: str) -> bool:
    """Whether an inherited variable reaches a client binary (see the module docstring)."""
    return not name.startswith("PG") or name in PASSING or name.startswith(PASSING_PREFIXES)


def client_env(password: str | None, application: str | None = None,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The one environment filter of every client binary we run."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if passes(k)}
    if application is not None:
        env["PGAPPNAME"] = application
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """(the URL without its password, the password): the password travels in PGPASSWORD, never in argv."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn, None
    netloc = (quote(unquote(parts.username or ""), safe="") + "@" if parts.username else "") + (
        f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    ) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), unquote(parts.password)


@dataclass(frozen=True)
class PgClientCommand:
    """A client binary run as `<prefix> <binary> <arguments>`, connecting to `dsn` (none when empty)."""

    binary: str
    dsn: str = ""
    prefix: tuple[str, ...] = field(default=(), kw_only=True)  # ENGRAM_RECOVERY_PG_CLIENT_PREFIX
    application: str | None = field(default=None, kw_only=True)  # PGAPPNAME, when ours

    @property
    def name(self) -> str:
        """The binary's own name, for messages."""
        return os.path.basename(self.binary)

    @property
    def url(self) -> str:
        return split_dsn(self.dsn)[0]

    def arguments(self) -> list[str]:
        return []

    @property
    def argv(self) -> list[str]:
        return [*self.prefix, self.binary, *self.arguments()]

    @property
    def env(self) -> dict[str, str]:
        return client_env(split_dsn(self.dsn)[1], self.application)


DumpFormat = Literal["custom", "directory", "plain"]
_FORMAT_FLAG: dict[str, str] = {"custom": "c", "directory": "d", "plain": "p"}


@dataclass(frozen=True)
class PgDumpCommand(PgClientCommand):
    """pg_dump, uncompressed (we compress in the pipeline), at an exported snapshot when one is given."""

    format: DumpFormat = "custom"
    snapshot: str | None = None
    output: str | None = None  # the directory for format="directory"; stdout otherwise
    jobs: int = 1
    application: str | None = field(default="engram-recovery run_backup", kw_only=True)

    def arguments(self) -> list[str]:
        args = [f"--format={_FORMAT_FLAG[self.format]}", "--compress=0", "--no-password"]
        if self.snapshot:
            args.append(f"--snapshot={self.snapshot}")
        if self.format == "plain":
            # What Engram's documented restore (`psql < file`) expects of a plain dump.
            args += ["--clean", "--if-exists"]
        if self.format == "directory":
            if not self.output:
                raise ValueError("a directory-format dump needs an output directory")
            args += [f"--file={self.output}", f"--jobs={self.jobs}"]
        args.append(f"--dbname={self.url}")
        return args


@dataclass(frozen=True)
class PgRestoreCommand(PgClientCommand):
    """Stock pg_restore of a custom or directory dump (`source`, else stdin) into an existing database, stopping
    at the first error; or, with `list_only`, the dump's table of contents on stdout (no connection)."""

    source: str | None = None
    jobs: int | None = None
    no_owner: bool = False
    single_transaction: bool = False
    sections: tuple[str, ...] = ()
    use_list: str | None = None
    list_only: bool = False

    def arguments(self) -> list[str]:
        if self.list_only:
            return ["--list"] + ([self.source] if self.source else [])
        args = ["--no-password", "--exit-on-error"]
        if self.single_transaction:
            args.append("--single-transaction")
        args.append(f"--dbname={self.url}")
        if self.jobs is not None:
            args.append(f"--jobs={self.jobs}")
        if self.no_owner:
            args += ["--no-owner", "--no-privileges"]
        args += [f"--section={section}" for section in self.sections]
        if self.use_list:
            args.append(f"--use-list={self.use_list}")
        return args + ([self.source] if self.source else [])


@dataclass(frozen=True)
class PsqlCommand(PgClientCommand):
    """psql running a plain dump from stdin in one transaction, stopping at the first error."""

    def arguments(self) -> list[str]:
        return ["--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-q", f"--dbname={self.url}",
                "-f", "-"]  # fmt: skip


@dataclass(frozen=True)
class RestoreClients:
    """The client binaries of one restore: pg_restore, psql (for a plain dump), and the words
    ENGRAM_RECOVERY_PG_CLIENT_PREFIX puts before them."""

    pg_restore: str
    psql: str = "psql"
    prefix: tuple[str, ...] = ()


def stdin_restore(
    dump_format: str, clients: RestoreClients, dsn: str, *, application: str | None = None
) -> PgClientCommand:
    """The all-or-nothing restore of a dump arriving on stdin: psql for a plain dump, pg_restore otherwise."""
    if dump_format == "plain":
        return PsqlCommand(clients.psql, dsn, prefix=clients.prefix, application=application)
    return PgRestoreCommand(clients.pg_restore, dsn, single_transaction=True, prefix=clients.prefix,
                            application=application)  # fmt: skip
