"""Every benchmark script parses its arguments before any work, so `--help` (or a typo) never starts
a run that overwrites a committed results file."""

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
# what may come before parse_args: building the parser
PARSER_CALLS = {"ArgumentParser", "add_argument", "add_mutually_exclusive_group", "add_argument_group"}
PARSER_CALLS |= {
    "set_defaults",
    "join",
    "str",
    "Path",
    "resolve",
    "format",
    "list",
    "sorted",
    "tuple",
    "splitlines",
    "strip",
    "is_available",  # a --device default
}


def _called(node) -> set[str]:
    calls = (n for n in ast.walk(node) if isinstance(n, ast.Call))
    return {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "?") for c in calls}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_parses_arguments_before_work(script):
    tree = ast.parse(script.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    for statement in main.body:
        called = _called(statement)
        if "parse_args" in called:
            return
        assert called <= PARSER_CALLS, (
            f"{script.name}: main() calls {sorted(called - PARSER_CALLS)} before parse_args"
        )
    pytest.fail(f"{script.name}: main() never parses its arguments")
