"""FFN latency: moecarve kernels vs the dense FFN (cuBLAS) vs transformers' eager and grouped_mm experts.

One command (GPU):  PYTHONPATH=src python benchmarks/ffn_kernels.py
Writes results/kernels/ffn_kernels.{jsonl,csv}: one row per (intermediate, config, batch, impl) with
gpu, versions, median/p10/p90 latency, achieved GB/s, fraction of the bytes ideal and of peak HBM.
`--tune` runs the library's tuner instead (a tile sweep, or each path's built-in tiles with `--quick`;
rows in results/kernels/tune.{jsonl,csv}, `--table-out DIR` also writes the table); `--router` times
the router alone (results/kernels/router.{jsonl,csv}); `--profile` splits the whole block's time into
its kernels' device times (results/kernels/profile.{jsonl,csv}).

Config SxAyEz: z experts of I = intermediate / z neurons, x shared (always on) and y routed
active per token out of z - x routed. Weights and routing are random (speed only); L weight sets
are rotated so that repeated calls do not run from L2.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from moecarve.kernels import enable, moe_ffn, moe_ffn_reference, moe_ffn_torch
from moecarve.kernels._env import triton_interpreting
from moecarve.kernels.benchutil import copy_bandwidth_gbps, env_info, kernel_times, time_fn, write_rows
from moecarve.kernels.tuner import random_routing

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

CONFIGS = ["S2A2E16", "S1A2E8", "S3A3E8", "S2A4E32"]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 256]


def parse_config(name: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"S(\d+)A(\d+)E(\d+)", name)
    if match is None:
        raise SystemExit(f"configuration {name!r}: give SxAyEz, as S2A2E16")
    s, a, n = map(int, match.groups())
    return s, a, n


def config_problem(name: str, intermediates: list[int]) -> str | None:
    """Why configuration `name` cannot be built at these intermediate sizes, before any work."""
    s, a, n = parse_config(name)
    if not 1 <= a <= n - s:
        return f"{name}: {a} active of {n - s} routed experts"
    for inter in intermediates:
        if inter % n or (inter // n) % 8:  # torch's grouped_mm (a baseline) needs 16-byte strides
            return f"{name}: intermediate {inter} does not split into {n} experts of a multiple of 8 neurons"
    return None


def build_moe_block(hidden: int, inter: int, s: int, a: int, n: int, dtype: torch.dtype, device: str):
    """A transformers Glm4MoeMoE block with random weights (the carved layer's exact module)."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = Glm4MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter // n, n_routed_experts=n - s, n_shared_experts=s,
        num_experts_per_tok=a, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=float(a),
        first_k_dense_replace=0, num_mtp_layers=0, partial_rotary_factor=1.0, experts_implementation="eager",
    )  # fmt: skip
    with torch.device(device):
        block = Glm4MoeMoE(cfg).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def dense_ffn(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


class Rotor:
    """Cycles through weight sets and inputs so that back-to-back calls do not hit in L2."""

    def __init__(self, n: int):
        self.i, self.n = 0, n

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def dense_call(rot: Rotor, xs, sets):
    """The dense FFN on the next input and weight set of the rotation."""
    return lambda: dense_ffn(xs[rot()], *sets[rot.i % len(sets)][1])


def block_call(rot: Rotor, xs, sets):
    """The transformers MoE block, as its experts implementation is set, on the next input and set."""

    def call():
        j = rot()
        return sets[j % len(sets)][0](xs[j][None])

    return call


def make_sets(args, inter, s, a, n, dtype):
    """L weight sets (moe block + dense weights) so that one pass over them exceeds the L2 several times."""
    layer_bytes = 3 * args.hidden * inter * dtype.itemsize
    n_sets = max(2, math.ceil(args.flush_bytes / layer_bytes))
    sets = []
    for _ in range(n_sets):
        block = build_moe_block(args.hidden, inter, s, a, n, dtype, args.device)
        dense = [torch.empty(r, c, device=args.device, dtype=dtype).normal_(0, 0.02) for r, c in
                 ((inter, args.hidden), (inter, args.hidden), (args.hidden, inter))]  # fmt: skip
        sets.append((block, dense))
    return sets


def shared_of(block):
    se = block.shared_experts
    return se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight


def each_config(args):
    """(intermediate, config, (s, a, n), weight sets) for each --intermediate and --configs; the
    sets are freed when the next is made."""
    dtype = getattr(torch, args.dtype)
    for inter, name in itertools.product(args.intermediate, args.configs):
        s, a, n = parse_config(name)
        torch.manual_seed(0)
        sets = make_sets(args, inter, s, a, n, dtype)
        yield inter, name, (s, a, n), sets
        sets.clear()
        torch.cuda.empty_cache()


def run_grid(args, env, peak) -> None:
    """Every (intermediate, config, batch, impl); rows are written after each config."""
    dtype = getattr(torch, args.dtype)
    for inter, name, (s, a, n), sets in each_config(args):
        rows = []
        e, i_e = n - s, inter // n
        expert_bytes = 3 * args.hidden * i_e * dtype.itemsize
        for batch in args.batches:
            rot = Rotor(len(sets) * 2)
            xs = [torch.randn(batch, args.hidden, device=args.device, dtype=dtype) for _ in range(rot.n)]
            routes = [random_routing(batch, e, a, args.device) for _ in range(rot.n)]
            hits = sum(torch.unique(r[0]).numel() for r in routes) / len(routes)
            moe_bytes = (hits + s) * expert_bytes + 2 * batch * args.hidden * dtype.itemsize
            dense_bytes = 3 * args.hidden * inter * dtype.itemsize + 2 * batch * args.hidden * dtype.itemsize

            def kernel_call(path, shared_fused=True, rot=rot, xs=xs, routes=routes, sets=sets):
                def call():
                    j = rot()
                    block = sets[j % len(sets)][0]
                    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
                    if path == "torch":
                        return moe_ffn_torch(xs[j], *routes[j], w13, w2, shared_of(block))
                    if shared_fused:
                        return moe_ffn(xs[j], *routes[j], w13, w2, *shared_of(block), path=path)
                    return moe_ffn(xs[j], *routes[j], w13, w2, path=path) + dense_ffn(
                        xs[j], *shared_of(block)
                    )

                return call

            impls = {"dense": dense_call(rot, xs, sets)}
            impls["moecarve"] = kernel_call("auto")
            impls["moecarve_decode"] = kernel_call("decode")
            if batch <= 32:
                impls["moecarve_decode_shared_after"] = kernel_call("decode", shared_fused=False)
            if batch >= 4:
                impls["moecarve_dense"] = kernel_call("dense")
            if batch >= 8:
                impls["moecarve_grouped"] = kernel_call("grouped")
                impls["torch_grouped_mm"] = kernel_call("torch")
            impls["hf_eager_block"] = block_call(rot, xs, sets)  # each set up for its impl below
            impls["hf_grouped_mm_block"] = block_call(rot, xs, sets)
            impls["moecarve_block"] = block_call(rot, xs, sets)
            dense_median = None
            for impl, fn in impls.items():
                if impl.endswith("_block"):
                    kind = impl.removeprefix("hf_").removesuffix("_block")
                    for blk, _ in sets:
                        blk.config._experts_implementation = "grouped_mm" if kind == "grouped_mm" else "eager"
                        if kind == "moecarve":
                            enable(blk)
                    if args.device != "cuda" and kind == "grouped_mm":
                        continue
                rel_err = None
                if not impl.endswith("_block") and impl != "dense":
                    rot.i = -1
                    with torch.no_grad():
                        out = fn()
                    ref = moe_ffn_reference(xs[0], *routes[0], sets[0][0].experts.gate_up_proj,
                                            sets[0][0].experts.down_proj, *shared_of(sets[0][0]))  # fmt: skip
                    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                with torch.no_grad():
                    t = time_fn(fn, graph=not args.no_graph and impl != "hf_eager_block", reps=args.reps)
                if impl.endswith("_block"):
                    from moecarve.kernels import disable

                    for blk, _ in sets:
                        disable(blk)
                if impl == "dense":
                    dense_median = t["median_us"]
                nbytes = dense_bytes if impl == "dense" else moe_bytes
                gbps = nbytes / (t["median_us"] * 1e-6) / 1e9
                speedup = dense_median / t["median_us"]
                ideal = dense_bytes / nbytes
                rows.append({
                    **env, "bench": "ffn", "hidden": args.hidden, "intermediate": inter, "config": name,
                    "shared": s, "active": a, "experts": n, "routed": e, "expert_inter": i_e, "batch": batch,
                    "dtype": args.dtype, "impl": impl, **t, "bytes": nbytes, "hit_experts": hits,
                    "gbps": gbps, "frac_peak_hbm": gbps / peak if peak else None,
                    "speedup_vs_dense": speedup, "ideal_speedup": ideal, "frac_bytes_ideal": speedup / ideal,
                    "rel_err": rel_err,
                })  # fmt: skip
                r = rows[-1]
                print(f"I={inter} {name} B={batch:<3} {impl:<28} {r['median_us']:9.1f} us "
                      f"{gbps:7.0f} GB/s x{speedup:5.2f} ideal x{ideal:4.2f} graph={t['graph']} err={rel_err}",
                      flush=True)  # fmt: skip
        write_rows(rows, args.out / "ffn_kernels")


def run_tune(args, env):
    """Sweep the tiles of the paths in `--paths` at the first intermediate/config with the library's
    tuner (`moecarve kernels tune` runs the same); one row per (path, T, tiles) in tune.{jsonl,csv},
    written as it is measured, so a run cut short keeps what it finished."""
    from moecarve.kernels.tuner import save_table, tune
    from moecarve.kernels.tuning import MoeShape

    inter = args.intermediate[0]
    s, a, n = parse_config(args.configs[0])
    shape = MoeShape(n - s, inter // n, s * (inter // n), args.hidden, a, args.dtype)
    head = {**env, "bench": "tune", "intermediate": inter, "config": args.configs[0], "quick": args.quick}
    batches = list(dict.fromkeys(args.batches))  # once each, in the order given (largest first: cut short)
    table = tune(shape, batches, device=args.device, paths=tuple(args.paths), quick=args.quick, reps=args.reps,
                 flush_bytes=args.flush_bytes, on_row=lambda row: write_rows([{**head, **row}], args.out / "tune"))  # fmt: skip
    if args.table_out:
        made_by = f"benchmarks/ffn_kernels.py --tune {args.configs[0]} {inter}" + " --quick" * args.quick
        print(
            "wrote", save_table(table, shape, args.table_out, torch.device(args.device), made_by), flush=True
        )


def run_router(args, env) -> None:
    """The routing alone, per (config, router weight dtype, batch): the fused router with its
    logits split over H (as `enable` runs it), the same with one program per token (the schedule
    it had before, now two launches), and transformers' Glm4MoeTopkRouter. Router weights in
    float32 (as transformers 5.25 loads a carve) and in the benchmark's dtype (as 5.17 does); the
    score-correction bias stays float32. One CUDA graph holds one call per weight copy, and the
    copies (with their inputs) add up to --flush-bytes, so that each call reads from HBM as in a
    decode step, not from the L2."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    from moecarve.kernels.ops.reference import sigmoid_topk_reference
    from moecarve.kernels.ops.router import router_split, sigmoid_topk

    dtype = getattr(torch, args.dtype)
    for name, wdtype in itertools.product(args.configs, dict.fromkeys([torch.float32, dtype])):
        s, a, n = parse_config(name)
        e = n - s
        cfg = Glm4MoeConfig(hidden_size=args.hidden, n_routed_experts=e, num_experts_per_tok=a, n_group=1,
                            topk_group=1, norm_topk_prob=True, routed_scaling_factor=float(a))  # fmt: skip
        rows = []
        for batch in args.batches:
            nbytes = e * args.hidden * wdtype.itemsize + batch * args.hidden * dtype.itemsize
            n_sets = max(2, math.ceil(args.flush_bytes / nbytes))
            torch.manual_seed(0)
            with torch.device(args.device):
                gates = [Glm4MoeTopkRouter(cfg) for _ in range(n_sets)]
            with torch.no_grad():
                for g in gates:
                    g.weight.data = g.weight.data.normal_(0.0, 0.02).to(wdtype)
                    g.e_score_correction_bias.uniform_(0.0, 0.01)
            rot = Rotor(n_sets)
            xs = [torch.randn(batch, args.hidden, device=args.device, dtype=dtype) for _ in range(n_sets)]

            def fused(split, rot=rot, xs=xs, gates=gates, a=a):
                def call():
                    g = gates[rot()]
                    return sigmoid_topk(
                        xs[rot.i], g.weight, g.e_score_correction_bias, a, True, float(a), split
                    )

                return call

            g0 = gates[0]
            ref = sigmoid_topk_reference(xs[0], g0.weight, g0.e_score_correction_bias, a, True, float(a))
            ref_idx = ref[0]
            impls = {
                "moecarve_router": (fused(None), None),
                "moecarve_router_one_per_token": (fused(1), 1),
                "hf_router": (lambda rot=rot, xs=xs, gates=gates: gates[rot()](xs[rot.i]), None),
            }
            for impl, (fn, split) in impls.items():
                rot.i = -1
                with torch.no_grad():
                    out = fn()
                idx = out[0] if impl != "hf_router" else out[2]
                match = (idx.long().sort(-1).values == ref_idx.sort(-1).values).all(-1).float().mean().item()
                with torch.no_grad():
                    t = time_fn(fn, graph=not args.no_graph, reps=args.reps, inner=n_sets)
                programs = router_split(batch, args.hidden, e, split)[0] if impl != "hf_router" else None
                rows.append({
                    **env, "bench": "router", "hidden": args.hidden, "config": name, "routed": e, "active": a,
                    "batch": batch, "dtype": args.dtype, "router_weight_dtype": str(wdtype).removeprefix("torch."),
                    "impl": impl, "programs_per_token": programs, **t, "calls_per_graph": n_sets, "bytes": nbytes,
                    "gbps": nbytes / (t["median_us"] * 1e-6) / 1e9, "topk_match_frac": match,
                })  # fmt: skip
                print(f"{name} {rows[-1]['router_weight_dtype']} B={batch:<3} {impl:<30} {t['median_us']:8.1f} us "
                      f"split={programs} match={match:.3f}", flush=True)  # fmt: skip
            del gates, xs
            torch.cuda.empty_cache()
        write_rows(rows, args.out / "router")


# The bytes the block's kernels must read per call, by kernel name (see `reads` in run_profile).
KERNEL_READS = {
    "_decode_up_kernel": "gate_up",
    "_decode_down_kernel": "down",
    "_dense_down_kernel": "dense_down",
    "_router_logits_kernel": "router",
}


def run_profile(args, env, peak) -> None:
    """Where a block's time goes, per (config, batch): each kernel's device time per call (torch
    profiler, eager calls, weights rotated so that every call reads HBM) beside the call's CUDA-graph
    time, for the whole block after `enable` (router, experts, glue) and for the dense FFN. The graph
    time less the kernels' sum is what launches and gaps cost; the up and down kernels' GB/s say which
    of them is short of the bandwidth (the batch-1 gap to the bytes ideal was never split before)."""
    from moecarve.kernels.ops.reference import sigmoid_topk_reference

    dtype = getattr(torch, args.dtype)
    for inter, name, (s, a, n), sets in each_config(args):
        rows = []
        e, i_e = n - s, inter // n
        for block, _ in sets:
            enable(block)
        for batch in args.batches:
            rot = Rotor(len(sets) * 2)
            xs = [torch.randn(batch, args.hidden, device=args.device, dtype=dtype) for _ in range(rot.n)]
            gates = [sets[j % len(sets)][0].gate for j in range(rot.n)]
            hits = sum(
                torch.unique(sigmoid_topk_reference(x, g.weight, g.e_score_correction_bias, a, True, float(a))[0]).numel()
                for x, g in zip(xs, gates, strict=True)
            ) / rot.n  # fmt: skip
            x_bytes = batch * args.hidden * dtype.itemsize
            third = args.hidden * i_e * dtype.itemsize  # one expert's gate, up or down matrix
            act = batch * i_e * dtype.itemsize  # one expert's activations for the batch
            reads = {  # weights of the hit and shared experts, and the activations each kernel reads
                "gate_up": (hits + s) * 2 * third + x_bytes,
                "down": (hits + s) * third + (a + s) * act,
                "dense_down": (hits + s) * third + 2 * (a + s) * act,  # gate and up of each pick
                "router": e * args.hidden * gates[0].weight.element_size() + x_bytes,
            }
            impls = {"moecarve_block": block_call(rot, xs, sets), "dense": dense_call(rot, xs, sets)}
            for impl, fn in impls.items():
                with torch.no_grad():
                    graph = time_fn(fn, graph=not args.no_graph, reps=args.reps)
                    kernels = kernel_times(fn, calls=2 * rot.n)
                total = sum(us for _, us in kernels.values())
                for kernel, (launches, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                    nbytes = reads.get(KERNEL_READS.get(kernel)) if impl == "moecarve_block" else None
                    gbps = nbytes / (us * 1e-6) / 1e9 if nbytes and us > 0 else None
                    rows.append({
                        **env, "bench": "profile", "hidden": args.hidden, "intermediate": inter, "config": name,
                        "shared": s, "active": a, "experts": n, "routed": e, "expert_inter": i_e, "batch": batch,
                        "dtype": args.dtype, "hit_experts": hits, "impl": impl, "kernel": kernel,
                        "launches_per_call": launches, "device_us": us, "bytes": nbytes, "gbps": gbps,
                        "frac_peak_hbm": gbps / peak if gbps and peak else None, "kernels_total_us": total,
                        "call_median_us": graph["median_us"], "graph": graph["graph"],
                    })  # fmt: skip
                    print(f"I={inter} {name} B={batch:<3} {impl:<15} {kernel[:60]:<60} x{launches:<4.1f} "
                          f"{us:8.1f} us" + (f" {gbps:6.0f} GB/s" if gbps else ""), flush=True)  # fmt: skip
                print(f"I={inter} {name} B={batch:<3} {impl:<15} kernels {total:.1f} us, call {graph['median_us']:.1f} us "
                      f"(graph={graph['graph']})", flush=True)  # fmt: skip
        write_rows(rows, args.out / "profile")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, nargs="+", default=[11008, 14336])
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--flush-bytes", type=float, default=200e6, help="weight bytes rotated through per pass")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--quick", action="store_true", help="--tune: each path's built-in tiles only")
    p.add_argument(
        "--table-out", type=Path, help="--tune: also write the tuned table (as `moecarve kernels tune`)"
    )
    p.add_argument("--router", action="store_true", help="time the router alone (router.jsonl)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="each kernel's device time in the block and the dense FFN (profile.jsonl)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        default=["decode", "grouped", "dense"],
        choices=["decode", "grouped", "dense"],
        help="the paths --tune sweeps",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "kernels")
    p.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"],
        help="cpu: a smoke run under Triton's interpreter (TRITON_INTERPRET=1); its timings mean nothing",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ffn_kernels.py needs a CUDA GPU (--device cpu only checks that it runs)")
    if args.device == "cpu" and args.out.resolve() == (RESULTS / "kernels").resolve():
        p.error("--device cpu times nothing worth keeping: give an --out outside results/kernels")
    if args.device == "cpu" and not triton_interpreting():
        p.error("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    for name in args.configs:
        if problem := config_problem(name, args.intermediate):
            p.error(problem)
    env = env_info()
    env["copy_gbps"] = copy_bandwidth_gbps() if args.device == "cuda" else None
    peak = env["spec_hbm_gbps"]
    print(env, flush=True)
    if args.tune:
        run_tune(args, env)
    elif args.router:
        run_router(args, env)
    elif args.profile:
        run_profile(args, env, peak)
    else:
        run_grid(args, env, peak)


if __name__ == "__main__":
    main()
