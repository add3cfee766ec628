"""benchmarks/esft_task.py reads BIG-bench hyperbaton from any tar archive of BIG-bench: PyPI lists
only bigbench 0.0.1, which lacks the task, so GitHub's archive of the repository must do."""

import importlib.util
import io
import json
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "esft_task.py"


def _script():
    spec = importlib.util.spec_from_file_location("esft_task", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_hyperbaton_from_a_github_archive_and_clear_refusals(tmp_path):
    script = _script()
    examples = [
        {"input": "Which order? a) big red ball b) red big ball", "target_scores": {"a": 1, "b": 0}},
        {"input": "Which order? a) old wooden box b) wooden old box", "target_scores": {"a": 0, "b": 1}},
    ]
    task = json.dumps({"examples": examples}).encode()
    github = _archive(
        tmp_path / "BIG-bench-main.tar.gz",
        {"BIG-bench-main/bigbench/benchmark_tasks/hyperbaton/task.json": task},
    )
    questions = script.hyperbaton_questions(Namespace(bigbench=str(github)))
    assert [(key, q["response"]) for key, q in questions] == [("0", " a"), ("1", " b")]
    assert questions[0][1]["prompt"] == examples[0]["input"] + "\nAnswer:"
    with pytest.raises(SystemExit, match="not found: pass --bigbench a tar archive of BIG-bench"):
        script.hyperbaton_questions(Namespace(bigbench=str(tmp_path / "missing.tar.gz")))
    (tmp_path / "BIG-bench-main.zip").write_bytes(b"PK\x03\x04 not a tar")
    with pytest.raises(SystemExit, match="is not a tar archive"):
        script.hyperbaton_questions(Namespace(bigbench=str(tmp_path / "BIG-bench-main.zip")))
    other = _archive(tmp_path / "bigbench-0.0.1.tar.gz", {"bigbench-0.0.1/setup.py": b""})
    with pytest.raises(SystemExit, match="holds no benchmark_tasks/hyperbaton/task.json"):
        script.hyperbaton_questions(Namespace(bigbench=str(other)))
