"""The demo builds a working deployment; the wheel installs under one package name only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio.to_thread
import asyncpg
import pytest
from support import EXE, path_without_postgres, pg_bin

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
        # It said what it would do to that server before doing it.
        assert f"drops and re-creates the database {database}" in result.stderr
        assert "engram_app, engram_owner, engram_super, engram_backup" in result.stderr
        # --down drops what it made on a server it was given (the server itself stays).
        down = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [EXE, "demo", "--down", "--dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=60,
            env=env))  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert f"dropped database {database}" in down.stderr and not (tmp_path / "demo").exists()
        conn = await asyncpg.connect(admin_dsn)
        try:
            assert not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A demo directory the postgres OS user can reach (pytest's tmp_path is closed to other users)."""
    parent = Path(tempfile.mkdtemp(prefix="engram-demo-test-"))
    parent.chmod(0o711)
    try:
        yield parent / "demo"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_demo_and_the_backup_path_work_on_a_machine_without_postgresql(tmp_path: Path, demo_dir: Path) -> None:
    """No PostgreSQL binary on PATH, no server running: the bundled 18 serves, dumps and restores."""
    hidden = path_without_postgres(tmp_path / "path")
    assert all(shutil.which(tool, path=hidden) is None for tool in ("pg_dump", "pg_restore", "psql", "initdb"))
    env = {"PATH": hidden, "HOME": str(tmp_path)}
    result = run(["demo", "--no-serve", "--dir", str(demo_dir)], env)
    assert result.returncode == 0, result.stderr
    assert "starting the bundled PostgreSQL 18" in result.stderr and "drops and re-creates the database" \
        in result.stderr
    postgres = next(c for c in json.loads(result.stdout)["checks"] if c["component"] == "postgres")
    assert postgres["status"] == "ok" and postgres["details"]["server_version"].startswith("18.")
    assert (postgres["details"]["pg_dump"]["origin"], postgres["details"]["pg_dump"]["path"]) == \
        ("bundled", pg_bin("pg_dump"))
    port = int(urlsplit(next(line.split("=", 1)[1] for line in (demo_dir / "engram.env").read_text().splitlines()
                             if line.startswith("DATABASE_URL="))).port or 0)  # fmt: skip
    try:
        backup = run(["--env-file", str(demo_dir / "engram.env"), "call", "run_backup"], env)
        assert backup.returncode == 0, backup.stderr
        backup_id = json.loads(backup.stdout)["backup_id"]
        manifest = json.loads((demo_dir / "backups" / "backups" / backup_id / "manifest.json").read_text())
        assert manifest["database"]["pg_dump_path"] == pg_bin("pg_dump")
        assert manifest["database"]["pg_dump_version"].startswith("pg_dump (PostgreSQL) 18.")
        drill = run(["--env-file", str(demo_dir / "engram.env"), "call", "restore_drill"], env)
        assert drill.returncode == 0, drill.stdout + drill.stderr
        assert json.loads(drill.stdout)["verdict"] == "ok"
    finally:
        down = run(["demo", "--down", "--dir", str(demo_dir)], env)
    assert down.returncode == 0, down.stderr
    assert "stopped the bundled PostgreSQL" in down.stderr and not demo_dir.exists() and not listening(port)


def test_the_demo_refuses_a_busy_http_port_before_it_touches_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        for argv, extra in ((["--port", str(port)], {}), ([], {"ENGRAM_RECOVERY_HTTP_PORT": str(port)})):
            result = run(["demo", "--dir", str(tmp_path / "demo"), *argv], env | extra, timeout=30)
            assert result.returncode == 2
            assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "--port N" in result.stderr
            assert not (tmp_path / "demo").exists()


def test_demo_down_stops_a_serving_demo_and_removes_its_cluster(tmp_path: Path, demo_dir: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "demo.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([EXE, "demo", "--dir", str(demo_dir)], stdout=subprocess.DEVNULL, stderr=stderr,
                                  env=env | {"ENGRAM_RECOVERY_HTTP_PORT": str(port)})  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not listening(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        down = run(["demo", "--down", "--dir", str(demo_dir)], env)
        assert down.returncode == 0, down.stderr
        assert server.wait(timeout=30) is not None
        assert "stopped the demo's MCP server" in down.stderr and "stopped the bundled PostgreSQL" in down.stderr
        assert not listening(port) and not demo_dir.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


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
    # Every package of the source tree is in the wheel (pyproject lists them one by one).
    packages = [
        init.relative_to(ROOT).as_posix() for top in ("core", "tools", "server", "testbed")
        for init in (ROOT / top).rglob("__init__.py") if "__pycache__" not in init.parts
    ]
    assert len(packages) >= 5
    for module in ("server/app.py", "core/settings.py", "testbed/schema.py", *packages):
        assert f"engram_recovery/{module}" in names
    assert not any(n.startswith("engram_recovery/tests/") or n.startswith("engram_recovery/bench/") for n in names)
    assert any(n.startswith("engram_recovery/testbed/") and n.endswith(".sql") for n in names)
