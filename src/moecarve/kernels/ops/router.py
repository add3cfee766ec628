"""Fused sigmoid top-k router (Glm4MoeTopkRouter with one expert group) in one Triton launch.

transformers' router is about fifteen small kernels (casts, linear, sigmoid, group top-k, mask,
top-k, gather, normalise, scale); at batch 1 their launches cost about as much as the experts.
Here one program per token computes the E logits in float32, the sigmoid, the biased choice,
K rounds of argmax, and the normalised, scaled gates. Ties may break differently from torch.topk.

Letters: T tokens, H hidden, E routed experts, K active.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sigmoid_topk_kernel(
    x_ptr, w_ptr, bias_ptr, idx_ptr, wts_ptr,
    H, E, K, stride_xt, stride_we, scale,
    NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = offs_h < H - h0
        x = tl.load(x_ptr + t * stride_xt + h0 + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * stride_we + h0 + offs_h[None, :], mask=e_mask[:, None] & h_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += w * x[None, :]
    scores = tl.sigmoid(tl.sum(acc, axis=1))  # [BLOCK_E]
    choice = scores + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    choice = tl.where(e_mask, choice, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    top_idx = tl.zeros((BLOCK_K,), dtype=tl.int32)
    top_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K):
        best = tl.max(choice, axis=0)
        i = tl.min(tl.where(choice == best, offs_e, BLOCK_E), axis=0)  # lowest index among ties
        top_idx = tl.where(offs_k == k, i, top_idx)
        top_w = tl.where(offs_k == k, tl.sum(tl.where(offs_e == i, scores, 0.0), axis=0), top_w)
        choice = tl.where(offs_e == i, float("-inf"), choice)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
    k_mask = offs_k < K
    tl.store(idx_ptr + t * K + offs_k, top_idx, mask=k_mask)
    tl.store(wts_ptr + t * K + offs_k, top_w * scale, mask=k_mask)


def sigmoid_topk(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H]
    bias: torch.Tensor,  # [E] score-correction bias, added for the choice only
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_indices [T, K] int64, topk_weights [T, K] float32) as Glm4MoeTopkRouter with n_group = 1."""
    T, H = x.shape
    E = weight.shape[0]
    idx = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    wts = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    block_e = triton.next_power_of_2(E)
    _sigmoid_topk_kernel[(T,)](
        x, weight, bias, idx, wts, H, E, top_k, x.stride(0), weight.stride(0), float(scaling),
        NORM=norm_topk_prob, BLOCK_E=block_e, BLOCK_H=max(16, min(256, 4096 // block_e)),
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip
    return idx, wts


def sigmoid_topk_reference(x, weight, bias, top_k, norm_topk_prob, scaling):
    """The same routing in PyTorch (float32 logits, torch.topk)."""
    scores = (x.float() @ weight.float().T).sigmoid()
    idx = torch.topk(scores + bias.float(), top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scaling
