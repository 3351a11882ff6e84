"""Is this PostgreSQL ready for continuous archiving by a streaming sidecar (Barman), and what exactly to change.

`gather` reads the server's facts (settings, roles, slots, pg_hba, the archiver's
statistics) in one read-only pass; `judge` turns them into checks, each with its
verdict and its fix, without any I/O (tested on hand-made facts as well as real
servers); `remedies` writes the fixes out twice: as a `command:` override for
Engram's compose stack and as SQL for a bare host, with the restart or reload they need.

Barman in streaming mode needs the replication protocol, not `archive_command`:
wal_level replica, WAL senders for pg_receivewal and pg_basebackup at once, a
physical slot so no WAL is recycled while the receiver is away, a LOGIN REPLICATION
role, and a pg_hba `replication` rule for the sidecar. archive_timeout bounds how
long a quiet server keeps the newest writes in a segment that is not yet complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field

from ..errors import RecoveryError
from ..stores.postgres import Connection, Pool, PostgresError
from ..verdict import Verdict, worst

# The settings Barman's streaming needs, with the value we recommend setting them to.
RECOMMENDED = {"wal_level": "replica", "max_wal_senders": "10", "max_replication_slots": "10", "archive_timeout": "60"}
RESTART_SETTINGS = frozenset({"wal_level", "max_wal_senders", "max_replication_slots", "archive_mode"})
MAX_ARCHIVE_TIMEOUT = 60  # seconds: the recovery point objective the issue asks for
COMPOSE_SERVICE = "postgres"  # the database service in Engram's docker-compose.yml
_SETTINGS = ("wal_level", "archive_mode", "archive_command", "archive_library", "archive_timeout", "max_wal_senders",
             "max_replication_slots", "summarize_wal", "server_version_num")  # fmt: skip


class ArchivingCheck(BaseModel):
    name: str
    status: Verdict
    summary: str = Field(description="One line for a human: what was found.")
    fix: str | None = Field(default=None, description="What to change, in words; the exact commands are below.")
    settings: dict[str, str] = Field(default_factory=dict, description="Server settings to change: name -> value.")
    sql: list[str] = Field(default_factory=list, description="Statements to run as a superuser.")
    hba_line: str | None = Field(default=None, description="A line to add to pg_hba.conf (then reload).")


@dataclass
class ServerFacts:
    """What `judge` needs to know about the server, read by `gather`."""

    settings: dict[str, str]
    walsenders: int = 0
    receiver_connected: bool = False
    slots_used: int = 0
    role: dict[str, bool] | None = None  # rolreplication, rolcanlogin, rolsuper; None: no such role
    slot: dict[str, Any] | None = None  # slot_type, active, wal_status, retained_bytes; None: no such slot
    hba_rules: list[dict[str, Any]] | None = None  # None: pg_hba_file_rules could not be read
    hba_problem: str | None = None
    archiver: dict[str, Any] = field(default_factory=dict)
    data_directory: str | None = None


async def gather(conn: Connection, role: str, slot: str) -> ServerFacts:
    rows = await conn.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])", list(_SETTINGS))
    facts = ServerFacts(settings={r["name"]: r["setting"] for r in rows})
    facts.walsenders = int(await conn.fetchval("SELECT count(*) FROM pg_stat_replication") or 0)
    facts.receiver_connected = bool(await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1 AND active)", slot))  # fmt: skip
    facts.slots_used = int(await conn.fetchval("SELECT count(*) FROM pg_replication_slots") or 0)
    found = await conn.fetchrow("SELECT rolreplication, rolcanlogin, rolsuper FROM pg_roles WHERE rolname = $1", role)
    facts.role = dict(found) if found is not None else None
    found = await conn.fetchrow(
        "SELECT slot_type, active, wal_status, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes "
        "FROM pg_replication_slots WHERE slot_name = $1", slot)  # fmt: skip
    facts.slot = dict(found) if found is not None else None
    archiver = await conn.fetchrow("SELECT archived_count, failed_count, last_archived_time, last_failed_time, "
                                   "last_failed_wal FROM pg_stat_archiver")  # fmt: skip
    facts.archiver = dict(archiver) if archiver is not None else {}
    try:
        # Superusers only by default: a finding when it cannot be read, not an error.
        async with conn.transaction(readonly=True):
            hba = await conn.fetch("SELECT line_number, type, database, user_name, address, auth_method, error "
                                   "FROM pg_hba_file_rules ORDER BY line_number")  # fmt: skip
        facts.hba_rules = [dict(r) for r in hba]
        facts.data_directory = str(await conn.fetchval("SHOW data_directory"))
    except PostgresError as exc:
        facts.hba_problem = f"{exc.__class__.__name__}: {exc}"
    return facts


def _int(facts: ServerFacts, name: str) -> int:
    return int(facts.settings.get(name) or 0)


def _wal_level(facts: ServerFacts) -> ArchivingCheck:
    level = facts.settings.get("wal_level", "unknown")
    if level in ("replica", "logical"):
        return ArchivingCheck(name="wal_level", status="ok", summary=f"wal_level is {level}")
    return ArchivingCheck(name="wal_level", status="fail",
                          summary=f"wal_level is {level}: the WAL cannot rebuild a base backup or be streamed",
                          fix="set wal_level to replica (restart)", settings={"wal_level": "replica"})  # fmt: skip


def _senders(facts: ServerFacts) -> ArchivingCheck:
    limit, used = _int(facts, "max_wal_senders"), facts.walsenders
    # pg_receivewal holds one sender all the time and pg_basebackup takes another during a backup.
    needed = used + (1 if facts.receiver_connected else 2)
    summary = f"max_wal_senders is {limit}, {used} in use"
    if limit == 0:
        status: Verdict = "fail"
        summary += ": no replication connection is possible"
    elif limit < needed:
        status = "warn"
        summary += f": a base backup while WAL streams needs {needed}"
    else:
        return ArchivingCheck(name="max_wal_senders", status="ok", summary=summary)
    value = str(max(10, needed))
    return ArchivingCheck(name="max_wal_senders", status=status, summary=summary,
                          fix=f"set max_wal_senders to {value} (restart)",
                          settings={"max_wal_senders": value})  # fmt: skip


def _slots(facts: ServerFacts, slot: str) -> ArchivingCheck:
    limit = _int(facts, "max_replication_slots")
    summary = f"max_replication_slots is {limit}, {facts.slots_used} in use"
    if limit == 0 or (facts.slot is None and facts.slots_used >= limit):
        return ArchivingCheck(name="max_replication_slots", status="fail",
                              summary=summary + f": no free slot for {slot!r}",
                              fix=f"set max_replication_slots to {max(10, facts.slots_used + 1)} (restart)",
                              settings={"max_replication_slots": str(max(10, facts.slots_used + 1))})  # fmt: skip
    return ArchivingCheck(name="max_replication_slots", status="ok", summary=summary)


def _role(facts: ServerFacts, role: str) -> ArchivingCheck:
    found = facts.role
    password = f"\\password {role}"  # psql asks for it: no password in a command line or in our output
    if found is None:
        return ArchivingCheck(name="replication_role", status="fail", summary=f"there is no role {role!r}",
                              fix=f"create the LOGIN REPLICATION role {role} and give it a password",
                              sql=[f"CREATE ROLE {role} WITH LOGIN REPLICATION;", password])  # fmt: skip
    missing = [w for w, key in (("REPLICATION", "rolreplication"), ("LOGIN", "rolcanlogin"))
               if not found[key] and not (key == "rolreplication" and found["rolsuper"])]  # fmt: skip
    if missing:
        return ArchivingCheck(name="replication_role", status="fail",
                              summary=f"role {role!r} lacks {' and '.join(missing)}",
                              fix=f"give {role} {' and '.join(missing)}",
                              sql=[f"ALTER ROLE {role} WITH {' '.join(missing)};"])  # fmt: skip
    return ArchivingCheck(name="replication_role", status="ok", summary=f"role {role!r} can log in and replicate")


def _slot(facts: ServerFacts, slot: str) -> ArchivingCheck:
    found = facts.slot
    # Reserved now: the server keeps WAL from this moment even before the receiver first connects, and
    # pg_receivewal (PostgreSQL 15+) starts from the slot's position. Barman's own create_slot does not reserve.
    create = f"SELECT pg_create_physical_replication_slot('{slot}', true);"
    if found is None:
        return ArchivingCheck(
            name="replication_slot", status="warn",
            summary=f"no replication slot {slot!r}: WAL the receiver has not fetched yet may be recycled",
            fix=f"create the physical slot {slot}, reserving WAL from now on, before Barman's receiver starts",
            sql=[create],
        )  # fmt: skip
    if found["slot_type"] != "physical":
        return ArchivingCheck(name="replication_slot", status="fail",
                              summary=f"slot {slot!r} is a {found['slot_type']} slot; streaming needs a physical one",
                              fix=f"drop it and create a physical slot {slot} (or name another slot in Barman)",
                              sql=[f"SELECT pg_drop_replication_slot('{slot}');", create])  # fmt: skip
    if found["wal_status"] == "lost":
        return ArchivingCheck(name="replication_slot", status="fail",
                              summary=f"slot {slot!r} has lost WAL: the archive has a gap after it",
                              fix=f"re-create the slot {slot}, restart `barman receive-wal`, take a new base backup",
                              sql=[f"SELECT pg_drop_replication_slot('{slot}');", create])  # fmt: skip
    retained = int(found["retained_bytes"] or 0)
    if not found["active"]:
        return ArchivingCheck(
            name="replication_slot", status="warn",
            summary=f"slot {slot!r} exists but no receiver is connected; the server keeps "
                    f"{retained / 2**20:.0f} MiB of WAL for it, and keeps growing",
            fix="start Barman's receiver (`barman cron`, run every minute) or drop the slot if it is not used",
        )  # fmt: skip
    return ArchivingCheck(name="replication_slot", status="ok",
                          summary=f"slot {slot!r} is physical and its receiver is connected")  # fmt: skip


def _archive_mode(facts: ServerFacts) -> ArchivingCheck:
    mode = facts.settings.get("archive_mode", "off")
    command = facts.settings.get("archive_command") or facts.settings.get("archive_library")
    if mode == "off":
        return ArchivingCheck(name="archive_mode", status="ok",
                              summary="archive_mode is off: not needed, Barman streams the WAL")  # fmt: skip
    if not command:
        return ArchivingCheck(name="archive_mode", status="warn",
                              summary=f"archive_mode is {mode} with no archive_command: pg_wal keeps every segment",
                              fix="turn archive_mode off (restart): streaming does not need it",
                              settings={"archive_mode": "off"})  # fmt: skip
    failed, archived = facts.archiver.get("last_failed_time"), facts.archiver.get("last_archived_time")
    if failed is not None and (archived is None or failed > archived):
        return ArchivingCheck(name="archive_mode", status="warn",
                              summary=f"archive_command is failing (last failure {failed:%Y-%m-%d %H:%M:%S %Z}, "
                                      f"WAL {facts.archiver.get('last_failed_wal')}): pg_wal grows until it works",
                              fix="fix archive_command (the server log says why it fails) or turn archive_mode off")
    return ArchivingCheck(name="archive_mode", status="ok", summary=f"archive_mode is {mode}; archive_command works")


def _archive_timeout(facts: ServerFacts) -> ArchivingCheck:
    timeout = _int(facts, "archive_timeout")
    if 0 < timeout <= MAX_ARCHIVE_TIMEOUT:
        return ArchivingCheck(name="archive_timeout", status="ok",
                              summary=f"archive_timeout is {timeout} s: a quiet server's writes are archived "
                                      f"within {timeout} s")  # fmt: skip
    now = "off" if timeout == 0 else f"{timeout} s"
    return ArchivingCheck(
        name="archive_timeout", status="warn",
        summary=f"archive_timeout is {now}: Barman archives complete 16 MiB segments only, so on a quiet server "
                "the newest writes can wait hours for theirs",
        fix=f"set archive_timeout to {MAX_ARCHIVE_TIMEOUT} (a reload is enough)",
        settings={"archive_timeout": str(MAX_ARCHIVE_TIMEOUT)},
    )  # fmt: skip


def _hba_matches(rule: dict[str, Any], role: str) -> bool:
    users = rule.get("user_name") or []
    return (rule.get("type") in ("host", "hostssl", "hostnossl") and "replication" in (rule.get("database") or [])
            and ("all" in users or role in users or any(u.startswith("+") for u in users)))  # fmt: skip


def _hba(facts: ServerFacts, role: str) -> ArchivingCheck:
    line = f"host replication {role} samenet scram-sha-256"
    if facts.hba_rules is None:
        return ArchivingCheck(name="pg_hba", status="warn",
                              summary=f"pg_hba.conf could not be read ({facts.hba_problem})",
                              fix=f"as a superuser, check that pg_hba.conf lets {role} connect for replication "
                                  "from the sidecar's address", hba_line=line)  # fmt: skip
    broken = [r for r in facts.hba_rules if r.get("error")]
    matching = [r for r in facts.hba_rules if _hba_matches(r, role)]
    if matching and matching[0]["auth_method"] != "reject":
        rule = matching[0]
        where = rule.get("address") or "local"
        status: Verdict = "warn" if broken else "ok"
        note = f"; {len(broken)} line(s) of pg_hba.conf have errors" if broken else ""
        return ArchivingCheck(name="pg_hba", status=status,
                              summary=f"pg_hba.conf line {rule['line_number']} lets {role} replicate from {where} "
                                      f"({rule['auth_method']}){note}; whether the sidecar's address matches "
                                      "cannot be seen from here")  # fmt: skip
    summary = (f"pg_hba.conf line {matching[0]['line_number']} rejects replication for {role}" if matching
               else f"no pg_hba.conf line allows replication connections for {role} over TCP")  # fmt: skip
    return ArchivingCheck(name="pg_hba", status="fail", summary=summary,
                          fix="add a `replication` line for the role, before any line that rejects it, then reload",
                          hba_line=line)  # fmt: skip


def _summarize_wal(facts: ServerFacts) -> ArchivingCheck:
    state = facts.settings.get("summarize_wal", "off")
    return ArchivingCheck(name="summarize_wal", status="ok",
                          summary=f"summarize_wal is {state}: not needed (Barman's streaming base backups are full)")


def judge(facts: ServerFacts, role: str, slot: str) -> list[ArchivingCheck]:
    """Every check, in the order an operator would fix them."""
    return [_wal_level(facts), _senders(facts), _slots(facts, slot), _archive_mode(facts), _archive_timeout(facts),
            _role(facts, role), _slot(facts, slot), _hba(facts, role), _summarize_wal(facts)]  # fmt: skip


class Remedies(BaseModel):
    restart_needed: bool = Field(description="A changed setting takes effect only after a server restart.")
    compose_override: str | None = Field(description="docker-compose.override.yml for Engram's stack, or None.")
    compose_commands: list[str] = Field(description="Commands to run from Engram's compose directory, in order.")
    host_commands: list[str] = Field(description="For a bare host: SQL (psql as a superuser) and shell, in order.")


def remedies(checks: list[ArchivingCheck], database: str, user: str, data_directory: str | None = None) -> Remedies:
    """The exact changes for the checks that are not ok, for Engram's compose stack and for a bare host."""
    todo = [c for c in checks if c.status != "ok"]
    changes: dict[str, str] = {}
    for check in todo:
        changes.update(check.settings)
    sql = [s for c in todo for s in c.sql]
    hba = [c.hba_line for c in todo if c.hba_line and c.status == "fail"]
    restart = any(name in RESTART_SETTINGS for name in changes)
    override = None
    compose: list[str] = []
    psql = f"docker compose exec -it {COMPOSE_SERVICE} psql -U {user} -d {database}"
    if changes:
        flags = " ".join(f"-c {name}={value}" for name, value in changes.items())
        override = (f"# docker-compose.override.yml beside Engram's docker-compose.yml; keep any -c flags your\n"
                    f"# {COMPOSE_SERVICE} service already passes\nservices:\n  {COMPOSE_SERVICE}:\n"
                    f"    command: postgres {flags}\n")  # fmt: skip
        compose.append(f"docker compose up -d {COMPOSE_SERVICE}  # re-creates the container with the new settings")
    compose += [f'{psql} -c "{s}"' for s in sql]
    compose += [f"docker compose exec {COMPOSE_SERVICE} sh -c 'echo \"{line}\" >> \"$PGDATA/pg_hba.conf\"'"
                for line in hba]  # fmt: skip
    if hba:
        compose.append(f'{psql} -c "SELECT pg_reload_conf();"')
    data_directory = data_directory or "<data_directory>"
    host = [f"ALTER SYSTEM SET {name} = '{value}';" for name, value in changes.items()]
    if restart:
        # Before the SQL: a slot cannot be created while max_replication_slots is still 0.
        host.append(f"# restart PostgreSQL: systemctl restart postgresql, or pg_ctl restart -D {data_directory}")
    elif changes:
        host.append("SELECT pg_reload_conf();")
    host += sql
    host += [f"# add to pg_hba.conf (SHOW hba_file;), before any line that rejects it: {line}" for line in hba]
    if hba:
        host.append("SELECT pg_reload_conf();")
    return Remedies(restart_needed=restart, compose_override=override, compose_commands=compose, host_commands=host)


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class ArchivingReport(BaseModel):
    verdict: Verdict = Field(description="fail: streaming archiving cannot work yet; warn: it works with a risk.")
    summary: str
    server_version: str
    replication_role: str
    slot_name: str
    checks: list[ArchivingCheck]
    remedies: Remedies


