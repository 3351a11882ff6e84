"""The `engram-recovery` command: serve MCP, call one tool (for cron), show the configuration."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal

import anyio

from .. import __version__
from ..core.errors import ConfigurationError, RecoveryError, scrub
from ..core.settings import Settings, load_settings

EXIT_OK, EXIT_WARN, EXIT_FAIL = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-recovery",
        description="Backup and disaster recovery for Engram, as an MCP server.",
    )
    parser.add_argument("--env-file", help="read settings from this Engram .env file (the environment wins)")
    parser.add_argument("--version", action="version", version=f"engram-recovery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures on stderr")
    parser.add_argument("--log-file", metavar="PATH", help="append a debug log (with tracebacks) to this file")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve MCP over stdio (default) or Streamable HTTP")
    serve.add_argument("--http", action="store_true", help="serve Streamable HTTP instead of stdio")
    serve.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8765)")

    call = sub.add_parser(
        "call",
        help="run one tool: a short summary on a terminal, JSON when piped (exit 0 ok, 1 warnings, 2 failure)",
        description="Run one tool in-process. On a terminal it prints a short summary (the verdict, one line per "
        "check or step); piped, or with --json, its structured result as JSON; with --jsonl, one JSON object on "
        "one line (time, tool, exit, verdict, result or error), for appending to a log. Exit code: 0 success, "
        "1 the check completed with warnings, 2 failure.",
    )
    shape = call.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the result as JSON even on a terminal")
    shape.add_argument("--jsonl", action="store_true",
                       help="print one JSON object on one line, errors included (for a log file: cron)")
    call.add_argument("tool", help="the tool to run (see `engram-recovery tools`)")
    call.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE",
        help="a tool argument, once per name; VALUE is read by the argument's type: true/false, a whole number, "
        "text, or JSON for an object",
    )

    decrypt = sub.add_parser(
        "decrypt",
        help="turn a backup artifact back into a stock pg_restore-able dump (decrypt, decompress, verify)",
        description="Decrypt (when encrypted) and decompress a backup artifact into exactly what pg_dump wrote, "
        "ready for stock pg_restore (or psql for a plain dump). The backup key is read from "
        "ENGRAM_RECOVERY_BACKUP_KEY or ENGRAM_RECOVERY_BACKUP_KEY_FILE, never from an argument. An altered, "
        "truncated or reordered artifact is refused and no output file is left behind.",
    )
    decrypt.add_argument(
        "source",
        help="an artifact file (e.g. db.dump.zst.enc copied from the repository), or backup:<id> to read that "
        "recovery point's database dump from the configured repository and check it against its manifest",
    )
    decrypt.add_argument(
        "-o", "--output",
        help="where to write the plain dump (default: the source's name without .enc/.zst/.gz; for backup:<id>, "
        "<id>.dump in the current directory); a directory dump becomes a directory",
    )

    backups = sub.add_parser(
        "backups",
        help="list the recovery points in the backup repository (a table; --json for machines)",
        description="List every backup in the repository, newest first: snapshot time, age, size, format, "
        "encryption, last verification and drill, and what retention will do to it. Needs only the repository "
        "settings (no database). Exit code: 0 listed, 2 the repository cannot be read or is misconfigured.",
    )
    backups.add_argument("--json", action="store_true", help="print the catalog as JSON (as the list_backups tool)")

    schedule = sub.add_parser(
        "schedule",
        help="run run_backup daily and restore_drill weekly (UTC), one JSON line per run, for a container "
        "without cron",
        description="A small scheduler for the container image (which has no cron): sleeps until the next time, "
        "runs `call <tool> --jsonl` as a fresh process, and appends its JSON line to --log and to stdout. Times "
        "are UTC. Settings are checked once at start (exit 2 when they are wrong).",
    )
    schedule.add_argument("--backup-at", default=os.environ.get("ENGRAM_RECOVERY_BACKUP_AT") or "03:15",
                          metavar="HH:MM", help="daily run_backup time, UTC (env ENGRAM_RECOVERY_BACKUP_AT; 03:15)")
    schedule.add_argument("--drill-on", default=os.environ.get("ENGRAM_RECOVERY_DRILL_ON") or "sun",
                          metavar="DAY", help="weekday of the restore_drill, or 'never' (env ENGRAM_RECOVERY_DRILL_ON; "
                          "sun)")
    schedule.add_argument("--drill-at", default=os.environ.get("ENGRAM_RECOVERY_DRILL_AT") or "04:30",
                          metavar="HH:MM", help="restore_drill time, UTC (env ENGRAM_RECOVERY_DRILL_AT; 04:30)")
    schedule.add_argument("--log", metavar="PATH", help="append each run's JSON line to this file too")
    schedule.add_argument("--run-now", action="store_true", help="run a backup at start, then keep the schedule")

    sub.add_parser("config", help="print the effective configuration, every secret redacted")
    sub.add_parser("tools", help="list the tools this configuration registers")

    demo = sub.add_parser("demo", help="create a demo Engram database and serve MCP against it")
    demo.add_argument("--admin-url", default=os.environ.get("ENGRAM_DEMO_ADMIN_URL") or None,
                      help="a PostgreSQL superuser URL to use (default: start the bundled PostgreSQL 18 in DIR/pg)")
    demo.add_argument("--dir", default=".demo", help="where the demo keeps its key, env file, backups, cluster")
    demo.add_argument("--no-serve", action="store_true", help="prepare the demo and exit")
    demo.add_argument("--database", default="engram_demo", help="name of the demo database (recreated)")
    demo.add_argument("--port", type=int, help="HTTP port (default ENGRAM_RECOVERY_HTTP_PORT, else 8765)")
    demo.add_argument("--down", action="store_true", help="stop and remove everything the demo made")
    return parser


class _OneLine(logging.Formatter):
    """Log records as single lines: a traceback never reaches stderr unless --debug asked for it."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return ""

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = ""
        saved = record.exc_info
        record.exc_info = None
        try:
            return super().format(record).replace("\n", " ")
        finally:
            record.exc_info = saved


