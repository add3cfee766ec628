"""scripts/gpu-check.sh runs in a rare, short device session: each of its commands must at least
parse, and each pytest selection must select something, before one is spent on it."""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))


def step_commands() -> list[list[str]]:
    """argv of every `step LIMIT CMD...` line of the script, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = [shlex.split(m) for m in re.findall(r"^step \d+ (.+)$", text, flags=re.M)]
    return [[arg.replace("$work", "/tmp/gpu-check-work") for arg in argv] for argv in steps]


class Parsed(Exception):
    """Raised in place of running a benchmark once its arguments have parsed."""


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_step_is_a_benchmark_or_a_pytest_run():
    code = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    calls = re.findall(r"\bstep \d+ ", code)  # indented or guarded calls too, which step_commands misses
    assert len(calls) == len(step_commands()), "every step call must start its own line"
    kinds = [argv[1] if argv[1] != "-m" else argv[2] for argv in step_commands()]
    assert len(kinds) >= 8 and set(kinds) <= {
        "benchmarks/ffn_kernels.py",
        "benchmarks/decode_e2e.py",
        "pytest",
    }, kinds


BENCHMARK_STEPS = [a for a in step_commands() if a[1].startswith("benchmarks/")]


@pytest.mark.parametrize(
    "argv",
    BENCHMARK_STEPS,
    ids=[f"benchmark-call-{i + 1}-{Path(a[1]).stem}" for i, a in enumerate(BENCHMARK_STEPS)],
)
def test_benchmark_steps_parse(argv, monkeypatch):
    module = __import__(Path(argv[1]).stem)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):  # argparse exits (SystemExit) on an unknown flag or a bad value
        module.main(argv[2:])


@pytest.mark.parametrize(
    "argv", [a for a in step_commands() if a[1:3] == ["-m", "pytest"]], ids=lambda a: a[-1]
)
def test_pytest_steps_select_gpu_tests(argv):
    args = [a for a in argv[3:] if a != "-q"]
    markers = [args[i + 1] for i, a in enumerate(args) if a == "-m"]
    assert markers == ["gpu"], f"a GPU step must select -m gpu only, got {markers}"  # CPU tests run in CI
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "--collect-only"], cwd=ROOT, capture_output=True, text=True
    )
    selected = re.search(r"(\d+)(?:/\d+)? tests? collected", out.stdout)
    assert out.returncode == 0 and selected and int(selected.group(1)) > 0, out.stdout[-2000:]
