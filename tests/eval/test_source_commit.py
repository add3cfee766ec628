"""Results files name the code they were made with."""

import re
import subprocess

import pytest

from moecarve.eval import common


def test_the_checkouts_commit_is_named_and_marked_when_changed():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert re.fullmatch(re.escape(head.stdout.strip()) + r"(\+changes)?", common.source_commit())


def test_without_git_the_commit_is_unknown(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert common.source_commit() == "unknown"
