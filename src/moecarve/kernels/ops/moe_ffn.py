"""Triton kernels for the MoE FFN forward (routed gated-SiLU experts + shared expert).

Three paths, each a gate+up step (with SiLU(gate)*up) and a down step:

- decode (few tokens): one program per (expert, block of I rows). A program whose expert no
  token picked exits at once, so only the selected experts' rows are read; a program that runs
  computes its rows for all T tokens at once, so tokens that share an expert share its reads.
  The down kernel owns a block of H outputs for all tokens and accumulates every hit expert,
  weighted by the gate, plus the shared expert, in float32 registers: one write, no atomics.
- grouped (more tokens): (token, expert) pairs sorted and padded per expert to BLOCK_M rows,
  one grouped GEMM per projection over the blocks (as vLLM's fused_moe); the shared expert goes
  through cuBLAS, which is best at those sizes.
- dense (batches that hit nearly every expert): every expert on every token, a dense FFN's work
  and bytes: gate+up of all experts as one cuBLAS GEMM on the [E*2I, H] view of gate_up_proj,
  then one Triton GEMM for down whose operand load applies SiLU(gate)*up*gate weight, so no
  [T, E*I] activation is written; the shared expert's down runs in the same kernel.

No path syncs with the host, so each can be captured in a CUDA graph.

Letters: T tokens, H hidden, E routed experts, K active per token, I intermediate size of an
expert, SI of the shared expert(s), P = T*K (token, expert) pairs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._env import triton_interpreting
from .configs import DecodeConfig, DenseConfig, GroupedConfig, decode_config
from .reference import shared_hidden

# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc[M, N] += a[M, K] @ b; b is [K, N] for the dot path and [N, K] for the FMA path."""
    if USE_DOT:
        if PREC == "upcast":  # Triton's CPU interpreter multiplies bf16 dot operands as raw bits
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PREC)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _w_offsets(offs_n, offs_k, stride_n, USE_DOT: tl.constexpr):
    """Offsets of a weight tile whose rows (N) have stride stride_n and columns (K) stride 1."""
    if USE_DOT:
        return offs_n[None, :].to(tl.int64) * stride_n + offs_k[:, None]  # [K, N]
    else:
        return offs_n[:, None].to(tl.int64) * stride_n + offs_k[None, :]  # [N, K]


@triton.jit
def _w_mask(n_mask, k_mask, MASKED: tl.constexpr, USE_DOT: tl.constexpr):
    """Mask of a weight tile; unmasked along the contiguous K axis unless MASKED, to keep wide loads."""
    if USE_DOT:
        if MASKED:
            return k_mask[:, None] & n_mask[None, :]
        else:
            return n_mask[None, :]
    else:
        if MASKED:
            return n_mask[:, None] & k_mask[None, :]
        else:
            return n_mask[:, None]


