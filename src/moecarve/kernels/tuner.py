"""Time the kernels' paths and tiles for one MoE shape on this GPU and write the fastest per batch.

What `moecarve kernels tune` and `benchmarks/ffn_kernels.py --tune` run. Weights and routing are
random (speed only; uniform routing, as the built-in dispatch assumes); enough weight copies are
rotated through that each call reads them from HBM, not L2, and each call is timed as CUDA graph
replays. Every candidate's output is first checked against the float32 reference: tiles that give
a wrong answer or do not compile are skipped, never chosen.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from moecarve.carve.writer import write_atomically
from moecarve.isolation import kept_random_state

from .benchutil import time_fn
from .functional import DECODE_MAX_TOKENS, expected_hit_fraction, moe_ffn
from .ops.configs import DecodeConfig, DenseConfig, GroupedConfig, decode_config
from .ops.reference import moe_ffn_reference
from .tuning import FORMAT, MoeShape, clear_cache, device_dir_name, device_name, runtime_versions

PATHS = ("decode", "dense", "grouped")
TOLERANCE = {"float32": 1e-4, "bfloat16": 1.5e-2, "float16": 1.5e-2}  # relative error vs the reference
DENSE_MIN_HIT = 0.5  # the dense path reads every expert: tried only where a batch is expected to hit half


def candidates(path: str, tokens: int, quick: bool, best_up: DecodeConfig | None = None) -> Iterator:
    """Tiles to try. Decode goes in two rounds: the up kernel's tiles, then the down kernel's with
    the best up tiles kept (`best_up`). quick: the built-in tiles only (the path crossover)."""
    if path == "decode":
        if quick:
            yield decode_config(tokens)
        elif best_up is None:
            # 512 columns of H: fewer rows with as many weight bytes a pipeline stage (see docs/kernels.md)
            tiles = [*itertools.product([16, 32, 64], [128, 256]), (16, 512), (32, 512)]
            for (bi, bh), w in itertools.product(tiles, [4, 8]):
                yield DecodeConfig(block_i=bi, block_h=bh, warps_up=w)
        else:
            for bn, bk, w in itertools.product([16, 32], [128, 256], [4, 8]):
                yield dataclasses.replace(best_up, block_n=bn, block_k=bk, warps_down=w)
    elif path == "dense":
        if quick:
            yield DenseConfig()
            return
        # 32 outputs a program: at 16-64 tokens (one token tile) 128 programs where 64 leave SMs idle
        for bm, bn, bk, w in itertools.product([32, 64], [32, 64, 128], [64, 128], [4, 8]):
            yield DenseConfig(block_m=bm, block_n=bn, block_k=bk, warps=w)
    else:
        if quick:
            yield GroupedConfig()
            return
        for bm, bn, w in itertools.product([32, 64], [64, 128], [4, 8]):
            yield GroupedConfig(block_m=bm, block_n=bn, block_k=64, warps=w)


def paths_for(shape: MoeShape, tokens: int, paths: tuple[str, ...]) -> list[str]:
    """The paths worth timing at this batch: decode up to its token limit, dense once half the experts
    are expected to be hit, grouped from 64 tokens on."""
    keep = {
        "decode": tokens <= DECODE_MAX_TOKENS,
        "dense": expected_hit_fraction(tokens, shape.top_k, shape.experts) >= DENSE_MIN_HIT,
        "grouped": tokens >= 64,
    }
    return [p for p in PATHS if p in paths and keep[p]]


class _Weights:
    """Random weight copies of one MoE layer and of the dense FFN it stands for, rotated per call."""

    def __init__(self, shape: MoeShape, device: str, flush_bytes: float):
        dt, h, si = getattr(torch, shape.dtype), shape.hidden, shape.shared_intermediate
        e_i = shape.experts * shape.intermediate
        self.n = max(2, math.ceil(flush_bytes / (3 * h * (e_i + si) * dt.itemsize)))
        self.moe, self.dense = [], []

        def rand(*size):
            return torch.empty(*size, device=device, dtype=dt).normal_(0.0, 0.02)

        for _ in range(self.n):
            shared = (rand(si, h), rand(si, h), rand(h, si)) if si else ()
            self.moe.append(
                (
                    rand(shape.experts, 2 * shape.intermediate, h),
                    rand(shape.experts, h, shape.intermediate),
                    *shared,
                )
            )
            self.dense.append((rand(e_i + si, h), rand(e_i + si, h), rand(h, e_i + si)))


def _inputs(
    shape: MoeShape, tokens: int, device: str
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Random hidden states and a `random_routing` for them."""
    x = torch.randn(tokens, shape.hidden, device=device, dtype=getattr(torch, shape.dtype))
    return x, random_routing(tokens, shape.experts, shape.top_k, device)