async def assess(pool: Pool, dsn: str, role: str, slot: str) -> ArchivingReport:
    """Read the server of `dsn` through `pool`, judge it and write out the remedies."""
    async with pool.acquire() as conn:
        try:
            facts = await gather(conn, role, slot)
        except PostgresError as exc:
            raise RecoveryError(f"could not read the server's archiving settings: {exc}",
                                "connect as a role that may read pg_settings, pg_roles and "
                                "pg_replication_slots (Engram's own superuser does)") from exc  # fmt: skip
    checks = judge(facts, role, slot)
    verdict = worst([c.status for c in checks])
    parts = urlsplit(dsn)
    database, user = unquote(parts.path.lstrip("/")) or "postgres", unquote(parts.username or "postgres")
    out = remedies(checks, database, user, facts.data_directory)
    bad = [f"{c.name}: {c.summary}" for c in checks if c.status != "ok"]
    summary = ("ready for streaming archiving" if not bad
               else ("NOT ready: " if verdict == "fail" else "works, but: ") + " | ".join(bad))  # fmt: skip
    version = int(facts.settings.get("server_version_num") or 0)
    return ArchivingReport(verdict=verdict, summary=summary, server_version=f"{version // 10000}.{version % 10000}",
                           replication_role=role, slot_name=slot, checks=checks, remedies=out)  # fmt: skip
