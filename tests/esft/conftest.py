"""Tiny random native MoE checkpoints of every family in the registry, plus task data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import make_tokenizer, sample_text

# Contract-test table: one row per MoE family of moecarve.moe.FAMILIES (8 routed experts, top-2).
NATIVE = {
    "glm4_moe": {
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "partial_rotary_factor": 1.0,
    },
    "qwen2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "use_sliding_window": False,
    },
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 16, "head_dim": 12, "use_sliding_window": False},
    "mixtral": {"num_local_experts": 8, "sliding_window": None},
    "deepseek_v2": {
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,  # multi-head latent attention: one KV head per query head
    },
}


def make_native(directory: Path, family: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = AutoConfig.for_model(family, **{**common, **NATIVE[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # no parameter left at its init constant, routers included
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def native_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native")
    return {family: make_native(root / family, family) for family in NATIVE}


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """A prompt/response task: 24 examples of the tiny vocabulary."""
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    rows = [
        {"prompt": sample_text(12, seed=100 + i) + " ?", "response": " " + sample_text(4, seed=200 + i)}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
