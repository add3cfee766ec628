"""Results files name the code they were made with."""

import subprocess

from moecarve.eval import common


def _git(repo, *args):
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_the_commit_is_named_and_marked_only_when_code_changed(tmp_path):
    for name in ("src/moecarve/a.py", "benchmarks/b.py", "docs/c.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert common.source_commit(tmp_path) == head
    (tmp_path / "docs/c.md").write_text("changed\n")  # not code: the figures are still head's
    (tmp_path / "results.json").write_text("{}")
    assert common.source_commit(tmp_path) == head
    for name in ("src/moecarve/a.py", "benchmarks/b.py"):
        (tmp_path / name).write_text("x = 2\n")
        assert common.source_commit(tmp_path) == head + "+changes"
        _git(tmp_path, "checkout", "-q", "--", name)
    (tmp_path / "src/moecarve/new.py").write_text("")  # an untracked module counts too
    assert common.source_commit(tmp_path) == head + "+changes"


def test_outside_a_checkout_or_without_git_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above either
    assert common.source_commit(tmp_path) == "unknown"  # no src/moecarve: an installed copy
    (tmp_path / "src/moecarve").mkdir(parents=True)
    assert common.source_commit(tmp_path) == "unknown"  # not a git repository

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert common.source_commit() == "unknown"