def _configure_logging(debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("engram-recovery: %(levelname)s %(name)s: %(message)s") if debug
                        else _OneLine("engram-recovery: %(message)s"))
    stderr.setLevel(logging.DEBUG if debug else logging.WARNING)
    root.addHandler(stderr)
    root.setLevel(logging.DEBUG if debug or log_file else logging.WARNING)
    if log_file:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_file.setLevel(logging.DEBUG)
        root.addHandler(to_file)
    if not debug:
        # Libraries at DEBUG would flood the log file; ours is what explains a failure.
        for noisy in ("asyncio", "botocore", "aiobotocore", "urllib3", "httpx", "httpcore", "mcp", "sse_starlette"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _exit_code(result: dict[str, Any] | None, is_error: bool) -> int:
    if is_error:
        return EXIT_FAIL
    verdict = (result or {}).get("verdict")
    return {"warn": EXIT_WARN, "fail": EXIT_FAIL}.get(str(verdict), EXIT_OK)


Shape = Literal["human", "json", "jsonl"]


def _shape(json_flag: bool, jsonl_flag: bool) -> Shape:
    if jsonl_flag:
        return "jsonl"
    return "json" if json_flag or not sys.stdout.isatty() else "human"


def _log_line(tool: str, code: int, result: dict[str, Any] | None = None, error: str | None = None) -> str:
    """One JSON object on one line: what a cron log holds per run (warnings: exit 1, failures: exit 2)."""
    from datetime import UTC, datetime

    record: dict[str, Any] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "tool": tool, "exit": code,
                              "verdict": (result or {}).get("verdict") if error is None else "error"}  # fmt: skip
    if error is not None:
        record["error"] = error
    else:
        record["result"] = result
    return json.dumps(record, default=str, separators=(",", ":"))


async def _call(
    settings: Settings, tool: str, arguments: dict[str, Any] | Sequence[str], shape: Shape = "json"
) -> int:
    """Run one tool in-process, as the MCP tool runs it (server/invoke.py). `arguments`: JSON values, or
    `--arg` pairs to parse.

    Neither the MCP SDK nor any other tool's module is imported here: a cron line running backup_status
    would otherwise spend more than a second importing what it never uses (bench/bench_cli.py).
    """
    from ..core.runtime import Runtime
    from ..tools import registry
    from .invoke import ToolFailed, invoke

    spec = registry.load(tool)
    if settings.access != "full" and spec.writes:
        raise RecoveryError(
            f"{tool} is not available in read-only mode", "set ENGRAM_RECOVERY_ACCESS=full to run tools that write"
        )
    if not isinstance(arguments, dict):
        from .arguments import parse_cli

        arguments = parse_cli(spec, arguments)
    live = sys.stderr.isatty()

    async def on_progress(done: float, total: float | None = None, message: str | None = None) -> None:
        if live:
            of = f"/{total:g}" if total else ""
            sys.stderr.write(f"\r\x1b[2K{tool}: {done:g}{of} {message or ''}")
            sys.stderr.flush()

    structured: dict[str, Any] | None = None
    failure: str | None = None
    async with Runtime(settings) as runtime:
        try:
            result = await invoke(spec, runtime, arguments, on_progress)
            structured = spec.result_model.model_validate(result).model_dump(mode="json", by_alias=True)
        except ToolFailed as exc:
            failure = str(exc)
    if live:
        sys.stderr.write("\r\x1b[2K")
    if failure is not None:
        text = scrub(failure)
        if shape == "jsonl":
            print(_log_line(tool, EXIT_FAIL, error=text))
        elif shape == "human":
            print(f"{tool}: ERROR\n  {text.replace(chr(10), chr(10) + '  ')}\nexit {EXIT_FAIL}")
        else:
            print(json.dumps({"error": text}, indent=2))
        return EXIT_FAIL
    code = _exit_code(structured, False)
    if shape == "jsonl":
        print(_log_line(tool, code, structured))
    elif shape == "human":
        from .summary import render

        print(render(tool, structured or {}, code))
    else:
        print(json.dumps(structured, indent=2, default=str))
    return code


