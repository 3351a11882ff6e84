"""The compose override parses beside Engram's compose file, and says what the deployment needs.

`docker-compose config` (Debian's docker-compose package; scripts/setup installs it where apt is
available) merges Engram's file with ours exactly as `docker compose up` would, without an engine.
The Engram file is tests/deploy/fixtures/engram-compose.yml (our own text with the service names,
network, environment and profiles of Engram 0.18.1's docker-compose.yml); set ENGRAM_COMPOSE_FILE to
Engram's real docker-compose.yml to check against it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = ROOT / "deploy" / "compose.engram-recovery.yml"
LOCALHOST = ROOT / "deploy" / "compose.postgres-localhost.yml"
FIXTURE = Path(__file__).with_name("fixtures") / "engram-compose.yml"
COMPOSE = shutil.which("docker-compose")
ADDRESSING = ("DATABASE_URL", "QDRANT_URL", "STORAGE_SCHEME", "STORAGE_HOST", "STORAGE_PORT")

pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="docker-compose is not installed: `apt-get install docker-compose` (scripts/setup does it when apt is "
    "available and it runs as root)",
)

ENGRAM_FILES = [pytest.param(FIXTURE, id="fixture")]
if os.environ.get("ENGRAM_COMPOSE_FILE"):
    ENGRAM_FILES.append(pytest.param(Path(os.environ["ENGRAM_COMPOSE_FILE"]), id="ENGRAM_COMPOSE_FILE"))


def merged(engram_file: Path, tmp_path: Path, *overrides: Path, profile: str | None = None) -> dict[str, Any]:
    """`docker-compose -f docker-compose.yml -f <override> config` in an Engram directory, as parsed YAML."""
    project = tmp_path / "engram"
    project.mkdir(exist_ok=True)
    shutil.copy(engram_file, project / "docker-compose.yml")
    # The operator's files: Engram's .env (as .env.example fills it) and our two secret files.
    (project / ".env").write_text("SECRET_KEY_BASE=x\nJWT_SECRET=y\nENCRYPTION_MASTER_KEY=k\nSTORAGE_BACKEND=database\n"
                                  "EMBED_BACKEND=ollama\n")  # fmt: skip
    # As the README says: this repository checked out as ./engram-recovery, our files copied next to Engram's.
    if not (project / "engram-recovery").exists():
        (project / "engram-recovery").symlink_to(ROOT)
    secrets = project / "engram-recovery-secrets"
    secrets.mkdir(exist_ok=True)
    for name in ("http.token", "backup.key"):
        (secrets / name).write_text("not-a-real-secret\n")
    argv = [str(COMPOSE), *(["--profile", profile] if profile else []), "-f", "docker-compose.yml"]
    for override in overrides:
        shutil.copy(override, project / override.name)
        argv += ["-f", override.name]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run([*argv, "config"], cwd=project, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    # docker-compose is a Python program that depends on PyYAML: its own interpreter reads the YAML.
    interpreter = Path(str(COMPOSE)).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
    script = "import json,sys,yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    as_json = subprocess.run([*interpreter, "-c", script], input=done.stdout, capture_output=True, text=True,
                             check=True)  # fmt: skip
    config: dict[str, Any] = json.loads(as_json.stdout)
    return config


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@pytest.mark.parametrize("engram_file", ENGRAM_FILES)
def test_the_override_parses_beside_engram_and_joins_its_network_and_addressing(
    engram_file: Path, tmp_path: Path
) -> None:
    config = merged(engram_file, tmp_path, OVERRIDE)
    services = config["services"]
    assert {"engram", "postgres", "qdrant", "engram-recovery", "engram-recovery-schedule"} <= set(services)
    engram = environment(services["engram"])
    for name in ("engram-recovery", "engram-recovery-schedule"):
        ours = services[name]
        env = environment(ours)
        # The same service addressing as Engram's own app, on the same network.
        assert {k: env[k] for k in ADDRESSING} == {k: engram[k] for k in ADDRESSING}
        assert "default" in ours["networks"]
        assert ours["depends_on"]["postgres"]["condition"] == "service_healthy"
        # Engram's .env is read (ENCRYPTION_MASTER_KEY comes from there) ...
        assert env["ENCRYPTION_MASTER_KEY"] == "k"
        # ... and our secrets arrive as files, never as values.
        assert env["ENGRAM_RECOVERY_HTTP_TOKEN_FILE"] == "/run/secrets/engram_recovery_http_token"
        assert env["ENGRAM_RECOVERY_BACKUP_KEY_FILE"] == "/run/secrets/engram_recovery_backup_key"
        assert "ENGRAM_RECOVERY_HTTP_TOKEN" not in env and "ENGRAM_RECOVERY_BACKUP_KEY" not in env
        assert "not-a-real-secret" not in json.dumps(ours)
        assert env["ENGRAM_RECOVERY_REPOSITORY"] == "/backups"
        assert any(":/backups" in str(v) or (isinstance(v, dict) and v.get("target") == "/backups")
                   for v in ours["volumes"])  # fmt: skip
        assert ours["build"]["dockerfile"] == "deploy/Dockerfile"
    server = services["engram-recovery"]
    assert server["command"] == ["serve", "--http"]
    published = json.dumps(server["ports"])
    assert "127.0.0.1" in published and "8765" in published and "0.0.0.0" not in published
    schedule = services["engram-recovery-schedule"]
    assert schedule["command"] == ["schedule", "--log", "/backups/engram-recovery.jsonl"]
    assert environment(schedule)["ENGRAM_RECOVERY_BACKUP_AT"] == "03:15"
    # No HTTP there, so no HTTP healthcheck (compose writes `disable: true` as the test NONE).
    assert "ports" not in schedule and (schedule["healthcheck"].get("disable") is True
                                        or schedule["healthcheck"].get("test") == ["NONE"])  # fmt: skip
    assert set(config["secrets"]) == {"engram_recovery_http_token", "engram_recovery_backup_key"}
    # Engram's own services are left as they were: still only port 4000 of the app published.
    assert "ports" not in services["postgres"]


@pytest.mark.parametrize("engram_file", ENGRAM_FILES)
def test_the_override_parses_with_the_s3_profile_and_with_postgres_on_loopback(
    engram_file: Path, tmp_path: Path
) -> None:
    with_s3 = merged(engram_file, tmp_path, OVERRIDE, profile="s3")
    assert "minio" in with_s3["services"] and "engram-recovery" in with_s3["services"]
    bare_host = merged(engram_file, tmp_path, LOCALHOST)
    ports = json.dumps(bare_host["services"]["postgres"]["ports"])
    assert "127.0.0.1" in ports and "5432" in ports and "0.0.0.0" not in ports
    both = merged(engram_file, tmp_path, LOCALHOST, OVERRIDE)
    assert "engram-recovery" in both["services"] and "ports" in both["services"]["postgres"]


def test_operator_settings_from_env_change_the_schedule_the_port_and_the_repository(tmp_path: Path) -> None:
    config = merged(FIXTURE, tmp_path, OVERRIDE)  # defaults first, then the operator's choices
    assert environment(config["services"]["engram-recovery-schedule"])["ENGRAM_RECOVERY_DRILL_ON"] == "sun"
    project = tmp_path / "engram"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ENGRAM_RECOVERY_BACKUP_AT": "01:05",
           "ENGRAM_RECOVERY_DRILL_ON": "never", "ENGRAM_RECOVERY_HTTP_PUBLISH": "9911",
           "ENGRAM_RECOVERY_REPOSITORY": "s3://offsite/engram"}
    done = subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "-f", OVERRIDE.name, "config"], cwd=project,
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ENGRAM_RECOVERY_BACKUP_AT: 01:05" in done.stdout or "ENGRAM_RECOVERY_BACKUP_AT: '01:05'" in done.stdout
    assert "ENGRAM_RECOVERY_DRILL_ON: never" in done.stdout and "s3://offsite/engram" in done.stdout
    assert "127.0.0.1" in done.stdout and "9911" in done.stdout
