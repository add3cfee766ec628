"""Tiny random dense checkpoints of every supported family, made once per test session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "the",
    "a",
    "expert",
    "router",
    "token",
    "neuron",
    "layer",
    "shared",
    "dense",
    "sparse",
    "model",
    "carve",
    "text",
    "of",
    "and",
    "to",
    "in",
    "is",
]

# Contract-test table: every supported family, its config overrides. Adding a family = one row.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 24, "use_sliding_window": False},
}


def sample_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([sample_text(2000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def make_model(
    directory: Path,
    family: str,
    intermediate: int = 96,
    layers: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        **FAMILIES[family],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # no parameter left at its init constant (norms at 1, biases at 0)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.to(dtype).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(3000, seed=2))
    return path