def _decrypt(source: str, output: str | None, env_file: str | None) -> int:
    from pathlib import Path

    from ..core.artifact import extract as backup_extract
    from ..core.repository import open_repository
    from ..core.restore.decrypt import extract_backup
    from ..core.settings import parse_env_file

    env = (parse_env_file(Path(env_file)) if env_file else {}) | dict(os.environ)
    key = backup_extract.key_from_environment(env)

    async def from_repository(backup_id: str) -> list[backup_extract.Extracted]:
        settings = load_settings(env_file=env_file, database_required=False)
        async with open_repository(settings) as repo:
            return await extract_backup(repo, backup_id, key, Path(output or f"{backup_id}.dump"))

    async def from_file(path: Path, target: Path) -> list[backup_extract.Extracted]:
        return [await backup_extract.extract(backup_extract.file_chunks(path), key, target)]

    if source.startswith("backup:"):
        extracted = anyio.run(from_repository, source.removeprefix("backup:"))
    else:
        path = Path(source)
        if not path.is_file():
            raise RecoveryError(f"{source} is not a file", "pass the path of an artifact, or backup:<id>")
        target = Path(output) if output else path.with_name(backup_extract.plain_name(path.name))
        if target.resolve() == path.resolve():
            raise RecoveryError("the output would overwrite the source", "pass --output with another path")
        extracted = anyio.run(from_file, path, target)
    for item in extracted:
        print(json.dumps({"output": item.path, "stored_bytes": item.stored_bytes, "plain_bytes": item.plain_bytes,
                          "was_encrypted": item.encrypted}))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.debug, args.log_file)
    try:
        if args.command == "demo":
            from .demo import DemoRequest, run_demo, run_down

            if args.down:
                return run_down(args.dir, args.admin_url)
            request = DemoRequest(args.admin_url, args.dir, not args.no_serve, args.database, args.port)
            return run_demo(request, _call)
        if args.command == "decrypt":
            return _decrypt(args.source, args.output, args.env_file)
        if args.command == "backups":
            from .backups_cli import run as list_backups

            print(list_backups(load_settings(env_file=args.env_file, database_required=False), args.json))
            return EXIT_OK
        if args.command == "tools":
            return _tools(args.env_file)
        if args.command == "serve" and not args.http:
            from .transports import serve

            # Without settings the stdio server still starts and says why in every tool result:
            # an MCP client shows that, where a server that exits shows only "connection closed".
            try:
                configured: Settings | ConfigurationError = load_settings(env_file=args.env_file)
            except ConfigurationError as exc:
                print(f"engram-recovery: {exc}", file=sys.stderr)
                configured = exc
            serve(configured, http=False)
            return EXIT_OK
        if args.command == "call" and args.jsonl:
            return _call_jsonl(args)
        settings = load_settings(env_file=args.env_file)
        if args.command == "schedule":
            from pathlib import Path

            from .schedule import Scheduler, jobs

            plan = jobs(args.backup_at, args.drill_on, args.drill_at)
            return Scheduler(plan, Path(args.log) if args.log else None, args.env_file).loop(args.run_now)
        if args.command == "config":
            print(json.dumps(settings.redacted(), indent=2))
            return EXIT_OK
        if args.command == "call":
            code: int = anyio.run(_call, settings, args.tool, list(args.arg), _shape(args.json, False))
            return code
        if args.command == "serve":
            from .transports import serve

            serve(settings, http=args.http, host=args.host, port=args.port)
            return EXIT_OK
    except RecoveryError as exc:
        print(f"engram-recovery: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # the CLI's boundary: one line and a fix, the traceback only in the debug log
        from ..core.stores.failures import explain

        error = explain(exc, args.command)
        logging.getLogger("engram_recovery").debug("traceback", exc_info=exc)
        print(f"engram-recovery: {error}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_FAIL


def _call_jsonl(args: argparse.Namespace) -> int:
    """`call --jsonl`: every outcome, a refused setting included, is one line on stdout (and stderr says why)."""
    try:
        settings = load_settings(env_file=args.env_file)
        code: int = anyio.run(_call, settings, args.tool, list(args.arg), "jsonl")
        return code
    except Exception as exc:  # the log must get its line, whatever went wrong
        from ..core.stores.failures import explain

        error = exc if isinstance(exc, RecoveryError) else explain(exc, "call")
        logging.getLogger("engram_recovery").debug("traceback", exc_info=exc)
        print(f"engram-recovery: {error}", file=sys.stderr)
        print(_log_line(args.tool, EXIT_FAIL, error=str(error)))
        return EXIT_FAIL


def _tools(env_file: str | None) -> int:
    """List the tools; needs no settings (without them, every tool is listed)."""
    from .app import tools_for

    try:
        settings: Settings | None = load_settings(env_file=env_file)
    except ConfigurationError:
        settings = None
    for spec in tools_for(settings):
        print(f"{spec.name:16} {spec.title}{'  (writes)' if spec.writes else ''}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
