"""Tiny random dense models of every supported family, for recipes that check the pipeline end to end.

No hub here: a recipe model `tiny: llama` is built (seeded, a few hundred kB, about a second) into the
batch output. Its numbers measure nothing but whether every stage runs on that family.
The test suite builds its fixtures with the same code (tests/conftest.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from moecarve.carve.writer import atomic_directory
from moecarve.isolation import kept_random_state

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
FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 24, "use_sliding_window": False},
    "phi3": {"sliding_window": None, "pad_token_id": None},
    # Granite's four multipliers, none of them 1 (Granite 3.3's, the attention's sized for 12-dim heads)
    "granite": {
        "embedding_multiplier": 12.0,
        "logits_scaling": 16.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.2,
    },  # fmt: skip
}


def sample_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_tokenizer(directory: Path):
    """A 300-token byte-level BPE trained on the tiny vocabulary, saved in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text(2000, seed=1)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.save_pretrained(directory)
    return tokenizer


@kept_random_state()
def build_tiny_model(
    directory: Path,
    family: str,
    seed: int = 0,
    intermediate: int = 96,
    layers: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    positions: int = 256,
) -> Path:
    """A random model (hidden 48, 4 heads, 2 KV heads) with the tiny tokenizer, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILY_OVERRIDES:
        raise ValueError(f"no tiny model for family {family!r}; choose one of {', '.join(FAMILY_OVERRIDES)}")
    directory = Path(directory)
    with atomic_directory(directory, exclusive=False) as tmp:  # a concurrent builder writes the same
        tokenizer = make_tokenizer(tmp)
        config = AutoConfig.for_model(
            family,
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=tied,
            eos_token_id=tokenizer.eos_token_id,
            **FAMILY_OVERRIDES[family],
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # no parameter left at its init constant (norms at 1, biases at 0)
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        model.to(dtype).save_pretrained(tmp)
    return directory


def ensure_tiny_model(directory: Path, family: str) -> Path:
    """Build once; a concurrent builder of the same model (another batch process) may win the rename."""
    if (directory / "config.json").exists():
        return directory
    try:
        return build_tiny_model(directory, family)
    except OSError:
        if (directory / "config.json").exists():
            return directory
        raise
