"""Pure-PyTorch reference of the MoE FFN that the Triton kernels in `moe_ffn.py` compute.

Same contract as `transformers`' Glm4MoeMoE without its router: routed experts weighted by
the router's gates, summed over the token's K choices, plus the shared expert(s).
Computed in float32, returned in the input dtype. Also the fallback where Triton cannot run.

Letters: T tokens, H hidden, E routed experts, K active (routed) per token,
I intermediate size of one expert, SI intermediate size of the shared expert(s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shared_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The shared expert's [T, SI] activations SiLU(x gate^T) * (x up^T), in x's dtype as eager
    rounds them (cuBLAS): what the Triton paths add to their routed output."""
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


def check_moe_inputs(x, idx, wts, w13, w2, shared_parts) -> tuple | None:
    """Refuse a call whose tensors do not fit together (shapes, dtypes, devices) before any work;
    returns the shared expert's weights, or None where it has none."""
    if any(p is None for p in shared_parts) and any(p is not None for p in shared_parts):
        raise ValueError("pass all three shared expert weights (gate, up, down) or none")
    shared = None if shared_parts[0] is None else shared_parts
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    E, two_i, H = w13.shape
    if E < 1:
        raise ValueError(f"gate_up_proj holds no expert: shape {tuple(w13.shape)}")
    if two_i % 2 or tuple(w2.shape) != (E, H, two_i // 2) or x.shape[1] != H:
        raise ValueError(
            f"shape mismatch: hidden_states {tuple(x.shape)}, gate_up_proj {tuple(w13.shape)} "
            f"(expected [E, 2I, H]), down_proj {tuple(w2.shape)} (expected [E, H, I])"
        )
    if idx.dim() != 2 or idx.shape != wts.shape or idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_indices {tuple(idx.shape)} and topk_weights {tuple(wts.shape)} must both be [T, K] "
            f"with T = {x.shape[0]}"
        )
    if idx.shape[1] == 0:
        raise ValueError(f"topk_indices {tuple(idx.shape)} holds no pick: every token needs K >= 1 experts")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or not wts.dtype.is_floating_point:
        raise ValueError(
            f"topk_indices must be integer and topk_weights floating, got {idx.dtype}, {wts.dtype}"
        )
    if idx.device != x.device or wts.device != x.device:
        raise ValueError(
            f"topk_indices ({idx.device}) and topk_weights ({wts.device}) must be on hidden_states' "
            f"device ({x.device})"
        )
    if not all(t.dtype.is_floating_point for t in (x, w13, w2, *(shared or ()))):
        raise ValueError(
            "hidden_states and the expert weights must be floating point, got "
            f"{sorted({str(t.dtype) for t in (x, w13, w2, *(shared or ()))})}"
        )
    if shared is None:
        return None
    sg, su, sd = shared
    si = sg.shape[0]
    if sg.shape != (si, H) or su.shape != (si, H) or sd.shape != (H, si):
        raise ValueError(
            f"shared expert weights must be gate [SI, H], up [SI, H], down [H, SI] with H = {H}, got "
            f"{tuple(sg.shape)}, {tuple(su.shape)}, {tuple(sd.shape)}"
        )
    return shared


def check_expert_ids(topk_indices: torch.Tensor, experts: int) -> None:
    """Ids in [0, E]: E is transformers' expert-parallel sentinel (no expert); below 0 or above E is
    routing of another model, which transformers' experts refuse too (and the kernels would drop)."""
    bad = topk_indices[(topk_indices < 0) | (topk_indices > experts)]
    if bad.numel():
        raise ValueError(
            f"expert ids must lie in [0, {experts}] ({experts} meaning no expert) for {experts} experts; "
            f"got {bad[0].item()} (routing of another model?)"
        )


def moe_ffn_reference(
    hidden_states: torch.Tensor,  # [T, H]
    topk_indices: torch.Tensor,  # [T, K] int
    topk_weights: torch.Tensor,  # [T, K] float
    gate_up_proj: torch.Tensor,  # [E, 2I, H]: gate rows then up rows
    down_proj: torch.Tensor,  # [E, H, I]
    shared_gate_proj: torch.Tensor | None = None,  # [SI, H]
    shared_up_proj: torch.Tensor | None = None,  # [SI, H]
    shared_down_proj: torch.Tensor | None = None,  # [H, SI]
) -> torch.Tensor:
    """Routed experts (gated SiLU MLPs) weighted by the gates, plus the shared expert; float32 math."""
    shared_parts = (shared_gate_proj, shared_up_proj, shared_down_proj)
    check_moe_inputs(hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, shared_parts)
    if topk_indices.device.type == "cpu":  # on a GPU the check would need a host sync
        check_expert_ids(topk_indices, gate_up_proj.shape[0])
    return moe_ffn_reference_unchecked(
        hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, *shared_parts
    )


def moe_ffn_reference_unchecked(
    hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj,
    shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None,
) -> torch.Tensor:  # fmt: skip
    """`moe_ffn_reference` on inputs `moe_ffn` has already checked (its fallback: not checked twice)."""
    x = hidden_states.float()
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    out = torch.zeros_like(x)
    # Each pick by its index, as the kernels and transformers take them: a pick of weight 0 (or
    # nan) is still computed and weighted, for its own token alone; the sentinel E is dropped (as is,
    # on a GPU, where ids go unchecked, any id outside [0, E)).
    picked = topk_indices[(topk_indices >= 0) & (topk_indices < num_experts)]
    for e in torch.unique(picked).tolist():
        tok, slot = torch.nonzero(topk_indices == e, as_tuple=True)
        gu = x[tok] @ gate_up_proj[e].float().T  # [t, 2I]
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, (h @ down_proj[e].float().T) * topk_weights[tok, slot, None].float())
    if shared_gate_proj is not None:
        h = F.silu(x @ shared_gate_proj.float().T) * (x @ shared_up_proj.float().T)
        out += h @ shared_down_proj.float().T
    return out.to(hidden_states.dtype)


def sigmoid_topk_reference(x, weight, bias, top_k, norm_topk_prob, scaling):
    """Glm4MoeTopkRouter's routing with one expert group, in PyTorch (float32 logits, torch.topk):
    what `ops/router.py`'s kernels compute, and their fallback where Triton cannot run."""
    scores = (x.float() @ weight.float().T).sigmoid()
    idx = torch.topk(scores + bias.float(), top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scaling