@triton.jit
def _gate_up_loop(
    acc_g, acc_u, a_ptrs, a_mask, g_ptr, u_ptr, w_off, n_mask, k_start, k_end,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate x @ gate^T and x @ up^T over the K range [k_start, k_end) in BLOCK_K chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if MASKED:  # only the last, partial chunk pays for a mask along the contiguous axis
            k_mask = offs_k < k_end - k0
            a = tl.load(a_ptrs + k0, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
            wm = _w_mask(n_mask, k_mask, True, USE_DOT)
        else:
            a = tl.load(a_ptrs + k0, mask=a_mask[:, None], other=0.0)
            wm = _w_mask(n_mask, offs_k, False, USE_DOT)
        wg = tl.load(g_ptr + w_off + k0, mask=wm, other=0.0)
        wu = tl.load(u_ptr + w_off + k0, mask=wm, other=0.0)
        acc_g = _mma(acc_g, a, wg, USE_DOT, PREC)
        acc_u = _mma(acc_u, a, wu, USE_DOT, PREC)
    return acc_g, acc_u


@triton.jit
def _gate_up(
    x_ptr, rows, row_mask, stride_xt, k_lo, k_hi, g_ptr, u_ptr, stride_w, n_rows, n0,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """(x[rows, k] @ gate[n0:n0+BN, k]^T, same with up) over k in [k_lo, k_hi), float32 [BLOCK_M, BLOCK_N]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_rows
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xt + tl.arange(0, BLOCK_K)[None, :]
    w_off = _w_offsets(offs_n, tl.arange(0, BLOCK_K), stride_w, USE_DOT)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_main = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K  # a multiple of BLOCK_K that Triton can see
    acc_g, acc_u = _gate_up_loop(
        acc_g, acc_u, a_ptrs, row_mask, g_ptr, u_ptr, w_off, n_mask, k_lo, k_main, BLOCK_K, False, USE_DOT, PREC
    )  # fmt: skip
    acc_g, acc_u = _gate_up_loop(
        acc_g, acc_u, a_ptrs, row_mask, g_ptr, u_ptr, w_off, n_mask, k_main, k_hi, BLOCK_K, True, USE_DOT, PREC
    )  # fmt: skip
    return acc_g, acc_u


@triton.jit
def _load_picks(idx_ptr, wts_ptr, rows, row_mask, K, BLOCK_R: tl.constexpr):
    """The tile's top-k indices and float32 weights, [rows, BLOCK_R]; padding picks expert -1 at
    weight 0, which matches no expert."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = row_mask[:, None] & (offs_r[None, :] < K)
    idx = tl.load(idx_ptr + rows[:, None] * K + offs_r[None, :], mask=r_mask, other=-1)
    wts = tl.load(wts_ptr + rows[:, None] * K + offs_r[None, :], mask=r_mask, other=0.0).to(tl.float32)
    return idx, wts


@triton.jit
def _store_silu_mul(h_ptr, rows, row_mask, stride_ht, col0, offs_i, i_mask, acc_g, acc_u):
    """SiLU(gate) * up, rounded to h's dtype (as eager rounds its intermediate)."""
    ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_ht + col0 + offs_i[None, :]
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(ptrs, act.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & i_mask[None, :])


@triton.jit
def _down_loop(
    acc, a_ptrs, a_mask, w_ptr, w_off, n_mask, k_start, k_end,
    BLOCK_K: tl.constexpr, MASKED: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if MASKED:
            k_mask = offs_k < k_end - k0
            a = tl.load(a_ptrs + k0, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
            wm = _w_mask(n_mask, k_mask, True, USE_DOT)
        else:
            a = tl.load(a_ptrs + k0, mask=a_mask[:, None], other=0.0)
            wm = _w_mask(n_mask, offs_k, False, USE_DOT)
        w = tl.load(w_ptr + w_off + k0, mask=wm, other=0.0)
        acc = _mma(acc, a, w, USE_DOT, PREC)
    return acc


@triton.jit
def _down(
    a_ptr, rows, row_mask, stride_at, K_DIM, w_ptr, stride_w, offs_n, n_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """act[rows, :K_DIM] @ w[offs_n, :K_DIM]^T as float32 [BLOCK_M, BLOCK_N].

    The reduction runs in BLOCK_K chunks, then unmasked 16-wide chunks, then one masked chunk,
    so that an I such as 688 (= 5*128 + 48) keeps wide vector loads on all but <16 columns.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_row = a_ptr + rows[:, None].to(tl.int64) * stride_at
    k_main = K_DIM // BLOCK_K * BLOCK_K  # written so, Triton knows its divisibility (not as K - K % B)
    a_ptrs = a_row + tl.arange(0, BLOCK_K)[None, :]
    w_off = _w_offsets(offs_n, tl.arange(0, BLOCK_K), stride_w, USE_DOT)
    acc = _down_loop(
        acc, a_ptrs, row_mask, w_ptr, w_off, n_mask, 0, k_main, BLOCK_K, False, USE_DOT, PREC
    )  # fmt: skip
    k_16 = K_DIM // 16 * 16
    a_ptrs = a_row + tl.arange(0, 16)[None, :]
    w_off = _w_offsets(offs_n, tl.arange(0, 16), stride_w, USE_DOT)
    acc = _down_loop(
        acc, a_ptrs, row_mask, w_ptr, w_off, n_mask, k_main, k_16, 16, False, USE_DOT, PREC
    )  # fmt: skip
    acc = _down_loop(
        acc, a_ptrs, row_mask, w_ptr, w_off, n_mask, k_16, K_DIM, 16, True, USE_DOT, PREC
    )  # fmt: skip
    return acc


# ----------------------------------------------------------------------------- decode kernels


@triton.jit
def _decode_up_kernel(
    x_ptr, idx_ptr, w13_ptr, sg_ptr, su_ptr, h_ptr,
    T, H, I, SI, E, K,  # noqa: E741
    stride_xt, stride_we, stride_wr, stride_s, stride_ht,
    HAS_SHARED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
    I_ALIGN: tl.constexpr,
):  # fmt: skip
    """h[t, e*I + i] = SiLU(x[t] @ gate_e[i]) * (x[t] @ up_e[i]) for experts hit in this token tile.

    program_id(0): (expert, block of I rows), then the shared expert's row blocks; program_id(1):
    tile of BLOCK_T tokens. The shared expert's activations go to columns E*I onwards; its gate and
    up weights share one row stride (both contiguous [SI, H]). I_ALIGN divides I, SI and h's row
    stride (`vector_align`).
    """
    I = I // I_ALIGN * I_ALIGN  # noqa: E741
    SI = SI // I_ALIGN * I_ALIGN
    stride_ht = stride_ht // I_ALIGN * I_ALIGN
    pid = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    n_iblk = tl.cdiv(I, BLOCK_I)
    if pid < E * n_iblk:
        e = pid // n_iblk
        i0 = (pid - e * n_iblk) * BLOCK_I
        offs_r = tl.arange(0, BLOCK_R)
        idx = tl.load(
            idx_ptr + rows[:, None] * K + offs_r[None, :],
            mask=row_mask[:, None] & (offs_r[None, :] < K),
            other=-1,
        )
        hit = tl.sum(tl.sum((idx == e).to(tl.int32), axis=1), axis=0)
        if hit > 0:  # experts no token of the tile picked are never read
            g_ptr = w13_ptr + e.to(tl.int64) * stride_we
            acc_g, acc_u = _gate_up(
                x_ptr, rows, row_mask, stride_xt, 0, H, g_ptr, g_ptr + I * stride_wr, stride_wr, I, i0,
                BLOCK_T, BLOCK_I, BLOCK_H, USE_DOT, PREC,
            )  # fmt: skip
            offs_i = i0 + tl.arange(0, BLOCK_I)
            _store_silu_mul(h_ptr, rows, row_mask, stride_ht, e * I, offs_i, offs_i < I, acc_g, acc_u)
    elif HAS_SHARED:
        i0 = (pid - E * n_iblk) * BLOCK_I
        acc_g, acc_u = _gate_up(
            x_ptr, rows, row_mask, stride_xt, 0, H, sg_ptr, su_ptr, stride_s, SI, i0,
            BLOCK_T, BLOCK_I, BLOCK_H, USE_DOT, PREC,
        )  # fmt: skip
        offs_i = i0 + tl.arange(0, BLOCK_I)
        _store_silu_mul(h_ptr, rows, row_mask, stride_ht, E * I, offs_i, offs_i < SI, acc_g, acc_u)


@triton.jit
def _decode_down_kernel(
    h_ptr, idx_ptr, wts_ptr, w2_ptr, sd_ptr, out_ptr,
    T, H, I, SI, E, K,  # noqa: E741
    stride_ht, stride_we, stride_wr, stride_sd, stride_ot,
    HAS_SHARED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
    I_ALIGN: tl.constexpr,
):  # fmt: skip
    """out[t, n] = sum_e gate[t, e] * (h_e[t] @ down_e[n]) + h_shared[t] @ shared_down[n], in float32.

    program_id(0): block of BLOCK_N outputs; program_id(1): tile of BLOCK_T tokens. I_ALIGN divides
    I, SI and the row strides of h and the down weights (see `vector_align`).
    """
    I = I // I_ALIGN * I_ALIGN  # noqa: E741
    SI = SI // I_ALIGN * I_ALIGN
    stride_ht = stride_ht // I_ALIGN * I_ALIGN
    stride_wr = stride_wr // I_ALIGN * I_ALIGN
    stride_sd = stride_sd // I_ALIGN * I_ALIGN
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    idx, wts = _load_picks(idx_ptr, wts_ptr, rows, row_mask, K, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    w_e = w2_ptr  # advanced by one expert per iteration: 64-bit pointer math, no int32 overflow
    for e in range(0, E):
        sel = idx == e  # [BT, BR]
        routed = tl.sum(sel.to(tl.int32), axis=1) > 0  # [BT]
        if tl.sum(routed.to(tl.int32), axis=0) > 0:
            gate = tl.sum(tl.where(sel, wts, 0.0), axis=1)  # [BT]
            part = _down(
                h_ptr + e * I, rows, row_mask, stride_ht, I, w_e, stride_wr, offs_n, n_mask,
                BLOCK_T, BLOCK_N, BLOCK_K, USE_DOT, PREC,
            )  # fmt: skip
            # rows of tokens that did not pick e hold finite but unused values: select, never multiply by 0
            acc += tl.where(routed[:, None], part * gate[:, None], 0.0)
        w_e += stride_we
    if HAS_SHARED:
        acc += _down(
            h_ptr + E * I, rows, row_mask, stride_ht, SI, sd_ptr, stride_sd, offs_n, n_mask,
            BLOCK_T, BLOCK_N, BLOCK_K, USE_DOT, PREC,
        )  # fmt: skip
    out = out_ptr + rows[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- grouped kernels


@triton.jit
def _grouped_up_kernel(
    x_ptr, pair_ptr, block_expert_ptr, w13_ptr, h_ptr,
    P, K, H, I, stride_xt, stride_we, stride_wr, stride_hp,  # noqa: E741
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    I_ALIGN: tl.constexpr,
):  # fmt: skip
    """h[row] = SiLU(x[tok] @ gate_e^T) * (x[tok] @ up_e^T) for the padded, expert-sorted pair rows.
    I_ALIGN divides I and h's row stride (`vector_align`)."""
    I = I // I_ALIGN * I_ALIGN  # noqa: E741
    stride_hp = stride_hp // I_ALIGN * I_ALIGN
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:  # blocks past the last expert's are padding
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pair_ptr + offs_m)
        row_mask = pair < P
        n0 = tl.program_id(1) * BLOCK_N
        g_ptr = w13_ptr + e.to(tl.int64) * stride_we
        acc_g, acc_u = _gate_up(
            x_ptr, pair // K, row_mask, stride_xt, 0, H, g_ptr, g_ptr + I * stride_wr, stride_wr, I, n0,
            BLOCK_M, BLOCK_N, BLOCK_K, True, PREC,
        )  # fmt: skip
        offs_n = n0 + tl.arange(0, BLOCK_N)
        _store_silu_mul(h_ptr, offs_m, row_mask, stride_hp, 0, offs_n, offs_n < I, acc_g, acc_u)


@triton.jit
def _grouped_down_kernel(
    h_ptr, pair_ptr, block_expert_ptr, wts_ptr, w2_ptr, out_ptr,
    P, H, I, stride_hp, stride_we, stride_wr, stride_op,  # noqa: E741
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    I_ALIGN: tl.constexpr,
):  # fmt: skip
    """out[pair] = gate[pair] * (h[row] @ down_e^T): one float32 row per (token, expert) pair.
    I_ALIGN divides I, h's row stride and the down rows' (`vector_align`)."""
    I = I // I_ALIGN * I_ALIGN  # noqa: E741
    stride_hp = stride_hp // I_ALIGN * I_ALIGN
    stride_wr = stride_wr // I_ALIGN * I_ALIGN
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pair_ptr + offs_m)
        row_mask = pair < P
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        acc = _down(
            h_ptr, offs_m, row_mask, stride_hp, I, w2_ptr + e.to(tl.int64) * stride_we, stride_wr,
            offs_n, n_mask, BLOCK_M, BLOCK_N, BLOCK_K, True, PREC,
        )  # fmt: skip
        gate = tl.load(wts_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        out = out_ptr + pair[:, None].to(tl.int64) * stride_op + offs_n[None, :]
        tl.store(out, acc * gate[:, None], mask=row_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- dense-equivalent kernel


@triton.jit
def _gated_down(
    acc, g_ptrs, u_ptrs, K_DIM, picked, gate, w_ptr, stride_w, offs_n, n_mask,
    BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """acc += (gate * SiLU(g) * u)[rows, :K_DIM] @ w[offs_n, :K_DIM]^T for the rows that picked the
    expert: the activation is formed on load, never written. Rows that did not pick it are selected
    away, never multiplied by a 0 gate (an unpicked expert's inf would give NaN)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K_DIM, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K_DIM
        a_mask = picked[:, None] & k_mask[None, :]
        g = tl.load(g_ptrs + k[None, :], mask=a_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptrs + k[None, :], mask=a_mask, other=0.0).to(tl.float32)
        a = tl.where(picked[:, None], g * tl.sigmoid(g) * u * gate[:, None], 0.0)
        w = tl.load(
            w_ptr + _w_offsets(offs_n, k, stride_w, True), mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )
        acc = _mma(acc, a.to(w_ptr.dtype.element_ty), w, True, PREC)
    return acc


@triton.jit
def _dense_down_kernel(
    gu_ptr, idx_ptr, wts_ptr, w2_ptr, sg_ptr, su_ptr, sd_ptr, out_ptr,
    T, H, I, SI, E, K,  # noqa: E741
    stride_gut, stride_we, stride_wr, stride_st, stride_sd, stride_ot,
    HAS_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PREC: tl.constexpr, I_ALIGN: tl.constexpr,
):  # fmt: skip
    """out[t, n] = sum_e gate[t, e] * (SiLU(g_e[t]) * u_e[t]) @ down_e[n] + (SiLU(sg[t]) * su[t]) @ shared_down[n].

    gu [T, E*2I] holds each expert's gate then up outputs, sg and su [T, SI] the shared expert's;
    the gates come from the top-k indices and weights [T, K] as they are (no [T, E] matrix to
    build). program_id(0): tile of BLOCK_M tokens; program_id(1): block of BLOCK_N outputs
    (consecutive programs share the weight tiles). An expert no token of the tile picked is
    skipped. I_ALIGN divides I, SI and the row strides of gu, sg/su and the down weights
    (`vector_align`).
    """
    I = I // I_ALIGN * I_ALIGN  # noqa: E741
    SI = SI // I_ALIGN * I_ALIGN
    stride_gut = stride_gut // I_ALIGN * I_ALIGN
    stride_wr = stride_wr // I_ALIGN * I_ALIGN
    stride_st = stride_st // I_ALIGN * I_ALIGN
    stride_sd = stride_sd // I_ALIGN * I_ALIGN
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    idx, wts = _load_picks(idx_ptr, wts_ptr, rows, row_mask, K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gu_row = gu_ptr + rows[:, None].to(tl.int64) * stride_gut
    w_e = w2_ptr  # advanced by one expert per iteration: 64-bit pointer math
    for e in range(0, E):
        sel = idx == e  # [BM, BR]; ids outside [0, E) (sentinels) match no expert
        picked = tl.sum(sel.to(tl.int32), axis=1) > 0  # [BM]
        if tl.sum(picked.to(tl.int32), axis=0) > 0:
            gate = tl.sum(tl.where(sel, wts, 0.0), axis=1)  # [BM] float32
            g_ptrs = gu_row + e * 2 * I
            acc = _gated_down(
                acc, g_ptrs, g_ptrs + I, I, picked, gate, w_e, stride_wr, offs_n, n_mask, BLOCK_K, PREC
            )  # fmt: skip
        w_e += stride_we
    if HAS_SHARED:
        s_row = rows[:, None].to(tl.int64) * stride_st
        ones = tl.full((BLOCK_M,), 1.0, tl.float32)
        acc = _gated_down(
            acc, sg_ptr + s_row, su_ptr + s_row, SI, row_mask, ones, sd_ptr, stride_sd, offs_n, n_mask, BLOCK_K, PREC
        )  # fmt: skip
    out = out_ptr + rows[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- host functions


def _prec(dtype: torch.dtype) -> str:
    if triton_interpreting():
        return "upcast"
    # float32 weights get exact float32 products, not TF32's 10-bit mantissa
    return "ieee" if dtype == torch.float32 else "tf32"


H100_BUDGET = 160 * 1024  # bytes of pipelined tiles per program: what the H100 (227 KiB) was tuned at


@functools.cache
def _shared_memory_limit(device: torch.device) -> int | None:
    """The device's opt-in shared memory per block in bytes (Triton's own launch limit), or None
    off CUDA (the interpreter has none)."""
    if device.type != "cuda":
        return None
    from triton.runtime import driver

    index = device.index if device.index is not None else torch.cuda.current_device()
    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_budget(limit: int | None) -> int:
    """Bytes the pipelined tiles may take on a chip with `limit` bytes per block: the H100's tuned
    160 KiB, less where the chip has less (A100 163 KiB, sm_86/89 99 KiB), keeping 8 KiB for the
    kernels' other buffers. Counted as stages x tiles, an upper bound (before sm_90 Triton keeps one
    stage fewer in shared memory, so those chips may run a stage shallower than they could)."""
    return H100_BUDGET if limit is None else min(H100_BUDGET, limit - 8 * 1024)


def _stages(wanted: int, per_stage: int, device: torch.device) -> int:
    """Pipeline depth (at most `wanted`, at least 1) whose `per_stage` bytes of tiles fit the
    device's budget. Without it, 64-token tiles or float32 weights at the default depth ask for more
    shared memory than the chip has and fail to launch (seen on the H100), and smaller chips fail
    sooner. One stage can still be too many on a chip with under about 100 KiB (fp32 decode tiles)."""
    return max(1, min(wanted, shared_memory_budget(_shared_memory_limit(device)) // per_stage))


def vector_align(*sizes: int, itemsize: int) -> int:
    """The largest power of two, up to a 16-byte vector's elements, that divides every size. Triton
    assumes an integer argument divisible by 16 only when it is; told this much of a stride that is
    not (an expert of 344 rows), it still loads the rows in 16-byte vectors, not 2-byte scalars."""
    g = math.gcd(*sizes)
    return min(g & -g, max(1, 16 // itemsize)) if g else 1


def moe_ffn_decode(
    x: torch.Tensor,  # [T, H], contiguous
    topk_indices: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    gate_up_proj: torch.Tensor,  # [E, 2I, H]
    down_proj: torch.Tensor,  # [E, H, I]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,  # gate [SI, H], up [SI, H], down [H, SI]
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Reads only the rows of experts hit in each token tile; two launches, no host sync.

    Tokens go in tiles of at most cfg.max_block_t, so that many tokens are the dense-equivalent
    computation restricted to the hit experts (what nearly-all-hit batches fall back to).
    """
    T, H = x.shape
    cfg = config or decode_config(T)
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2  # noqa: E741
    K = topk_indices.shape[1]
    SI = shared[0].shape[0] if shared is not None else 0
    use_dot = cfg.use_dot if cfg.use_dot is not None else T > 4
    block_t = min(triton.next_power_of_2(T), cfg.max_block_t)
    block_t = max(16, block_t) if use_dot else block_t
    n_tiles = triton.cdiv(T, block_t)
    block_r = triton.next_power_of_2(K)
    sg, su, sd = shared if shared is not None else (gate_up_proj, gate_up_proj, down_proj)
    idx = topk_indices.contiguous()
    wts = topk_weights.contiguous()
    h = torch.empty(T, E * I + SI, device=x.device, dtype=gate_up_proj.dtype)  # [T, E*I + SI]
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    prec = _prec(gate_up_proj.dtype)
    itemsize = gate_up_proj.element_size()
    # pipeline depths from each kernel's tiles per stage: up x + gate + up, down h + down (at most
    # 4 stages, as tuned on the H100)
    stages = _stages(cfg.stages, (block_t * cfg.block_h + 2 * cfg.block_h * cfg.block_i) * itemsize, x.device)
    down_stages = _stages(min(cfg.stages, 4), (block_t + cfg.block_n) * cfg.block_k * itemsize, x.device)
    up_align = vector_align(I, SI, h.stride(0), itemsize=itemsize)
    down_align = vector_align(I, SI, h.stride(0), down_proj.stride(1), sd.stride(0), itemsize=itemsize)
    _decode_up_kernel[(E * triton.cdiv(I, cfg.block_i) + triton.cdiv(SI, cfg.block_i), n_tiles)](
        x, idx, gate_up_proj, sg, su, h,
        T, H, I, SI, E, K,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), sg.stride(0), h.stride(0),
        HAS_SHARED=shared is not None, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_I=cfg.block_i,
        BLOCK_H=cfg.block_h, USE_DOT=use_dot, PREC=prec, I_ALIGN=up_align, num_warps=cfg.warps_up,
        num_stages=stages,
    )  # fmt: skip
    _decode_down_kernel[(triton.cdiv(H, cfg.block_n), n_tiles)](
        h, idx, wts, down_proj, sd, out,
        T, H, I, SI, E, K,
        h.stride(0), down_proj.stride(0), down_proj.stride(1), sd.stride(0), out.stride(0),
        HAS_SHARED=shared is not None, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, USE_DOT=use_dot, PREC=prec, I_ALIGN=down_align, num_warps=cfg.warps_down,
        num_stages=down_stages,
    )  # fmt: skip
    return out


def align_pairs(
    topk_indices: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the P = T*K (token, expert) pairs by expert, each expert padded to a multiple of block_m.

    Returns sorted_pairs [B*block_m] (pair id, or P for padding) and block_expert [B] (expert of
    each block, -1 past the last), with B = cdiv(P, block_m) + E an upper bound that needs no
    host sync. Indices outside [0, E) (expert-parallel sentinels) are dropped.
    """
    device = topk_indices.device
    flat = topk_indices.reshape(-1).long()
    P, E = flat.numel(), num_experts
    n_blocks = triton.cdiv(P, block_m) + E
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # sentinel bucket E sorts last
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    sorted_key, order = torch.sort(key, stable=True)
    blocks = (counts[:E] + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    block_start = torch.cat(
        [block_end - blocks, block_end.new_full((1,), n_blocks)]
    )  # bucket E -> past the end
    rank = torch.arange(P, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    pos = block_start[sorted_key] * block_m + rank
    sorted_pairs = torch.full((n_blocks * block_m + P,), P, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, pos, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=device), right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return sorted_pairs[: n_blocks * block_m], block_expert


def moe_ffn_grouped(
    x: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    config: GroupedConfig | None = None,
) -> torch.Tensor:
    """Batched/prefill path: grouped GEMMs over expert-sorted, block-padded pairs; shared via cuBLAS."""
    cfg = config or GroupedConfig()
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2  # noqa: E741
    K = topk_indices.shape[1]
    P = T * K
    sorted_pairs, block_expert = align_pairs(topk_indices, E, cfg.block_m)
    n_blocks = block_expert.numel()
    prec = _prec(gate_up_proj.dtype)
    tile = cfg.block_k * gate_up_proj.element_size()  # bytes per row or column of a K-chunk
    up_stages = _stages(cfg.stages, (cfg.block_m + 2 * cfg.block_n) * tile, x.device)  # x, gate, up
    down_stages = _stages(cfg.stages, (cfg.block_m + cfg.block_n) * tile, x.device)  # h, down
    h = torch.empty(n_blocks * cfg.block_m, I, device=x.device, dtype=gate_up_proj.dtype)
    align = vector_align(I, h.stride(0), down_proj.stride(1), itemsize=gate_up_proj.element_size())
    _grouped_up_kernel[(n_blocks, triton.cdiv(I, cfg.block_n))](
        x, sorted_pairs, block_expert, gate_up_proj, h,
        P, K, H, I, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), h.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREC=prec, I_ALIGN=align,
        num_warps=cfg.warps, num_stages=up_stages,
    )  # fmt: skip
    pair_out = torch.zeros(P, H, device=x.device, dtype=torch.float32)  # pairs with a sentinel expert stay 0
    _grouped_down_kernel[(n_blocks, triton.cdiv(H, cfg.block_n))](
        h, sorted_pairs, block_expert, topk_weights.contiguous().view(-1), down_proj, pair_out,
        P, H, I, h.stride(0), down_proj.stride(0), down_proj.stride(1), pair_out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREC=prec, I_ALIGN=align,
        num_warps=cfg.warps, num_stages=down_stages,
    )  # fmt: skip
    out = pair_out.view(T, K, H).sum(1)
    if shared is not None:
        sg, su, sd = shared
        out += F.linear(shared_hidden(x, sg, su), sd).float()
    return out.to(x.dtype)


def moe_ffn_dense(
    x: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    config: DenseConfig | None = None,
) -> torch.Tensor:
    """Dense-equivalent path: every expert on every token, the work and weight bytes of the dense
    FFN the model was carved from, for batches that hit nearly every expert anyway (where reading
    only the hit experts saves little and costs per-expert overhead). One cuBLAS GEMM for every
    expert's gate+up, the shared expert's gate and up GEMMs, and one Triton kernel for down that
    forms every activation on load: four launches against the dense FFN's five (its gate, up and
    down GEMMs, the SiLU and the product); no host sync."""
    cfg = config or DenseConfig()
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2  # noqa: E741
    K = topk_indices.shape[1]
    # [T, E*2I]: gate then up of each expert (cuBLAS; float32 follows torch's TF32 setting)
    gu = F.linear(x, gate_up_proj.view(E * two_i, H))
    if shared is not None:
        sg_w, su_w, sd = shared
        sg, su = F.linear(x, sg_w), F.linear(x, su_w)  # [T, SI] each, fresh: one row stride for both
        SI = sg.shape[1]
    else:
        sg, su, sd, SI = gu, gu, down_proj, 0  # placeholders: the kernel reads them only with HAS_SHARED
    idx, wts = topk_indices.contiguous(), topk_weights.contiguous()
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(T)))
    per_stage = (2 * block_m * cfg.block_k + cfg.block_k * cfg.block_n) * gate_up_proj.element_size()
    stages = _stages(cfg.stages, per_stage, x.device)  # shared memory: gate, up and down tiles
    _dense_down_kernel[(triton.cdiv(T, block_m), triton.cdiv(H, cfg.block_n))](
        gu, idx, wts, down_proj, sg, su, sd, out,
        T, H, I, SI, E, K,
        gu.stride(0), down_proj.stride(0), down_proj.stride(1), sg.stride(0), sd.stride(0), out.stride(0),
        HAS_SHARED=shared is not None, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=triton.next_power_of_2(K), PREC=_prec(gate_up_proj.dtype), num_warps=cfg.warps,
        num_stages=stages,
        I_ALIGN=vector_align(
            I, SI, gu.stride(0), down_proj.stride(1), sg.stride(0), su.stride(0), sd.stride(0),
            itemsize=gate_up_proj.element_size(),
        ),
    )  # fmt: skip
    return out