def random_routing(tokens: int, experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_indices, topk_weights) of uniform random routing: distinct experts, gates summing to K
    (what the built-in dispatch assumes)."""
    idx = torch.rand(tokens, experts, device=device).topk(top_k, dim=-1).indices
    w = torch.rand(tokens, top_k, device=device)
    return idx, w / w.sum(-1, keepdim=True) * top_k


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def relative_error(shape: MoeShape, moe_weights, path: str, cfg, tokens: int, device: str) -> float:
    """`path` with tiles `cfg` against the float32 reference on fresh inputs of `tokens` tokens."""
    x, route = _inputs(shape, tokens, device)
    with torch.no_grad():
        ref = moe_ffn_reference(x, *route, *moe_weights).float()
        return _relative_error(moe_ffn(x, *route, *moe_weights, path=path, **{f"{path}_config": cfg}), ref)


def served_counts(previous: int, tokens: int) -> list[int]:
    """Token counts besides `tokens` that a table entry for `tokens` serves (`auto` takes the smallest
    tuned batch at or above a call's count), where its tiles are checked too: the range's first
    count, its middle, and each count just above a power of two (where the kernels' token tiles
    change)."""
    inside = {2**k + 1 for k in range(tokens.bit_length())} & set(range(previous + 1, tokens))
    return sorted(({previous + 1, (previous + 1 + tokens) // 2} | inside) - {tokens})


class _Batch:
    """One batch size's inputs and routings, rotated with the weights so no call runs from L2."""

    def __init__(self, weights: _Weights, shape: MoeShape, tokens: int, device: str, reps: int):
        self.weights, self.tokens, self.reps, self.shape = weights, tokens, reps, shape
        self.n = 2 * weights.n
        self.xs, self.routes = map(
            list, zip(*(_inputs(shape, tokens, device) for _ in range(self.n)), strict=True)
        )
        self.ref = moe_ffn_reference(self.xs[0], *self.routes[0], *weights.moe[0]).float()
        self.step = itertools.count()

    def _time(self, fn: Callable[[int], object]) -> dict:
        # one graph holds a call per input/weight copy, so replays never rerun a copy from L2
        with torch.no_grad():
            return time_fn(lambda: fn(next(self.step) % self.n), reps=self.reps, inner=max(10, self.n))

    def dense_ffn_us(self) -> float:
        def dense(j):
            g, u, d = self.weights.dense[j % self.weights.n]
            return F.linear(F.silu(F.linear(self.xs[j], g)) * F.linear(self.xs[j], u), d)

        return self._time(dense)["median_us"]

    def kernel_us(self, path: str, cfg, log: Callable[[str], None]) -> dict | None:
        """Timing of `path` with tiles `cfg`, or None (logged) where it fails or is wrong."""

        def call(j):
            return moe_ffn(
                self.xs[j],
                *self.routes[j],
                *self.weights.moe[j % self.weights.n],
                path=path,
                **{f"{path}_config": cfg},
            )

        try:
            with torch.no_grad():
                err = _relative_error(call(0), self.ref)
            if not err < TOLERANCE[self.shape.dtype]:
                log(f"skip {path} B={self.tokens} {cfg}: relative error {err:.2e}")
                return None
            t = self._time(call)
            if self.ref.is_cuda and not t["graph"]:  # what `auto` must allow: capture in a CUDA graph
                log(f"skip {path} B={self.tokens} {cfg}: cannot be captured in a CUDA graph")
                return None
            return t
        except Exception as exc:  # tiles that do not compile (shared memory, registers) are skipped
            log(f"skip {path} B={self.tokens} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            return None


@kept_random_state()
def tune(
    shape: MoeShape,
    batches: list[int],
    *,
    device: str = "cuda",
    paths: tuple[str, ...] = PATHS,
    quick: bool = False,
    reps: int = 20,
    flush_bytes: float = 200e6,
    on_row: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[int, dict]:
    """{batch: {"path", "config", "median_us", "dense_ffn_us"}}: the fastest checked candidate per
    batch, with the dense FFN's time at that batch. `on_row` gets every timing (with its tiles)."""
    untimed = [b for b in batches if not paths_for(shape, b, paths)]
    if untimed:
        raise ValueError(f"none of the paths {list(paths)} is timed at batch {untimed[0]} (see paths_for)")
    torch.manual_seed(0)
    weights = _Weights(shape, device, flush_bytes)
    table = {}
    for tokens in batches:
        previous = max((other for other in batches if other < tokens), default=0)  # served by the entry below
        batch = _Batch(weights, shape, tokens, device, reps)
        dense_us = batch.dense_ffn_us()
        timed = []  # (median µs, path, tiles) of every candidate that ran correctly

        def time_all(path, configs, batch=batch, dense_us=dense_us, timed=timed):
            """Time each candidate that runs correctly (into `timed`); the fastest's tiles, or None."""
            best_us, best_cfg = math.inf, None
            for cfg in configs:
                t = batch.kernel_us(path, cfg, log)
                if t is None:
                    continue
                if on_row is not None:
                    on_row(
                        {
                            "batch": batch.tokens,
                            "path": path,
                            **dataclasses.asdict(cfg),
                            **t,
                            "dense_ffn_us": dense_us,
                        }
                    )
                log(f"B={batch.tokens:<4} {path:<7} {cfg} {t['median_us']:.1f} us (dense FFN {dense_us:.1f})")
                timed.append((t["median_us"], path, cfg))
                if t["median_us"] < best_us:
                    best_us, best_cfg = t["median_us"], cfg
            return best_cfg

        for path in paths_for(shape, tokens, paths):
            best_up = time_all(path, candidates(path, tokens, quick))
            if (
                path == "decode" and not quick and best_up is not None
            ):  # second round: the down kernel's tiles
                time_all(path, candidates(path, tokens, quick, best_up=best_up))
        best = _fastest_correct_over_range(timed, shape, weights.moe[0], previous, tokens, device, log)
        if best is None:
            raise RuntimeError(
                f"no kernel path ran correctly at batch {tokens} and the counts its entry serves "
                f"{served_counts(previous, tokens)} for {shape}; see the skips above"
            )
        table[tokens] = {
            "path": best[1], "config": dataclasses.asdict(best[2]), "median_us": best[0], "dense_ffn_us": dense_us
        }  # fmt: skip
        log(f"BEST B={tokens}: {best[1]} {best[2]} {best[0]:.1f} us, x{dense_us / best[0]:.2f} the dense FFN")
    return table


def _fastest_correct_over_range(timed, shape, moe_weights, previous, tokens, device, log):
    """The fastest timed candidate that also runs right at the other token counts its entry serves."""
    for us, path, cfg in sorted(timed, key=lambda c: c[0]):
        if all(
            _right_at(shape, moe_weights, path, cfg, t, device, log) for t in served_counts(previous, tokens)
        ):
            return us, path, cfg
    return None


def _right_at(shape, moe_weights, path, cfg, tokens, device, log) -> bool:
    """Whether the tiles give the reference's answer at `tokens` (failing to run counts as wrong)."""
    try:
        err = relative_error(shape, moe_weights, path, cfg, tokens, device)
    except Exception as exc:  # a token tile of its own may not compile where the timed one did
        log(f"skip {path} {cfg}: {type(exc).__name__} at {tokens} tokens: {str(exc)[:120]}")
        return False
    if not err < TOLERANCE[shape.dtype]:
        log(f"skip {path} {cfg}: relative error {err:.2e} at {tokens} tokens, which its entry also serves")
        return False
    return True


def save_table(
    table: dict[int, dict], shape: MoeShape, out_dir: Path, device: torch.device, made_by: str
) -> Path:
    """Write the table where `load_table` finds it, atomically (no half-written file on failure)."""
    name = device_name(device)
    path = Path(out_dir) / device_dir_name(name) / shape.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT, "device": name, "shape": dataclasses.asdict(shape), "made_by": made_by,
        "versions": runtime_versions(),
        "batches": {str(b): e for b, e in sorted(table.items())},
    }  # fmt: skip
    write_atomically(path, json.dumps(data, indent=1))
    clear_cache()
    return path


def model_shapes(model: str, dtype: str | None = None) -> list[MoeShape]:
    """The distinct shapes of MODEL's MoE blocks that `enable` runs, from its config alone (a local
    directory or a hub ID), in `dtype` (default: the config's if bf16/fp16, else bf16); ValueError
    for a model without such blocks."""
    from transformers import AutoConfig

    from ..moe import meta_model
    from ..resources import refuse_bundled
    from .integration import unsupported_block_reason

    refuse_bundled(model, "kernels tune")
    local = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if (local.exists() or looks_local) and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no model at {local} (config.json missing)")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else model)
    except OSError as err:  # the hub unreachable, or no such repository
        if local.exists():
            raise
        raise FileNotFoundError(
            f"model not found: {model} is no local directory, and the Hugging Face hub gave no config for it ({err})"
        ) from None
    if dtype is None:
        dtype = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
        dtype = dtype if dtype in ("bfloat16", "float16") else "bfloat16"
    skeleton = meta_model(config)
    shapes = []
    for module in skeleton.modules():
        if unsupported_block_reason(module) is not None:
            continue
        top_k = getattr(module.gate, "top_k", None)
        top_k = top_k if isinstance(top_k, int) else getattr(config, "num_experts_per_tok", None)
        if isinstance(top_k, int):
            se = getattr(module, "shared_experts", None)
            shape = MoeShape.of_tensors(module.experts.gate_up_proj, None if se is None else se.gate_proj.weight,
                                        top_k)  # fmt: skip
            shapes.append(dataclasses.replace(shape, dtype=dtype))
    if not shapes:
        raise ValueError(
            f"{model}: no MoE block the kernels run (a router `gate` with `top_k` and fused `experts`, as in "
            "a carve's glm4_moe); nothing to tune"
        )
    return list(dict.fromkeys(shapes))


def check_device(device: str, dtype: str) -> torch.device:
    """Refuse, before any work, a device the tuner cannot time on: the kernels' own support check."""
    from moecarve.devices import DeviceError, parse_device

    from .functional import triton_unsupported_reason

    try:
        dev = parse_device(device, "kernels tune")
    except DeviceError as err:
        raise ValueError(f"{err} (a CUDA GPU to time on, or cpu to check the command)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this machine has no CUDA GPU, which tuning times the kernels on "
            "(--device cpu only checks the command)"
        )
    probe = torch.empty(1, device=dev, dtype=getattr(torch, dtype))
    reason = triton_unsupported_reason(probe, [probe])
    if reason is not None:
        raise ValueError(f"cannot tune on {device}: {reason} (--device cpu only checks the command)")
    return dev
