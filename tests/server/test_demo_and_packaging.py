"""The demo builds a working deployment; the wheel installs under one package name only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import anyio.to_thread
import asyncpg
import pytest

EXE = str(Path(sys.executable).with_name("engram-recovery"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.anyio
async def test_demo_creates_an_engram_database_whose_key_checks_out(admin_dsn: str, tmp_path: Path) -> None:
    database = f"engram_demo_test_{secrets.token_hex(3)}"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    argv = [EXE, "demo", "--no-serve", "--admin-url", admin_dsn, "--dir", str(tmp_path / "demo"),
            "--database", database]
    try:
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        )
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        # No backup exists yet in the demo, so the verdict fails, and says why.
        assert status["verdict"] == "fail" and "last_backup" in status["summary"]
        checks = {c["component"]: c for c in status["checks"]}
        assert checks["postgres"]["status"] == "ok"
        assert checks["master_key"]["details"]["canary"] == "match"
        env_file = (tmp_path / "demo" / "engram.env").read_text()
        assert f"/{database}" in env_file
        key = (tmp_path / "demo" / "master.key").read_text().strip()
        assert key not in result.stdout + result.stderr + env_file
        assert oct((tmp_path / "demo" / "master.key").stat().st_mode & 0o777) == "0o600"
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


def test_wheel_installs_everything_under_engram_recovery_only(tmp_path: Path) -> None:
    # Build from a copy of the project's files: setuptools reuses a build/ folder in place,
    # whose stale modules would hide a file the wheel no longer has.
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
        capture_output=True, text=True,
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(".typecheck"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("engram_recovery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"engram_recovery", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("server/app.py", "tools/backup_status/__init__.py", "core/settings.py", "testbed/schema.py"):
        assert f"engram_recovery/{module}" in names
    assert not any(n.startswith("engram_recovery/tests/") or n.startswith("engram_recovery/bench/") for n in names)
    assert any(n.startswith("engram_recovery/testbed/") and n.endswith(".sql") for n in names)
