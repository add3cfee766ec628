"""`moe_ffn`: the MoE FFN forward with input checks, path dispatch and fallbacks.

Paths (`path=`):
- "decode": Triton kernels that read only the hit experts' rows (ops/moe_ffn.py), for few tokens;
- "grouped": Triton grouped GEMM over expert-sorted, block-padded tokens, for more tokens;
- "dense": every expert on every token (a dense FFN's work: cuBLAS for gate+up, one Triton GEMM
  for down), for batches that hit nearly every expert;
- "torch": PyTorch's grouped_mm over expert-sorted tokens (cuBLAS/CUTLASS), shared via cuBLAS;
- "reference": the float32 PyTorch reference (ops/reference.py);
- "auto": the path and tiles of this GPU's tuned table for the shape where there is one
  (`moecarve kernels tune`, tuning.py); else decode while the batch is expected to leave most
  experts unhit and to hit few of them, else dense (see `auto_path`); falls back to "reference"
  with a one-time warning where Triton cannot run.

Shapes that do not fit raise ValueError; nothing is silently computed on mismatched weights.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ._env import triton_available, triton_interpreting, warn_once
from .ops.configs import DecodeConfig, DenseConfig, GroupedConfig
from .ops.reference import check_expert_ids, check_moe_inputs, moe_ffn_reference_unchecked, shared_hidden
from .tuning import tuned_choice

Path = Literal["auto", "decode", "grouped", "dense", "torch", "reference"]

# "auto" takes the decode kernels for at most DECODE_MAX_TOKENS tokens while the expected fraction of
# routed experts a batch hits, 1 - (1 - K/E)^T for uniform routing, stays below DENSE_HIT_FRACTION
# and the expected number hit stays at most DECODE_MAX_HIT_EXPERTS; otherwise the dense-equivalent
# path. From the H100 runs in results/kernels/ffn_kernels.jsonl (docs/kernels.md): at intermediate
# 11008 decode beat the dense FFN at 8 tokens for S2A2E16 (71% of the experts hit) and lost to it at
# 16 tokens for S2A2E16 (92%) and S1A2E8 (99.5%); for S2A4E32 (30 routed, top-4) it ran at 0.97x the
# dense FFN at 4 tokens (13.1 experts expected hit) and 0.66x at 8 (20.5, 68%; the down kernel makes
# one pass per hit expert, whatever its size). Those 344-row experts then loaded as 2-byte scalars
# (before ops.moe_ffn.vector_align), which inflates that loss; at intermediate 14336 (448 rows,
# aligned) S2A4E32's decode ran at 1.41x the dense FFN at 4 tokens, 0.97x at 8 and 0.76x at 16: a
# crossover between 13 and 20 experts hit. The grouped path lost to the dense FFN by 1.6-2.2x at 256
# tokens. The dense path's own GPU timings are still to be measured.
DECODE_MAX_TOKENS = 64
DENSE_HIT_FRACTION = 0.85
DECODE_MAX_HIT_EXPERTS = 16
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_unsupported_reason(
    x: torch.Tensor, weights: list[torch.Tensor], gates: torch.Tensor | None = None
) -> str | None:
    """Why the Triton kernels cannot run on these tensors (`gates`: the routing weights, checked only
    for autograd), or None when they can."""
    if not triton_available():
        return "triton is not installed"
    dev = x.device
    if dev.type != "cuda" and not (dev.type == "cpu" and triton_interpreting()):
        return f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {dev.type}"
    if any(w.device != dev for w in weights):
        return "hidden_states and the expert weights are on different devices"
    if weights[0].dtype not in _DTYPES or any(w.dtype != weights[0].dtype for w in weights):
        return f"unsupported weight dtype(s) {sorted({str(w.dtype) for w in weights})}; kernels take one of bf16/fp16/fp32"
    if x.dtype != weights[0].dtype:
        return f"hidden_states dtype {x.dtype} differs from the weights' {weights[0].dtype}"
    if not all(w.is_contiguous() for w in weights):
        return "expert weights are not contiguous"
    if dev.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(dev) < (8, 0):
        return "bf16 kernels need compute capability 8.0 or newer"
    if needs_grad(x, gates, *weights):  # gates: a trained router's, even with the experts frozen
        return "the kernels are forward-only (autograd is enabled and a tensor requires grad)"
    return None


def moe_ffn(
    hidden_states: torch.Tensor,  # [T, H]
    topk_indices: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    gate_up_proj: torch.Tensor,  # [E, 2I, H]
    down_proj: torch.Tensor,  # [E, H, I]
    shared_gate_proj: torch.Tensor | None = None,  # [SI, H]
    shared_up_proj: torch.Tensor | None = None,  # [SI, H]
    shared_down_proj: torch.Tensor | None = None,  # [H, SI]
    *,
    path: Path = "auto",
    decode_config=None,
    grouped_config=None,
    dense_config=None,
) -> torch.Tensor:
    """Routed experts weighted by their gates, plus the shared expert, for T tokens; returns [T, H].

    Same result as transformers' Glm4MoeExperts + shared_experts within the dtype's rounding.
    Explicit Triton paths raise RuntimeError where they cannot run; "auto" then warns once and
    uses the reference. Under `torch.compile` a call without explicit tiles is one opaque op
    (`torch.ops.moecarve.moe_ffn`), so the compiler neither traces into the host code and Triton
    nor breaks the graph there.
    """
    shared_parts = (shared_gate_proj, shared_up_proj, shared_down_proj)
    explicit_tiles = any(c is not None for c in (decode_config, grouped_config, dense_config))
    if (
        torch.compiler.is_compiling()
        and not explicit_tiles
        and not needs_grad(hidden_states, topk_weights, gate_up_proj, down_proj, *shared_parts)
    ):
        return torch.ops.moecarve.moe_ffn(
            hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, *shared_parts, path
        )
    return _moe_ffn(
        hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, *shared_parts,
        path, decode_config, grouped_config, dense_config,
    )  # fmt: skip


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd must see the computation (the kernels and the opaque op are forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_call(path, hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, shared_parts):
    """Validate a call before any work (also the opaque op's shape check at trace time); returns the shared weights or None."""
    if path not in get_args(Path):
        raise ValueError(f"unknown path {path!r}; one of {', '.join(get_args(Path))}")
    return check_moe_inputs(hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, shared_parts)


def _check_tiles(path, decode_config, grouped_config, dense_config) -> None:
    """Tiles are of their own path, and given for the path asked for (or for `auto` to use where it
    picks that path): never silently ignored."""
    for name, config, cls in (
        ("decode", decode_config, DecodeConfig), ("grouped", grouped_config, GroupedConfig),
        ("dense", dense_config, DenseConfig),
    ):  # fmt: skip
        if config is None:
            continue
        if not isinstance(config, cls):
            raise ValueError(f"{name}_config must be a {cls.__name__}, got {type(config).__name__}")
        if path not in ("auto", name):
            raise ValueError(f"{name}_config is given, but path {path!r} does not use it")


def _moe_ffn(
    hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj,
    shared_gate_proj, shared_up_proj, shared_down_proj, path, decode_config, grouped_config, dense_config,
) -> torch.Tensor:  # fmt: skip
    """`moe_ffn`'s work, run eagerly (also the body of the opaque op)."""
    shared_parts = (shared_gate_proj, shared_up_proj, shared_down_proj)
    shared = _check_call(
        path, hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, shared_parts
    )
    _check_tiles(path, decode_config, grouped_config, dense_config)
    if topk_indices.device.type == "cpu":  # on a GPU the check would need a host sync (see docs)
        check_expert_ids(topk_indices, gate_up_proj.shape[0])
    args = (hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj)
    if path == "reference" or (path == "torch" and hidden_states.shape[0] == 0):
        return moe_ffn_reference_unchecked(*args, *shared_parts)
    weights = [gate_up_proj, down_proj, *(shared or ())]
    reason = triton_unsupported_reason(hidden_states, weights, topk_weights)
    if path == "torch":
        return moe_ffn_torch_unchecked(*args, shared)
    if reason is not None and path != "auto":
        raise RuntimeError(
            f"moecarve.kernels path {path!r} cannot run: {reason}; use path='auto' or 'reference'"
        )
    if hidden_states.shape[0] == 0:
        return moe_ffn_reference_unchecked(*args, *shared_parts)
    if reason is not None:
        warn_once(reason, f"moecarve.kernels: {reason}; falling back to the PyTorch reference path (slower)")
        return moe_ffn_reference_unchecked(*args, *shared_parts)
    from .ops import moe_ffn as ops  # imports triton: only here, on first use

    x = hidden_states.contiguous()
    if path == "auto":
        tuned = None
        if decode_config is None and grouped_config is None and dense_config is None:
            tuned = tuned_choice(x.device, gate_up_proj, shared_gate_proj, topk_indices.shape[1], x.shape[0])
        if tuned is None:
            path = auto_path(x.shape[0], topk_indices.shape[1], gate_up_proj.shape[0])
        else:  # this GPU's table from `moecarve kernels tune` (tuning.py)
            path, tiles = tuned
            decode_config, grouped_config, dense_config = (
                tiles if path == p else None for p in ("decode", "grouped", "dense")
            )
    kernel, tiles = {
        "decode": (ops.moe_ffn_decode, decode_config),
        "grouped": (ops.moe_ffn_grouped, grouped_config),
        "dense": (ops.moe_ffn_dense, dense_config),
    }[path]
    with on_its_gpu(x):
        return kernel(x, topk_indices, topk_weights, gate_up_proj, down_proj, shared, tiles)


def on_its_gpu(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model placed across GPUs)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op(  # the schema spelled out: string annotations are inferred differently across torch releases
    "moecarve::moe_ffn",
    mutates_args=(),
    schema="(Tensor hidden_states, Tensor topk_indices, Tensor topk_weights, Tensor gate_up_proj, Tensor down_proj, "
    "Tensor? shared_gate_proj, Tensor? shared_up_proj, Tensor? shared_down_proj, str path) -> Tensor",
)
def _moe_ffn_op(
    hidden_states: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared_gate_proj: torch.Tensor | None,
    shared_up_proj: torch.Tensor | None,
    shared_down_proj: torch.Tensor | None,
    path: str,
) -> torch.Tensor:
    """`moe_ffn` as one op for `torch.compile`: its body runs eagerly, dispatch and tables included."""
    return _moe_ffn(
        hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj,
        shared_gate_proj, shared_up_proj, shared_down_proj, path, None, None, None,
    )  # fmt: skip


@_moe_ffn_op.register_fake
def _moe_ffn_op_fake(hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, sg, su, sd, path):
    """The output's shape and dtype, after the same input checks (so bad input fails at trace time)."""
    _check_call(path, hidden_states, topk_indices, topk_weights, gate_up_proj, down_proj, (sg, su, sd))
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def expected_hit_fraction(tokens: int, active: int, experts: int) -> float:
    """The fraction of `experts` a batch of `tokens` with `active` picks each hits under uniform routing."""
    return 1.0 - (1.0 - min(active, experts) / experts) ** tokens


def auto_path(tokens: int, active: int, experts: int) -> str:
    """ "decode" while a batch of `tokens` is expected to leave most experts unhit and to hit few of
    them, else "dense". From the shapes alone (no host sync): the expected fraction of experts hit
    under uniform routing."""
    hit = expected_hit_fraction(tokens, active, experts)
    few = tokens <= DECODE_MAX_TOKENS and hit * experts <= DECODE_MAX_HIT_EXPERTS
    return "decode" if few and hit < DENSE_HIT_FRACTION else "dense"


def moe_ffn_torch(
    x: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """PyTorch grouped_mm over expert-sorted tokens (no Triton); the reference where grouped_mm is missing."""
    check_moe_inputs(x, topk_indices, topk_weights, gate_up_proj, down_proj, shared or (None,) * 3)
    if topk_indices.device.type == "cpu":  # where it falls back to the reference, as that checks them
        check_expert_ids(topk_indices, gate_up_proj.shape[0])
    return moe_ffn_torch_unchecked(x, topk_indices, topk_weights, gate_up_proj, down_proj, shared)


def moe_ffn_torch_unchecked(x, topk_indices, topk_weights, gate_up_proj, down_proj, shared) -> torch.Tensor:
    """`moe_ffn_torch` on inputs `moe_ffn(path="torch")` has already checked (not checked twice)."""
    grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped_mm is None or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        warn_once(
            "torch-path", "moecarve.kernels: torch grouped_mm needs bf16 on CUDA; using the reference path"
        )
        return moe_ffn_reference_unchecked(
            x, topk_indices, topk_weights, gate_up_proj, down_proj, *(shared or (None,) * 3)
        )
    T, K = topk_indices.shape
    E, two_i, _ = gate_up_proj.shape
    flat = topk_indices.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    key, perm = torch.sort(torch.where(valid, flat, E))
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, key, torch.ones_like(key, dtype=torch.int32)
    )
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    tok = perm // K
    gu = grouped_mm(x[tok], gate_up_proj.transpose(1, 2), offs=offs)  # [P, 2I]
    h = F.silu(gu[:, : two_i // 2]) * gu[:, two_i // 2 :]
    y = grouped_mm(h, down_proj.transpose(1, 2), offs=offs).float()  # [P, H]; sentinel rows unwritten
    gate = topk_weights.reshape(-1)[perm].float()[:, None]
    y = torch.where(key[:, None] < E, y * gate, 0.0)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)
    if shared is not None:
        sg, su, sd = shared
        out += F.linear(shared_hidden(x, sg, su), sd).float()
    return out.to(x.dtype)
