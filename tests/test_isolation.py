"""A stage called from Python leaves the caller's process as it found it: its random generators,
accelerate's settings, its environment and progress bars (moecarve.isolation)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def seeded_draws(call=None):
    """The caller's next draws from python, numpy and torch after seeding them, with `call` between."""
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    if call is not None:
        call()
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_carve_and_eval_ppl_leave_the_callers_random_generators(
    tiny_models, tiny_carved, calib_file, tmp_path
):
    from moecarve.carve import pipeline
    from moecarve.carve.config import CarveConfig
    from moecarve.eval.ppl import evaluate_ppl

    expected = seeded_draws()
    config = CarveConfig(experts=8, active=2, calib_tokens=256, calib_length=64)
    calls = {
        "carve": lambda: pipeline.carve(tiny_models["llama"], config, str(calib_file), tmp_path / "c"),
        "eval ppl": lambda: evaluate_ppl([tiny_carved], calib_file, windows=2, length=32, progress=False),
    }
    for name, call in calls.items():
        assert seeded_draws(call) == expected, name


def test_kept_environ_puts_back_set_and_unset_names(monkeypatch):
    from moecarve.isolation import kept_environ

    monkeypatch.setenv("MOECARVE_TEST_SET", "mine")
    monkeypatch.delenv("MOECARVE_TEST_UNSET", raising=False)
    with kept_environ("MOECARVE_TEST_SET", "MOECARVE_TEST_UNSET"):
        os.environ["MOECARVE_TEST_SET"] = "0"
        os.environ["MOECARVE_TEST_UNSET"] = "1"
    assert os.environ["MOECARVE_TEST_SET"] == "mine" and "MOECARVE_TEST_UNSET" not in os.environ


@pytest.mark.parametrize("bars_shown", [True, False])
@pytest.mark.parametrize("hub_bars_off", [True, False])
def test_batch_without_progress_gives_back_both_libraries_bars_as_they_were(bars_shown, hub_bars_off):
    """transformers' switch turns the hub's bars too; each comes back as the caller had it."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from moecarve.batch.runner import transformers_bars_off

    (hf_logging.enable_progress_bar if bars_shown else hf_logging.disable_progress_bar)()
    (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()
    try:
        with transformers_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() == bars_shown
        assert hub_utils.are_progress_bars_disabled() == hub_bars_off
    finally:
        hf_logging.enable_progress_bar()


def test_seeds_queued_for_cudas_start_are_the_callers_afterwards():
    """torch.manual_seed queues a seed for CUDA's generators until CUDA starts (on any machine); a
    stage's seed must not be the one the caller's first CUDA use gets."""
    from moecarve.isolation import kept_random_state

    if torch.cuda.is_initialized():
        pytest.skip("CUDA has started: its generators' states are kept instead")
    torch.manual_seed(7)
    queued = list(torch.cuda._lazy_seed_tracker.get_calls())
    with kept_random_state():
        torch.manual_seed(5)
        assert torch.cuda._lazy_seed_tracker.get_calls() != queued
    assert torch.cuda._lazy_seed_tracker.get_calls() == queued


def test_training_leaves_the_callers_generators_and_accelerate_settings(tiny_carved, calib_file, tmp_path):
    """recover and esft train seed (as the Trainer does) and set accelerate's process-wide settings;
    afterwards the caller draws as before, and may make an Accelerator of other settings."""
    import functools
    import itertools
    import json

    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from moecarve.esft.shape import model_shape
    from moecarve.esft.train import EsftConfig, train
    from moecarve.tune.recover import RecoverConfig, recover

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": f"the router picks expert {i} ."}) + "\n" for i in range(8)))
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({**model_shape(tiny_carved).record(), "experts": {"0": [1]}}))
    calls = {
        "recover": lambda out: recover(
            tiny_carved, RecoverConfig(steps=1, batch_size=2, length=64), calib_file, out
        ),
        "esft train": lambda out: train(
            tiny_carved, experts, task, out, EsftConfig(steps=1, batch_size=2, max_length=32)
        ),
    }
    expected = seeded_draws()
    for (name, call), callers_own in itertools.product(calls.items(), (False, True)):
        AcceleratorState._reset_state(reset_partial_state=True)  # as in a fresh process
        if callers_own:  # as an accelerate script asks which process it is
            PartialState(cpu=True)
        out = tmp_path / f"{name}-{callers_own}"
        assert seeded_draws(functools.partial(call, out)) == expected, name
        Accelerator(cpu=True, mixed_precision="bf16")  # raised: "already initialized" with other settings
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_passages_names_are_one_text_even_beside_a_file_of_that_name(tmp_path, monkeypatch):
    """A recipe's `protocol` is the bundled passages even where a file of that name lies beside the
    recipe: its checks (held-out tail, identity) and its run must read the same text."""
    from moecarve.batch.stages import recipe_path
    from moecarve.carve.calib import text_identity

    monkeypatch.chdir(tmp_path)
    for name in ("protocol", "boolq-passages"):
        (tmp_path / name).write_text("a user's own text")
        assert recipe_path(tmp_path, name) == name
        assert text_identity(name) == text_identity(None)
