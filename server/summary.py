"""A tool's structured result as a few lines for a person at a terminal (`call` without --json).

It reads the result's shape, not its tool: a verdict and a summary first, then one line per
check, step or proof, then the warnings. The JSON stays the interface for machines and cron.
"""

from __future__ import annotations

from typing import Any

MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", True: "ok  ", False: "FAIL"}


def render(tool: str, result: dict[str, Any], exit_code: int) -> str:
    verdict = result.get("verdict")
    head = f"{tool}: {str(verdict).upper() if verdict else 'done'}"
    lines = [head, f"  {result['summary']}" if result.get("summary") else ""]
    for check in result.get("checks") or []:
        name = check.get("component") or check.get("name") or "?"
        lines.append(f"  [{MARK.get(check.get('status'), '    ')}] {name}: {check.get('summary', '')}")
    for step in result.get("steps") or []:
        if "ok" in step:  # a step that ran (a drill's): did it work, and how long it took
            took = f" ({step['seconds']:.1f} s)" if isinstance(step.get("seconds"), int | float) else ""
            lines.append(f"  [{MARK[bool(step['ok'])]}] {step.get('name', '?')}: {step.get('summary', '')}{took}")
        else:  # a planned step: its title; the commands are in the JSON
            lines.append(f"  {step.get('order', '-')}. {step.get('title', step.get('id', '?'))}")
    lines.extend(f"  warning: {warning}" for warning in result.get("warnings") or [])
    if isinstance(result.get("backups"), list):
        lines.append(f"  {len(result['backups'])} backup(s) listed (`engram-recovery backups` shows the table)")
    lines.append(f"exit {exit_code}; the whole result: add --json")
    return "\n".join(line for line in lines if line)
