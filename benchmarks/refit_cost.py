"""What the down-projection refit costs on one large layer: seconds and peak memory.

A random 7B-shaped FFN layer (hidden 4096, 11,008 neurons) at S1A2E8 with the default 16,384
calibration tokens: the refit is the step whose cost grows fastest with the layer (an [I, I]
float64 system per layer). Random activations and routing: only the cost is measured here.

    python benchmarks/refit_cost.py            # -> results/carve/refit_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--neurons", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--active", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "carve/refit_cost.json"))
    args = parser.parse_args()
    if args.experts < 2 or not 1 <= args.active < args.experts:  # one shared expert, the rest routed
        parser.error(
            f"--active {args.active} of --experts {args.experts}: give 2+ experts, 1 to experts - 1 active"
        )
    if args.neurons % args.experts:
        parser.error(f"--neurons {args.neurons} does not split into {args.experts} experts")
    torch.set_num_threads(2)
    from moecarve.carve.layer import CarvedFFN, kept_activations, refit_down, refit_ridge
    from moecarve.eval.common import machine, peak_rss_gib, source_commit

    torch.manual_seed(0)
    m, routed = args.neurons // args.experts, args.experts - 1
    order = torch.randperm(args.neurons)
    shared, experts = order[:m].sort().values, order[m : m * args.experts].view(routed, m)
    top = torch.rand(args.tokens, routed).topk(args.active, 1).indices
    gates = torch.zeros(args.tokens, routed).scatter_(1, top, 1.0)
    w_down = torch.randn(args.hidden, args.neurons) / args.neurons**0.5
    carved = CarvedFFN(None, None, w_down, shared, experts, None, None, args.active, {})
    blocks = torch.randn(args.tokens, args.neurons)  # random activations, already in block order
    kept = kept_activations(blocks, gates, carved)
    del blocks
    target = torch.randn(args.tokens, args.hidden)
    ridge = refit_ridge("auto", args.neurons, args.tokens)
    before = peak_rss_gib()
    started = time.perf_counter()
    refit_down(kept, gates, carved, target, ridge, w_down)
    seconds = time.perf_counter() - started
    peak = peak_rss_gib()
    report = {
        "benchmark": "refit_cost",
        "shape": {k: getattr(args, k) for k in ("hidden", "neurons", "tokens", "experts", "active")},
        "ridge": ridge,
        "refit_seconds": round(seconds, 1),
        "peak_rss_gib_before_refit": round(before, 2),
        "peak_rss_gib": round(peak, 2),
        "machine": machine(),
        "commit": source_commit(),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
