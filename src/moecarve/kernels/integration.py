"""Hooking the kernels into transformers models.

Two ways, same numbers:
- `enable(model)`: swaps the forward of every Glm4MoeMoE-like block (router `gate`, fused
  `experts`, `shared_experts`) for one `moe_ffn` call that runs the routed and the shared experts
  together. Works on any transformers version that has the fused experts layout (5.x).
- `register_experts_implementation()`: adds "moecarve" to transformers' experts interface, so
  `from_pretrained(..., experts_implementation="moecarve")` or
  `model.set_experts_implementation("moecarve")` routes the experts (not the shared MLP) here.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from ._env import warn_once
from .functional import moe_ffn, needs_grad, on_its_gpu, triton_unsupported_reason
from .ops.reference import sigmoid_topk_reference

IMPLEMENTATION_NAME = "moecarve"


def _routing(gate_out) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_indices, topk_weights) from a router's output tuple, whatever its order."""
    tensors = [t for t in gate_out if isinstance(t, torch.Tensor)] if isinstance(gate_out, tuple) else []
    idx = [t for t in tensors if not t.dtype.is_floating_point]
    if len(idx) != 1:
        raise TypeError(f"cannot find the top-k indices in the router output ({len(tensors)} tensors)")
    wts = [t for t in tensors if t.dtype.is_floating_point and t.shape == idx[0].shape]
    if not wts:
        raise TypeError("cannot find the top-k weights (same shape as the indices) in the router output")
    # With every routed expert active the logits [T, E] have the weights' shape too: transformers'
    # routers return (logits, weights, indices), so the weights are the last of them.
    return idx[0], wts[-1]


def _is_silu(module: nn.Module) -> bool:
    act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    return act in ("silu", "swish")


def is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (
        isinstance(getattr(module, "gate", None), nn.Module)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and experts.gate_up_proj.dim() == 3
        and not getattr(experts, "is_transposed", False)
        and not getattr(experts, "has_bias", False)
        and getattr(experts, "has_gate", True)
    )


BLOCK_PARTS = ("gate", "experts", "shared_experts")  # what the fused forward runs, all of it


