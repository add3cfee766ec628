"""Helpers for the eval tests: a snapshot of a model directory, to prove eval never writes there, and
the tiny Llama with another tokenizer."""

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
def tiny_tasks_record(tiny_models, tmp_path_factory) -> tuple[Path, dict, dict]:
    """One lm-eval run on the tiny Llama (every task x 4 questions), shared by the tasks and report tests:
    (JSON path, returned record, whether the model directory, lm-eval's logging level, the random
    generators and the environment stayed as they were)."""
    import logging
    import os

    from moecarve.eval.tasks import DEFAULT_TASKS, evaluate_tasks
    from tests.test_isolation import seeded_draws

    model = tiny_models["llama"]
    before, level, environ = snapshot(model), logging.getLogger("lm_eval").level, dict(os.environ)
    out = tmp_path_factory.mktemp("tasks") / "tasks.json"
    expected = seeded_draws()
    record = {}
    draws = seeded_draws(
        lambda: record.update(evaluate_tasks(model, DEFAULT_TASKS, limit=4, device="cpu", out=out))
    )
    kept = {
        "model": snapshot(model) == before,
        "logging": logging.getLogger("lm_eval").level == level,
        "random": draws == expected,
        "environ": dict(os.environ) == environ,
    }
    return out, record, kept


@pytest.fixture(scope="session")
def other_tokenizer_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama's weights with a byte-level tokenizer of no merges: the same text, other token ids."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = shutil.copytree(tiny_models["llama"], tmp_path_factory.mktemp("other") / "other-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(model)
    return model
