"""Settings: Engram's variables, .env files, *_FILE secrets, and messages that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_recovery.core.errors import ConfigurationError, scrub
from engram_recovery.core.settings import load_settings

BASE = {"DATABASE_URL": "postgresql://engram:hunter2pw@db.example:5432/engram"}


def test_reads_engram_variables_and_defaults() -> None:
    s = load_settings(environ=BASE | {"STORAGE_BACKEND": "database", "QDRANT_COLLECTION": "notes_v2"})
    assert s.database_name == "engram"
    assert s.qdrant_collection == "notes_v2"
    assert s.storage_bucket == "engram-attachments"
    assert s.encryption_master_key_version == 1
    assert s.access == "full"


def test_accepts_engrams_ecto_url_form() -> None:
    s = load_settings(environ={"DATABASE_URL": "ecto://engram:pw12345@localhost/engram_prod"})
    assert s.database_url.get_secret_value().startswith("postgresql://")
    assert s.database_name == "engram_prod"


@pytest.mark.parametrize(
    ("environ", "named", "hidden"),
    [
        ({}, ["DATABASE_URL is not set", "postgresql://"], []),
        (BASE | {"STORAGE_PORT": "not-a-port-xyzzy"}, ["STORAGE_PORT"], ["xyzzy"]),
        (BASE | {"STORAGE_BACKEND": "s3"}, ["STORAGE_ACCESS_KEY_ID", "STORAGE_SECRET_ACCESS_KEY"], []),
        (BASE | {"QDRANT_URL": "http://q:6333", "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:"},
         ["QDRANT_URL", "ENGRAM_RECOVERY_QDRANT_PATH"], []),
        (BASE | {"ENGRAM_RECOVERY_ACCESS": "admin"}, ["ENGRAM_RECOVERY_ACCESS"], []),
    ],
    ids=["missing database url", "malformed number", "s3 without credentials", "conflicting qdrant settings",
         "unknown access level"],
)  # fmt: skip
def test_a_rejected_configuration_names_the_variables_and_never_echoes_the_value(
    environ: dict[str, str], named: list[str], hidden: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as err:
        load_settings(environ=environ)
    text = f"{err.value.message} {err.value.hint}"
    assert all(name in text for name in named), text
    assert not any(value in text for value in hidden), text


def test_secret_from_file_and_conflict_with_inline_value(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text("c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkwMTI=\n")
    s = load_settings(environ=BASE | {"ENCRYPTION_MASTER_KEY_FILE": str(key_file)})
    assert s.encryption_master_key is not None
    assert s.encryption_master_key.get_secret_value() == "c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkwMTI="
    with pytest.raises(ConfigurationError) as err:
        load_settings(environ=BASE | {"ENCRYPTION_MASTER_KEY_FILE": str(key_file), "ENCRYPTION_MASTER_KEY": "x"})
    assert "ENCRYPTION_MASTER_KEY_FILE" in str(err.value)
    with pytest.raises(ConfigurationError) as missing:
        load_settings(environ=BASE | {"ENCRYPTION_MASTER_KEY_FILE": str(tmp_path / "nope")})
    assert "cannot be read" in str(missing.value)


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# Engram's .env\n"
        "export DATABASE_URL='postgresql://engram:pw9999@file-host/engram'\n"
        'QDRANT_COLLECTION="from_file"  \n'
        "STORAGE_BUCKET=bucket-from-file # trailing comment\n"
    )
    s = load_settings(environ={"QDRANT_COLLECTION": "from_env"}, env_file=env)
    assert s.qdrant_collection == "from_env"
    assert s.storage_bucket == "bucket-from-file"
    assert "file-host" in s.database_url.get_secret_value()


def test_bad_env_file_line_names_the_line(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("DATABASE_URL=postgresql://x@y/z\nthis is not valid\n")
    with pytest.raises(ConfigurationError) as err:
        load_settings(environ={}, env_file=env)
    assert "line 2" in str(err.value)


def test_redacted_configuration_hides_every_secret() -> None:
    secrets = {
        "ENCRYPTION_MASTER_KEY": "bWFzdGVyLWtleS1zZWNyZXQtdmFsdWUtMTIzNDU2Nzg=",
        "STORAGE_SECRET_ACCESS_KEY": "s3-secret-value-abcdef",
        "ENGRAM_RECOVERY_HTTP_TOKEN": "http-token-value-0123456789",
        "ENGRAM_RECOVERY_BACKUP_KEY": "YmFja3VwLWtleS12YWx1ZS0xMjM0NTY3ODkwMTIzNA==",
    }
    s = load_settings(environ=BASE | secrets | {"STORAGE_BACKEND": "s3", "STORAGE_ACCESS_KEY_ID": "AKIDEXAMPLE"})
    shown = repr(s.redacted()) + repr(s) + str(s)
    for value in [*secrets.values(), "hunter2pw"]:
        assert value not in shown
    assert s.redacted()["DATABASE_URL"] == "postgresql://engram:***@db.example:5432/engram"
    assert s.redacted()["STORAGE_ACCESS_KEY_ID"] == "AKIDEXAMPLE"


def test_scrub_removes_registered_secrets_and_url_passwords() -> None:
    load_settings(environ=BASE | {"STORAGE_SECRET_ACCESS_KEY": "very-secret-s3-key-42"})
    text = scrub("connect postgresql://engram:hunter2pw@h/db failed; key very-secret-s3-key-42; password=abc123")
    assert "hunter2pw" not in text and "very-secret-s3-key-42" not in text and "abc123" not in text


def test_read_only_access_level() -> None:
    assert load_settings(environ=BASE | {"ENGRAM_RECOVERY_ACCESS": "read-only"}).access == "read-only"
