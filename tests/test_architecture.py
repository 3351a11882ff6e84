"""Habits of docs/architecture.md that import-linter cannot check, checked on the source tree itself."""

from __future__ import annotations

import ast
from pathlib import Path

import engram_recovery

PACKAGE = Path(engram_recovery.__file__).parent
CHECKED = ("core", "tools", "server")
MAX_PARAMETERS = 5

# (file, function): why it keeps more than five parameters. Each entry must say why a context object does not fit
# (a signature dictated from outside, such as a library's callback); none does today.
TOO_MANY_ALLOWED: dict[tuple[str, str], str] = {}


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names + [f"*{a.arg}" for a in (args.vararg, args.kwarg) if a is not None]


def too_many() -> dict[tuple[str, str], list[str]]:
    found = {}
    for folder in CHECKED:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    names = parameters(node)
                    if len(names) > MAX_PARAMETERS:
                        found[(path.relative_to(PACKAGE).as_posix(), node.name)] = names
    return found


def test_a_run_with_more_than_five_parameters_gets_a_context_object() -> None:
    offenders = {where: names for where, names in too_many().items() if where not in TOO_MANY_ALLOWED}
    assert not offenders, (
        "functions with more than five parameters (give them a frozen dataclass of the run, as "
        f"reindex/run.ReindexRun does): {offenders}"
    )


def test_the_allow_list_names_only_functions_that_still_need_it() -> None:
    stale = set(TOO_MANY_ALLOWED) - set(too_many())
    assert not stale, f"allowed but no longer over five parameters (drop them from TOO_MANY_ALLOWED): {stale}"


def test_the_parameter_check_sees_a_long_signature() -> None:
    tree = ast.parse("def f(self, a, b, /, c, *d, e, f=1, **g): pass\nasync def h(a, b, c, d, e): pass")
    long, short = (node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))
    assert parameters(long) == ["a", "b", "c", "e", "f", "*d", "*g"]
    assert len(parameters(short)) == MAX_PARAMETERS