def unsupported_block_reason(module: nn.Module) -> str | None:
    """Why `enable` leaves this module as is (not a Glm4MoeMoE-like block, parts the fused forward
    would skip, weights that hooks place, an unknown shared expert layout, an activation other than
    SiLU), or None when it swaps it."""
    if not is_moe_block(module):
        return "not a MoE block with a router `gate` and fused `experts`"
    others = [name for name, _ in module.named_children() if name not in BLOCK_PARTS]
    others += [name for name, value in module._parameters.items() if value is not None]
    if others:  # e.g. Qwen2-MoE's `shared_expert` and its `shared_expert_gate`
        return f"it has parts the fused forward would skip ({', '.join(others)})"
    for name, part in module.named_modules():
        problem = _hook_problem(part)
        if problem:
            return f"{name or 'the block'}: {problem}, which the fused forward would bypass"
    forward = module.__dict__.get("forward")
    if forward is not None and not _is_fused_forward(forward) and not _accelerate_hooked(module):
        return "its forward is already replaced on the instance (another library's wrapper)"
    se = getattr(module, "shared_experts", None)
    if se is not None and not all(hasattr(se, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "unknown shared expert layout"
    if not (_is_silu(module.experts) and (se is None or _is_silu(se))):
        return "activation is not SiLU"
    return None


def _accelerate_hooked(module: nn.Module) -> bool:
    """accelerate's hook wraps the instance's forward and calls the module's `_old_forward`."""
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


def _hook_problem(module: nn.Module) -> str | None:
    """What an accelerate hook on `module` does that the fused forward, reading the weights itself,
    would skip: offloading (weights loaded at each call), or a device other than the weights'. The
    hooks of a model dispatched across GPUs only move inputs to where the weights already are."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook

    devices = {p.device for p in module.parameters(recurse=False)}
    for one in getattr(hook, "hooks", None) or (hook,):
        if not isinstance(one, AlignDevicesHook):
            return f"a {type(one).__name__} hook"
        if one.offload or torch.device("meta") in devices:
            return "accelerate's offloading hook"
        target = one.execution_device
        if target is not None and devices and devices != {torch.device(target)}:
            return f"an accelerate hook that runs it on {target}, not where its weights are"
    return None


def _is_sigmoid_router(gate: nn.Module) -> bool:
    """A Glm4MoeTopkRouter-like gate whose group-limited choice is a no-op (one group, or all groups kept)."""
    n_group = getattr(gate, "n_group", getattr(gate, "num_group", 1))
    return (
        isinstance(getattr(gate, "weight", None), torch.Tensor)
        and gate.weight.dim() == 2
        and isinstance(getattr(gate, "e_score_correction_bias", None), torch.Tensor)
        and isinstance(getattr(gate, "top_k", None), int)
        and (n_group == 1 or getattr(gate, "topk_group", 1) >= n_group)
    )


def _route(gate: nn.Module, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: the fused Triton launches where they can run, else the module itself.
    Under `torch.compile`, one opaque op (`torch.ops.moecarve.sigmoid_topk`) that decides at run time.
    A gate with hooks or a replaced forward (routing logged or changed) runs as its own module."""
    if not fused or _wrapped(gate) or needs_grad(x, gate.weight, gate.e_score_correction_bias):
        return _routing(gate(x))
    args = (
        x, gate.weight, gate.e_score_correction_bias, gate.top_k, bool(getattr(gate, "norm_topk_prob", True)),
        float(getattr(gate, "routed_scaling_factor", 1.0)),
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return torch.ops.moecarve.sigmoid_topk(*args)
    if _router_runs_here(x, gate.weight, gate.e_score_correction_bias):
        from .ops.router import sigmoid_topk

        with on_its_gpu(x):
            return sigmoid_topk(*args)
    return _routing(gate(x))


def _router_runs_here(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """The router's Triton launches can take x (its dtype and device), with the router's weights
    on x's device (their dtypes may differ: the bias is fp32)."""
    return triton_unsupported_reason(x, [x]) is None and weight.device == bias.device == x.device


@torch.library.custom_op(
    "moecarve::sigmoid_topk",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, int top_k, bool norm_topk_prob, float scaling) -> (Tensor, Tensor)",
)
def _sigmoid_topk_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router as one op for `torch.compile`: the Triton launches where they can run, else the
    same routing in PyTorch; (int32 indices, float32 gates) either way."""
    if _router_runs_here(x, weight, bias):
        from .ops.router import sigmoid_topk

        with on_its_gpu(x):
            return sigmoid_topk(x, weight, bias, top_k, norm_topk_prob, scaling)
    idx, wts = sigmoid_topk_reference(x, weight, bias, top_k, norm_topk_prob, scaling)
    return idx.to(torch.int32), wts.float()


@_sigmoid_topk_op.register_fake
def _sigmoid_topk_op_fake(x, weight, bias, top_k, norm_topk_prob, scaling):
    """The outputs' shapes and dtypes, after checking the shapes (so bad ones fail at trace time)."""
    if (
        x.dim() != 2
        or weight.dim() != 2
        or weight.shape[1] != x.shape[1]
        or tuple(bias.shape) != (weight.shape[0],)
    ):
        raise ValueError(
            f"router shapes: x {tuple(x.shape)} must be [T, H], weight {tuple(weight.shape)} [E, H] and "
            f"bias {tuple(bias.shape)} [E]"
        )
    if not 1 <= top_k <= weight.shape[0]:
        raise ValueError(f"top_k must be between 1 and the {weight.shape[0]} routed experts, got {top_k}")
    tokens = x.shape[0]
    return x.new_empty(tokens, top_k, dtype=torch.int32), x.new_empty(tokens, top_k, dtype=torch.float32)


def _wrapped(module: nn.Module) -> bool:
    """Hooks, an instance forward or parametrized weights: the module computes more than its weights.
    accelerate's hooks of a model dispatched across GPUs (inputs moved to where the weights are) do not
    count, nor do transformers' output-capturing hooks while no output is being captured."""
    moves_inputs_only = _accelerate_hooked(module) and _hook_problem(module) is None
    return bool(
        module._forward_pre_hooks
        or any(not _idle_capture_hook(hook) for hook in module._forward_hooks.values())
        or ("forward" in module.__dict__ and not moves_inputs_only)
        or torch.nn.utils.parametrize.is_parametrized(module)
    )


def _idle_capture_hook(hook) -> bool:
    """transformers' output-capturing hook (installed on the router at the first call asking for
    `output_router_logits`, and kept) while this call does not capture its output: it does nothing
    then, and counting it would turn the fused router off for good. Anything else about the hook than
    transformers 5's layout counts it as working."""
    if getattr(hook, "__name__", None) != "output_capturing_hook" or hook.__closure__ is None:
        return False
    collector = getattr(sys.modules.get(hook.__module__), "_active_collector", None)
    free = dict(zip(hook.__code__.co_freevars, hook.__closure__, strict=True))
    if collector is None or "key" not in free:
        return False
    collecting = collector.get()
    return collecting is None or free["key"].cell_contents not in collecting


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free nn.Linear whose weight is all it computes with (no adapter wrapping it, no hooks)."""
    return type(module) is nn.Linear and module.bias is None and not _wrapped(module)


def _shared_weights(se: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The shared expert's (gate, up, down) weights where they are all it computes, else None (e.g.
    LoRA adapters added to it, or hooks): then it runs as its own module."""
    parts = [getattr(se, name) for name in ("gate_proj", "up_proj", "down_proj")]
    plain = all(_plain_linear(part) for part in parts) and not _wrapped(se)
    return tuple(part.weight for part in parts) if plain else None


def _fused_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Glm4MoeMoE.forward with the router in one launch and routed + shared experts in one `moe_ffn`
    call. A block whose experts are wrapped (adapters, hooks, a replaced forward: they compute more
    than their weights), or that jitters its inputs while training (Mixtral's `jitter_noise`), runs
    its own forward."""
    if (
        not is_moe_block(self)
        or _wrapped(self.experts)
        or (self.training and getattr(self, "jitter_noise", 0) > 0)
    ):
        return type(self).forward(self, hidden_states)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1]).contiguous()
    topk_indices, topk_weights = _route(self.gate, x, self._moecarve_fused_router)
    se = getattr(self, "shared_experts", None)
    shared = None if se is None else _shared_weights(se)
    out = moe_ffn(
        x, topk_indices, topk_weights, self.experts.gate_up_proj, self.experts.down_proj, *(shared or ())
    )
    if se is not None and shared is None:
        out = out + se(x)
    return out.view(shape)


def _is_fused_forward(forward) -> bool:
    return isinstance(forward, types.MethodType) and forward.__func__ is _fused_block_forward


def enable(model: nn.Module, *, fused_router: bool = True) -> int:
    """Route every Glm4MoeMoE-like block of `model` through the kernels; returns how many were swapped.

    fused_router: compute the sigmoid top-k routing in two Triton launches (where the router has one
    expert group), instead of the router module's ~15 small kernels.
    The swap is per instance (state dict and class untouched); `disable(model)` undoes it.
    Raises ValueError when the model has no such block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable takes a loaded model (a torch.nn.Module), got a {type(model).__name__}")
    register_experts_implementation()
    swapped, refused = 0, []
    for name, module in model.named_modules():
        if not is_moe_block(module):
            continue
        reason = unsupported_block_reason(module)
        if reason is not None:
            refused.append(f"{name}: {reason}")
            warn_once(f"enable-{name}", f"moecarve.kernels: {name}: {reason}, block left as is")
            continue
        module._moecarve_fused_router = fused_router and _is_sigmoid_router(module.gate)
        fused = types.MethodType(_fused_block_forward, module)
        if _accelerate_hooked(module):  # its hook's wrapper calls the fused forward
            if not _is_fused_forward(module._old_forward):
                module._moecarve_old_forward = module._old_forward
            module._old_forward = fused
        else:
            module.forward = fused
        swapped += 1
    if refused and not swapped:
        raise ValueError(
            f"moecarve.kernels.enable: no MoE block taken ({refused[0]}); the model is unchanged"
        )
    if not swapped:
        raise ValueError(
            "moecarve.kernels.enable: no MoE block with a router `gate`, fused `experts` (gate_up_proj "
            "[E, 2I, H], down_proj [E, H, I]) and SiLU was found (adapters on the routed experts hide "
            "their weights: merge them first); the model is unchanged"
        )
    return swapped


def disable(model: nn.Module) -> int:
    """Undo `enable(model)`; returns how many blocks were restored."""
    restored = 0
    for module in model.modules():
        if _is_fused_forward(module.__dict__.get("forward")):
            del module.forward
        elif _is_fused_forward(module.__dict__.get("_old_forward")):
            module._old_forward = module.__dict__.pop("_moecarve_old_forward")
        else:
            continue
        del module._moecarve_fused_router
        restored += 1
    return restored


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The routed experts through the kernels, in transformers' experts-interface signature."""
    ok = (
        getattr(self, "has_gate", True)
        and not getattr(self, "has_bias", False)
        and not getattr(self, "is_transposed", False)
        and getattr(self, "is_concatenated", True)
        and not getattr(self, "has_post_expert_norm", False)
        and not getattr(self, "_is_expert_parallel", False)
        and _is_silu(self)
    )
    if not ok:
        original = getattr(type(self).forward, "__wrapped__", None)
        if original is None:
            raise NotImplementedError(
                f"moecarve.kernels cannot run {type(self).__name__} and found no eager forward"
            )
        warn_once(
            f"experts-{type(self).__name__}",
            f"moecarve.kernels: {type(self).__name__} layout unsupported, eager",
        )
        return original(self, hidden_states, top_k_index, top_k_weights)
    return moe_ffn(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def register_experts_implementation(name: str = IMPLEMENTATION_NAME) -> bool:
    """Register `experts_forward` as transformers experts implementation `name`; False if it has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(name, experts_forward)
    return True
