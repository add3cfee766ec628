"""Helpers for the eval tests: a snapshot of a model directory, to prove eval never writes there."""

from __future__ import annotations

from pathlib import Path

import pytest


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
    }


@pytest.fixture
def unchanged():
    """Call with the model directories; asserts at teardown that none of them changed."""
    watched: dict[Path, dict] = {}

    def watch(*directories: Path) -> None:
        for directory in directories:
            watched[directory] = snapshot(directory)

    yield watch
    for directory, before in watched.items():
        assert snapshot(directory) == before, f"eval wrote into {directory}"


@pytest.fixture(scope="session")
def tiny_tasks_record(tiny_models, tmp_path_factory) -> tuple[Path, dict, bool]:
    """One lm-eval run on the tiny Llama (every task x 4 questions), shared by the tasks and report tests:
    (JSON path, returned record, whether the model directory stayed unchanged)."""
    from moecarve.eval.tasks import DEFAULT_TASKS, evaluate_tasks

    model = tiny_models["llama"]
    before = snapshot(model)
    out = tmp_path_factory.mktemp("tasks") / "tasks.json"
    record = evaluate_tasks(model, DEFAULT_TASKS, limit=4, device="cpu", out=out)
    return out, record, snapshot(model) == before
