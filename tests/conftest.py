"""Tiny random dense checkpoints of every supported family, made once per test session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: kernels bind to it when defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moecarve.batch.tiny import FAMILY_OVERRIDES, build_tiny_model, make_tokenizer, sample_text  # noqa: F401

# Contract-test table: every supported family, its config overrides. Adding a family = one row.
FAMILIES = FAMILY_OVERRIDES
# Scaled ropes of real sources (Llama 3.1/3.2, Qwen2.5's long-context yarn), sized for tiny models.
ROPE_SCALING = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def make_model(
    directory: Path,
    family: str,
    intermediate: int = 96,
    layers: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    positions: int = 256,
) -> Path:
    return build_tiny_model(
        directory,
        family,
        intermediate=intermediate,
        layers=layers,
        tied=tied,
        dtype=dtype,
        positions=positions,
    )


@pytest.fixture(autouse=True)
def seeded_generators():
    """Each test starts from the same random state, whichever tests ran before it or were left out:
    a draw that a tolerance depends on is the same in the full suite, alone, or under -k."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root / family, family) for family in FAMILIES}


@pytest.fixture
def hub_datasets(monkeypatch):
    """A reachable hub whose datasets are the given rows: `hub_datasets({"org/name": [row, ...]})`."""
    import sys
    import types

    from moecarve.carve import source

    def serve(rows: dict[str, list[dict]]) -> None:
        monkeypatch.setattr(source, "hub_unreachable", lambda: None)
        stub = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(rows[name]))
        monkeypatch.setitem(sys.modules, "datasets", stub)

    return serve


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(3000, seed=2))
    return path


@pytest.fixture(scope="session")
def tiny_carved(tiny_models, calib_file, tmp_path_factory) -> Path:
    """The tiny Llama carved sparse (S1A2E8: 1 shared + 2 of 7 routed), for the stages after carve."""
    from moecarve.carve import pipeline
    from moecarve.carve.config import CarveConfig

    out = tmp_path_factory.mktemp("carved") / "llama-S1A2E8"
    config = CarveConfig(experts=8, active=2, calib_tokens=1024, calib_length=128)
    pipeline.carve(tiny_models["llama"], config, str(calib_file), out)
    return out
