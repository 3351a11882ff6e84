"""deploy/Dockerfile, read as text (no engine runs here): non-root, no secret baked in or copied in, a healthcheck
that exists. What the build's RUN line does (pip install of this repository, then the bundled pg_dump) was run by hand
in a fresh virtualenv; building and running the image were not."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
IGNORED = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")}  # fmt: skip


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_as_an_unprivileged_user_and_serves_mcp_over_http() -> None:
    steps = _instructions()
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    users = [rest for word, rest in final if word == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["engram-recovery"]') in final and ("CMD", '["serve", "--http"]') in final
    base = next(rest for word, rest in steps if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert base.startswith("PYTHON_IMAGE=python:3.") and "-slim" in base
    assert [rest for word, rest in steps if word == "FROM"] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]


def test_no_secret_is_baked_in_or_sent_to_the_build() -> None:
    for word, rest in _instructions():
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|KEY|PASSWORD|SECRET)\w*=", rest), rest
    # The demo's master key, backup key and token live in .demo/; a developer's in .venv or .env files.
    assert {".demo", ".venv", ".git"} <= IGNORED


def test_the_healthcheck_runs_a_module_the_package_has() -> None:
    check = next(rest for word, rest in _instructions() if word == "HEALTHCHECK")
    command = json.loads(check.split("CMD", 1)[1].strip())
    assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]) is not None
