"""Source-model adapters: which dense decoders can be carved exactly into glm4_moe, and how.

Adding a family is one `register(Family(...))` here plus a row in the contract-test table
(tests/carve/test_families.py). A family the target cannot express exactly is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PretrainedConfig


class UnsupportedModel(ValueError):
    """The source cannot be carved into the target without changing what it computes."""


MLP_TENSORS = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
# A fused tensor's name -> the tensors glm4_moe stores apart, each with its number of rows, in order.
Fused = dict[str, tuple[tuple[str, int], ...]]


@dataclass(frozen=True)
class Family:
    model_type: str
    attention_bias: Callable[[PretrainedConfig], bool] = lambda c: False  # q/k/v biases (copied)
    o_proj_bias: Callable[[PretrainedConfig], bool] = lambda c: False  # glm4_moe has none: refused
    qk_norm: bool = False
    extra_checks: tuple[Callable[[PretrainedConfig], str | None], ...] = field(default_factory=tuple)
    fused: Callable[[PretrainedConfig], Fused] = lambda c: {}
    # The share of each head the source's rope rotates. Llama's and Qwen's rotate all of it even
    # where a config carries a `partial_rotary_factor`; glm4_moe would honour one.
    rotary_fraction: Callable[[PretrainedConfig], float] = lambda c: 1.0
    # Why a GGUF file of this family cannot be carved exactly (transformers' loader loses something).
    gguf_refusal: str | None = None
    # Scalars the source applies and glm4_moe does not, folded into weights (Granite's multipliers):
    # the embeddings', the logits' (lm_head's), each block's output (o_proj's and down_proj's), and
    # the queries' against glm4_moe's head_dim^-0.5 attention scaling (q_proj's).
    embedding_scale: Callable[[PretrainedConfig], float] = lambda c: 1.0
    logits_scale: Callable[[PretrainedConfig], float] = lambda c: 1.0
    residual_scale: Callable[[PretrainedConfig], float] = lambda c: 1.0
    query_scale: Callable[[PretrainedConfig], float] = lambda c: 1.0

    def attention_tensors(self, config: PretrainedConfig) -> list[str]:
        """Names (relative to `model.layers.L.`) copied unchanged into the target layer."""
        names = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if self.attention_bias(config):
            names += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        if self.qk_norm:
            names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return names + ["input_layernorm.weight", "post_attention_layernorm.weight"]

    def source_tensors(self, config: PretrainedConfig) -> list[str]:
        """Names (relative to `model.layers.L.`) a layer of the source checkpoint holds: the target's,
        fused ones as stored."""
        fused = self.fused(config)
        parts = {part for split in fused.values() for part, _ in split}
        return [n for n in self.attention_tensors(config) + MLP_TENSORS if n not in parts] + list(fused)

    def to_target(self, state: dict, config: PretrainedConfig) -> dict:
        """`state` (a source layer's) as glm4_moe's layer holds it: each fused tensor split, and the
        block and query scales folded into the weights (new tensors: `state`'s may be the module's)."""
        for name, split in self.fused(config).items():
            pieces = state.pop(name).split([rows for _, rows in split])
            state.update({part: piece.clone() for (part, _), piece in zip(split, pieces, strict=True)})
        scales = {
            "self_attn.q_proj.weight": self.query_scale(config), "self_attn.q_proj.bias": self.query_scale(config),
            "self_attn.o_proj.weight": self.residual_scale(config), "mlp.down_proj.weight": self.residual_scale(config),
        }  # fmt: skip
        for name, scale in scales.items():
            if scale != 1.0 and name in state:
                state[name] = state[name] * scale
        return state


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def _no_mlp_bias(config: PretrainedConfig) -> str | None:
    if getattr(config, "mlp_bias", False):
        return "its MLP has biases (mlp_bias=true); glm4_moe experts have none"
    return None


def _attention_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attention_bias", False))


def _no_sliding_window(config: PretrainedConfig) -> str | None:
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", True)
    if uses and window is not None and window < config.max_position_embeddings:
        return (
            f"it uses sliding-window attention (window {window} < {config.max_position_embeddings} positions); "
            "glm4_moe attends to the full context"
        )
    return None


def head_dim(config: PretrainedConfig) -> int:
    """An attention head's width: the config's, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _phi3_fused(config: PretrainedConfig) -> Fused:
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    return {
        "self_attn.qkv_proj.weight": (
            ("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv), ("self_attn.v_proj.weight", kv)
        ),
        "mlp.gate_up_proj.weight": (
            ("mlp.gate_proj.weight", config.intermediate_size), ("mlp.up_proj.weight", config.intermediate_size)
        ),
    }  # fmt: skip


def _granite_query_scale(config: PretrainedConfig) -> float:
    return config.attention_multiplier * head_dim(config) ** 0.5


# Llama and Qwen3 put `attention_bias` on all four projections, Qwen2 on q/k/v only.
register(Family("llama", o_proj_bias=_attention_bias, extra_checks=(_no_mlp_bias,)))
register(Family("mistral", extra_checks=(_no_mlp_bias, _no_sliding_window)))
register(Family("qwen2", attention_bias=lambda c: True, extra_checks=(_no_sliding_window,)))
# IBM Granite 3.x: Llama with four multipliers, each folded into the weights it scales.
register(
    Family(
        "granite",
        o_proj_bias=_attention_bias,
        extra_checks=(_no_mlp_bias,),
        embedding_scale=lambda c: c.embedding_multiplier,
        logits_scale=lambda c: 1.0 / c.logits_scaling,
        residual_scale=lambda c: c.residual_multiplier,
        query_scale=_granite_query_scale,
    )
)
# Phi-3, Phi-3.5 and Phi-4: q/k/v and gate/up fused in the checkpoint, split for glm4_moe.
register(
    Family(
        "phi3",
        fused=_phi3_fused,
        rotary_fraction=lambda c: c.rope_parameters.get("partial_rotary_factor", 1.0),
        gguf_refusal="transformers' GGUF loader drops Phi-3's partial rotary and longrope factors",
        extra_checks=(_no_sliding_window,),
    )
)
register(
    Family(
        "qwen3",
        qk_norm=True,
        attention_bias=_attention_bias,
        o_proj_bias=_attention_bias,
        extra_checks=(_no_sliding_window,),
    )
)


def family_for(config: PretrainedConfig) -> Family:
    """The adapter for `config`, or an UnsupportedModel error saying why it cannot be carved."""
    model_type = getattr(config, "model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}: supported are {', '.join(sorted(FAMILIES))}"
        )
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        raise UnsupportedModel(f"cannot carve {model_type} with activation {act!r}: only SiLU-gated MLPs")
    if family.o_proj_bias(config):
        raise UnsupportedModel(
            f"cannot carve this {model_type} model exactly: its o_proj has a bias (attention_bias=true); "
            "glm4_moe's o_proj has none"
        )
    for check in family.extra_checks:
        reason = check(config)
        if reason:
            raise UnsupportedModel(f"cannot carve this {model_type} model exactly: {reason}")
    return family
