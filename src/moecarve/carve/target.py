"""The output architecture, glm4_moe: its config and the tensors of one carved layer.

Names are the per-expert ones published GLM-4.5 checkpoints use, which transformers fuses at
load time and vLLM reads directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Glm4MoeConfig, PretrainedConfig

from moecarve.carve.config import CarveConfig
from moecarve.carve.families import Family, head_dim

# Router logits are scaled so |logit| <= this on the calibration tokens: sigmoid stays within
# 0.5 +- 2.5e-3, so with norm_topk_prob and routed_scaling_factor = A each gate is 1 +- 5e-3,
# CMoE's training-free unweighted sum, while top-k still ranks by the fitted scores (1e-3 left
# too few fp32 levels of the sigmoid near 0.5: ties at the top-k boundary).
LOGIT_SCALE = 1e-2


def glm4_moe_config(
    source: PretrainedConfig, family: Family, config: CarveConfig, m: int, dtype: torch.dtype
) -> Glm4MoeConfig:
    rope = dict(source.rope_parameters or {"rope_type": "default", "rope_theta": source.rope_theta})
    rope["partial_rotary_factor"] = family.rotary_fraction(source)  # glm4_moe's default is 0.5
    return Glm4MoeConfig(
        architectures=["Glm4MoeForCausalLM"],  # vLLM picks its model class from this, not model_type
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=head_dim(source),
        hidden_act="silu",
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=rope,
        partial_rotary_factor=rope["partial_rotary_factor"],
        attention_bias=family.attention_bias(source),
        use_qk_norm=family.qk_norm,
        moe_intermediate_size=m,
        n_shared_experts=config.shared,
        n_routed_experts=config.routed,
        num_experts_per_tok=config.active,
        norm_topk_prob=True,
        routed_scaling_factor=float(config.active),
        n_group=1,
        topk_group=1,
        first_k_dense_replace=config.dense_layers,
        num_mtp_layers=0,
        tie_word_embeddings=False,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=getattr(source, "pad_token_id", None),
        dtype=dtype,
    )


def moe_tensors(
    prefix: str,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: torch.Tensor,
    experts: torch.Tensor,
    router_weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The glm4_moe MoE weights of one layer (FFN padded to N * m neurons, router already scaled)."""
    out = {}
    if shared.numel():
        out[f"{prefix}shared_experts.gate_proj.weight"] = w_gate[shared]
        out[f"{prefix}shared_experts.up_proj.weight"] = w_up[shared]
        out[f"{prefix}shared_experts.down_proj.weight"] = w_down[:, shared]
    for j, members in enumerate(experts):
        out[f"{prefix}experts.{j}.gate_proj.weight"] = w_gate[members]
        out[f"{prefix}experts.{j}.up_proj.weight"] = w_up[members]
        out[f"{prefix}experts.{j}.down_proj.weight"] = w_down[:, members]
    out[f"{prefix}gate.weight"] = router_weight
    return out


def write_rotary_at_top_level(directory: Path) -> None:
    """Copy a glm4_moe config's `partial_rotary_factor` to its top level, where vLLM's glm4_moe reads
    it (transformers' save_pretrained keeps it only inside rope_parameters, and both default to 0.5)."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    factor = (data.get("rope_parameters") or {}).get("partial_rotary_factor")
    if data.get("model_type") == "glm4_moe" and factor is not None:
        data["partial_rotary_factor"] = factor
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
