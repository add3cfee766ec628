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
    x = hidden_states.float()
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    out = torch.zeros_like(x)
    # Each pick by its index, as the kernels and transformers take them: a pick of weight 0 (or
    # nan) is still computed and weighted, for its own token alone; other indices are dropped.
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
