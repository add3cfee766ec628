"""Where the experts are: a small registry of the MoE families transformers 5.x ships.

One row per family says which class is the sparse MoE block and which config field counts its
routed experts; everything else is common to all of them in transformers 5.x: the block sits at
`model.layers.N.mlp`, its router at `.gate` returns (router_logits, topk_weights, topk_indices),
and its routed experts at `.experts` are fused parameters whose first dimension is the expert
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]).

The API, used by ESFT and by the recovery fine-tune's expert-load logging:

- `family_of(config)`: the registry row, or a ValueError (a dense model: carve it first).
- `moe_layers(model)`: every MoE layer of a loaded model as `MoELayer` (index, prefix, router,
  routed expert parameters with their expert dimension, shared expert parameters).
- `record_routing(model)`: a context manager; during it every router forward appends the
  selected experts and their gate values ([T, K] each, T = tokens of the call) per layer.
- `routers_in_fp32(model)`: a context manager; during it every router computes outside autocast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

EXPERT_DIM = 0  # fused expert tensors are [E, ...] in every family below


@dataclass(frozen=True)
class MoEFamily:
    """How to find the MoE blocks of one model family."""

    model_type: str
    block: str  # class name of the sparse MoE block found at layer.mlp
    experts_key: str  # config field: routed experts per layer
    shared: tuple[str, ...] = ()  # block attributes holding shared experts (and their gates)
    top_k_key: str = "num_experts_per_tok"


FAMILIES: dict[str, MoEFamily] = {
    row.model_type: row
    for row in (
        MoEFamily("glm4_moe", "Glm4MoeMoE", "n_routed_experts", shared=("shared_experts",)),
        MoEFamily("deepseek_v2", "DeepseekV2Moe", "n_routed_experts", shared=("shared_experts",)),
        MoEFamily(
            "qwen2_moe", "Qwen2MoeSparseMoeBlock", "num_experts", ("shared_expert", "shared_expert_gate")
        ),
        MoEFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock", "num_experts"),
        MoEFamily("mixtral", "MixtralSparseMoeBlock", "num_local_experts"),
    )
}


def family_of(config) -> MoEFamily:
    """The registry row for a model config; a clear error for dense or unsupported models."""
    model_type = getattr(config, "model_type", "?")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"unsupported MoE family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    raise ValueError(f"{model_type!r} is a dense model with no experts: carve it first (`carve MODEL ...`)")


@dataclass
class MoELayer:
    """One MoE block of a loaded model."""

    index: int  # decoder layer number
    prefix: str  # parameter-name prefix of the block, e.g. "model.layers.3.mlp."
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    shared: dict[str, nn.Module] = field(default_factory=dict)

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """Fused routed-expert parameters by full name; expert e is `param[e]` (dim EXPERT_DIM)."""
        out = {}
        for name, param in self.experts.named_parameters():
            if param.shape[EXPERT_DIM] != self.num_experts:
                raise ValueError(f"{self.prefix}experts.{name} is not fused per expert: {tuple(param.shape)}")
            out[f"{self.prefix}experts.{name}"] = param
        return out

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """Shared-expert parameters (and their gates, for Qwen2-MoE) by full name."""
        return {
            f"{self.prefix}{attr}.{name}": param
            for attr, module in self.shared.items()
            for name, param in module.named_parameters()
        }

    def expert_parameter_count(self) -> int:
        """Parameters of one routed expert in this layer."""
        return sum(p[0].numel() for p in self.expert_parameters().values())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of a loaded causal LM, in order (dense layers, e.g. first_k_dense, skipped)."""
    family = family_of(model.config)
    top_k = getattr(model.config, family.top_k_key)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if type(block).__name__ != family.block:
            continue
        found.append(
            MoELayer(
                index=index,
                prefix=f"model.layers.{index}.mlp.",
                block=block,
                router=block.gate,
                experts=block.experts,
                num_experts=getattr(model.config, family.experts_key),
                top_k=top_k,
                shared={attr: getattr(block, attr) for attr in family.shared},
            )
        )
    if not found:
        raise ValueError(f"no {family.block} blocks found in {type(model).__name__}")
    return found


def declared_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The dtype config.json declares, which `dtype="auto"` loads in before the stored one."""
    from moecarve.carve.calib import read_json

    config = read_json(Path(model_dir).expanduser() / "config.json")
    value = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def experts_loading(model_dir: str | Path, dtype) -> dict:
    """from_pretrained's extra arguments for `model_dir` in `dtype` ("auto": the config's):
    transformers' default grouped_mm experts need 16-byte aligned expert rows, which carves made
    before moecarve padded every expert to 8 neurons may lack; those load with the eager experts."""
    from moecarve.carve.calib import read_json

    width = read_json(Path(model_dir) / "config.json").get("moe_intermediate_size")
    if dtype == "auto":
        dtype = declared_dtype(model_dir) or torch.float32
    if not isinstance(width, int) or not isinstance(dtype, torch.dtype):
        return {}
    return {} if width * dtype.itemsize % 16 == 0 else {"experts_implementation": "eager"}


def meta_model(config) -> nn.Module:
    """The model skeleton on the meta device: layer structure and parameter shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass
class Routing:
    """Router decisions of one forward call: [T, K] expert ids and their gate values (fp32, CPU)."""

    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class RoutingLog:
    """Per decoder layer index, the Routing of every router call since the last clear()."""

    layers: dict[int, list[Routing]] = field(default_factory=dict)

    def clear(self) -> None:
        for calls in self.layers.values():
            calls.clear()


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingLog]:
    """Log routing during forwards. Under gradient checkpointing the recomputation logs twice."""
    log = RoutingLog()
    handles = []
    for layer in moe_layers(model):
        calls = log.layers.setdefault(layer.index, [])

        def hook(module, args, output, calls=calls):
            _, weights, indices = output  # every family's router returns (logits, weights, indices)
            calls.append(Routing(indices.detach().cpu(), weights.detach().float().cpu()))

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def routers_in_fp32(model: nn.Module) -> Iterator[None]:
    """Every router computes outside autocast while this lasts (bf16 training). The routers cast
    to fp32 themselves, but autocast overrides them: a carve's glm4_moe router (logits within
    +-1e-2) would score every expert 0.5 +- 0.0025 in bf16, whose steps there are 0.002-0.004, and
    its top-k would choose among ties. The gates change class, not instance attributes, so the
    copies DataParallel makes of them keep it."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's
    gates = [layer.block.gate for layer in moe_layers(model)]  # under peft, the wrapper of the copies
    classes = [type(gate) for gate in gates]
    for gate, cls in zip(gates, classes, strict=True):
        gate.__class__ = _outside_autocast(cls)
    try:
        yield
    finally:
        for gate, cls in zip(gates, classes, strict=True):
            gate.__class__ = cls


_OUTSIDE_AUTOCAST: dict[type, type] = {}


def _outside_autocast(cls: type) -> type:
    """`cls` with its forward run outside autocast (one subclass per class)."""
    if cls not in _OUTSIDE_AUTOCAST:

        def forward(self, hidden_states, *args, **kwargs):
            with torch.autocast(hidden_states.device.type, enabled=False):
                return cls.forward(self, hidden_states, *args, **kwargs)

        name = f"{cls.__name__}OutsideAutocast"
        _OUTSIDE_AUTOCAST[cls] = type(name, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _OUTSIDE_AUTOCAST[cls]
