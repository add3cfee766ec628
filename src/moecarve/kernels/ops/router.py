"""Fused sigmoid top-k router (Glm4MoeTopkRouter with one expert group) in two Triton launches.

transformers' router is about fifteen small kernels (casts, linear, sigmoid, group top-k, mask,
top-k, gather, normalise, scale); at batch 1 their launches cost about as much as the experts.
Here the logits are split over H: `split` programs per token each reduce one slice of H into
float32 partial logits, so a decode step's [E, H] router weight is read by many SMs at once
rather than by one program in a chain of 16-32 dependent loads (what the block's time beyond
its experts' suggested on the H100: docs/kernels.md, "The router"). A second launch per token
sums the partials and takes the sigmoid, the biased choice, K rounds of argmax, and the
normalised, scaled gates. Ties may break differently from torch.topk.

Letters: T tokens, H hidden, E routed experts, K active.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs the logits launch aims for: enough to spread a decode step's router weight over the
# SMs (each then loads one [BLOCK_E, BLOCK_H] tile); large batches take one program per token.
TARGET_PROGRAMS = 1024


@triton.jit
def _router_logits_kernel(
    x_ptr, w_ptr, part_ptr, H, E, stride_xt, stride_we, chunk, SPLIT,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """part[t, s, e] = x[t, h] . w[e, h] over slice s of H (`chunk` columns), in float32."""
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    h_start = s * chunk
    h_end = tl.minimum(h_start + chunk, H)
    for h0 in range(h_start, h_end, BLOCK_H):
        h_mask = offs_h < h_end - h0
        x = tl.load(x_ptr + t * stride_xt + h0 + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e[:, None] * stride_we + h0 + offs_h[None, :], mask=e_mask[:, None] & h_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += w * x[None, :]
    tl.store(part_ptr + (t * SPLIT + s) * BLOCK_E + offs_e, tl.sum(acc, axis=1))


@triton.jit
def _sigmoid_topk_kernel(
    part_ptr, bias_ptr, idx_ptr, wts_ptr, E, K, scale, SPLIT,
    NORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One token: logits = sum of its SPLIT partials, then sigmoid, biased top-K and the gates."""
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_s = tl.arange(0, BLOCK_S)
    part = tl.load(part_ptr + (t * SPLIT + offs_s[:, None]) * BLOCK_E + offs_e[None, :],
                   mask=offs_s[:, None] < SPLIT, other=0.0)  # fmt: skip
    scores = tl.sigmoid(tl.sum(part, axis=0))  # [BLOCK_E]
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


def router_tiles(experts: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_H): all experts in one tile of at most 4,096 weights (fewer below 9 experts)."""
    block_e = triton.next_power_of_2(experts)
    return block_e, max(16, min(256, 4096 // block_e))


def router_split(tokens: int, hidden: int, experts: int, split: int | None = None) -> tuple[int, int]:
    """(programs per token, H columns each): `split` if given (clamped to the H blocks), else as
    many as keep tokens x split near TARGET_PROGRAMS, down to one per token for large batches."""
    block_h = router_tiles(experts)[1]
    n_blocks = triton.cdiv(hidden, block_h)
    want = split if split is not None else TARGET_PROGRAMS // max(tokens, 1)
    per = triton.cdiv(n_blocks, max(1, min(want, n_blocks)))  # H blocks per program
    return triton.cdiv(n_blocks, per), per * block_h


def sigmoid_topk(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H]
    bias: torch.Tensor,  # [E] score-correction bias, added for the choice only
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_indices [T, K] int32, topk_weights [T, K] float32) as Glm4MoeTopkRouter with n_group = 1.

    split: programs per token for the logits (None: from the batch size; 1: one per token).
    """
    T, H = x.shape
    E = weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be between 1 and the {E} routed experts, got {top_k}")
    x, weight = x.contiguous(), weight.contiguous()  # the kernel reads rows with unit stride
    block_e, block_h = router_tiles(E)
    n_split, chunk = router_split(T, H, E, split)
    part = torch.empty(T, n_split, block_e, dtype=torch.float32, device=x.device)
    idx = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    wts = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    _router_logits_kernel[(T, n_split)](
        x, weight, part, H, E, x.stride(0), weight.stride(0), chunk, n_split,
        BLOCK_E=block_e, BLOCK_H=block_h,
    )  # fmt: skip
    _sigmoid_topk_kernel[(T,)](
        part, bias, idx, wts, E, top_k, float(scaling), n_split,
        NORM=norm_topk_prob, BLOCK_S=triton.next_power_of_2(n_split), BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip
    return idx, wts
