"""Every eval figure of docs/eval.md: the bundled SmolLM2-135M (dense) against one carve of it.

    carve bundled --experts 8 --active 2 --out /tmp/eval-s1a2e8     # once, ~3-10 min on 2 cores
    python benchmarks/eval_bundled.py --carved /tmp/eval-s1a2e8 [--limit 100] [--only ppl,tasks,...]

Writes results/eval/{ppl,tasks-dense,tasks-<config>,load-<config>,speed-cpu}.json through the
library functions behind `moecarve eval ...`, then `moecarve eval report results/eval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moecarve.eval.common import describe_model, resolve_model
from moecarve.eval.load import evaluate_load
from moecarve.eval.ppl import evaluate_ppl
from moecarve.eval.report import render_report
from moecarve.eval.speed import evaluate_speed
from moecarve.eval.tasks import DEFAULT_TASKS, evaluate_tasks

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

STEPS = ("ppl", "tasks", "load", "speed", "report")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--carved", required=True, help="a carve of the bundled model")
    parser.add_argument("--limit", type=int, default=100, help="questions per task")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--out", default=str(RESULTS / "eval"))
    parser.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    args = parser.parse_args()
    steps = set(args.only.split(","))
    if unknown := sorted(steps - set(STEPS)):
        parser.error(f"--only {unknown[0]}: the steps are {','.join(STEPS)}")
    out = Path(args.out)
    dense, carved = resolve_model("bundled"), resolve_model(args.carved)
    name = describe_model(carved)["name"]

    if "ppl" in steps:
        evaluate_ppl([dense, carved], out=out / "ppl.json")
    if "tasks" in steps:
        for model, label in ((dense, "dense"), (carved, name)):
            evaluate_tasks(model, args.tasks, limit=args.limit, device="cpu", out=out / f"tasks-{label}.json")
    if "load" in steps:
        evaluate_load(carved, device="cpu", out=out / f"load-{name}.json")
    if "speed" in steps:
        evaluate_speed(carved, dense, (1, 2, 4, 8), device="cpu", out=out / "speed-cpu.json")
    if "report" in steps:
        for path in render_report(out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
