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


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("carve_bundled.py", ["--configs", "S1A2"], "configuration 'S1A2': give SxAyEz"),
        ("decode_e2e.py", ["--device", "cpu"], "--device cpu times nothing worth keeping"),
        ("ffn_kernels.py", ["--device", "cpu", "--configs", "S2A9E8", "--out", "x"], "9 active of 6 routed"),
        ("ffn_kernels.py", ["--device", "cpu", "--configs", "S2A2E7", "--out", "x"], "11008 does not split"),
        ("tune_recover.py", [], "give --carved NAME=DIR"),
        ("tune_recover.py", ["--carved", "dir"], "--carved dir: give NAME=DIR"),
        ("eval_bundled.py", ["--carved", "x", "--only", "ppls"], "--only ppls: the steps are"),
        ("refit_cost.py", ["--neurons", "250"], "does not split into 8 experts"),
        ("kernels_compile.py", ["--dtypes", "bf16"], "--dtypes bf16: give bfloat16"),
    ],
)
def test_bad_arguments_are_refused_in_one_line_before_work(script, args, message, tmp_path):
    """Run from another directory: the default outputs are the repository's, not the caller's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and message in done.stderr, done.stderr[-1500:]
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())
