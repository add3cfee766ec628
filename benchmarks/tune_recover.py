r"""Recovery fine-tune of bundled-model carves: protocol PPL before/after and the curve in between.

Training text is the BoolQ passage stream without its last 16 x 2048 tokens (the protocol's
evaluation windows). Curve points use the last `--curve-windows` protocol windows (cheap); the
start and end use all 16. Training seconds exclude the time spent on curve evaluations.

    python benchmarks/tune_recover.py --carved S1A2E8=DIR --modes router,lora --steps 100
    python benchmarks/tune_recover.py --table results/tune/recover.json
    python benchmarks/tune_recover.py --carved S1A2E8=DIR --steps 20 --lr 5e-4 --warmup 2 \
        --compute fp32,bf16,fp32+checkpointing,bf16+checkpointing --out results/tune/compute.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from moecarve.eval.common import peak_rss_gib, source_commit
from moecarve.eval.ppl import evaluation_windows, perplexity, protocol_ppl
from moecarve.eval.tasks import evaluate_tasks
from moecarve.tune.recover import RecoverConfig, recover
from moecarve.tune.trainer import result_settings

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

DENSE_PPL = 18.206  # results/carve/bundled.json: the bundled model on the protocol


class CurveCallback(TrainerCallback):
    """Protocol-window PPL of the model being trained, every `every` steps, timed apart."""

    def __init__(self, windows: torch.Tensor, every: int):
        self.windows, self.every = windows, every
        self.points: list[dict] = []
        self.eval_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            started = time.perf_counter()
            model.eval()
            ppl = perplexity(model, self.windows, progress=False)["ppl"]
            model.train()
            self.eval_seconds += time.perf_counter() - started
            self.points.append({"step": state.global_step, "ppl": ppl})


def run(
    name: str, carved: Path, mode: str, compute: str, args, windows: torch.Tensor, tasks_before: dict | None
) -> dict:
    config = RecoverConfig(
        steps=args.steps,
        train=mode,
        **({} if args.lr is None else {"lr": args.lr}),  # full has no default: refused without one
        router_lr=args.router_lr,
        bias_rate=args.bias_rate,
        batch_size=args.batch_size,
        length=args.length,
        warmup=args.warmup,
        save_every=args.steps,
        distill=args.distill,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        precision=compute.removesuffix("+checkpointing"),
        gradient_checkpointing=compute.endswith("+checkpointing"),
    )
    curve = CurveCallback(windows, args.eval_every)
    carve_record = json.loads((carved / "carve.json").read_text())
    before = carve_record.get("quality", {}).get("protocol_ppl", {})
    before = before.get("carved") or protocol_ppl(carved)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        reset_peak_rss()
        resident = peak_rss_gib()  # where the peak starts from
        started = time.perf_counter()
        result = recover(carved, config, None, Path(work) / "out", callbacks=(curve,))
        seconds = time.perf_counter() - started - curve.eval_seconds
        peak = peak_rss_gib()  # loading, training and writing the recovery (and its curve points)
        start = perplexity(_load(carved), windows, progress=False)["ppl"]
        end = perplexity(result.model.float().eval(), windows, progress=False)["ppl"]
        after = protocol_ppl(result.out)
        tasks_after = task_accuracy(result.out, args) if args.tasks else None
    tokens = result.record["data"]["tokens"]
    gap_closed = (math.log(before["ppl"]) - math.log(after["ppl"])) / (
        math.log(before["ppl"]) - math.log(DENSE_PPL)
    )
    return {
        "config": name,
        "mode": mode,
        "distill": args.distill,
        "steps": args.steps,
        "train_tokens": tokens,
        "trainable_parameters": result.record["trainable_parameters"],
        "protocol_ppl_before": before["ppl"],
        "protocol_ppl_after": after["ppl"],
        "dense_ppl": DENSE_PPL,
        "gap_closed": gap_closed,  # of log PPL, carved -> dense
        "train_seconds": round(seconds, 1),
        "compute": compute,
        "recover_peak_rss_gib": round(peak, 2),
        "resident_before_gib": round(resident, 2),
        "curve_windows": windows.shape[0],
        "curve": [{"step": 0, "ppl": start}, *curve.points, {"step": args.steps, "ppl": end}],
        "train_loss": result.record["train_loss"],
        "recover_config": result.record["config"],
        "carve": {
            key: carve_record[key] for key in ("config", "calibration", "versions") if key in carve_record
        },
        **(
            {"tasks": {"limit": args.task_limit, "before": tasks_before, "after": tasks_after}}
            if args.tasks
            else {}
        ),
    }


def compute_table(paths: list[str]) -> str:
    """Runs that differ in precision and gradient checkpointing: quality, time and memory side by side."""
    lines = [
        "| carve | trained | steps | compute | PPL before | PPL after | train s | peak RSS GiB | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            lines.append(
                f"| {r['config']} | {r['mode']} | {r['steps']} | {r.get('compute', 'fp32')} | "
                f"{r['protocol_ppl_before']:.2f} | {r['protocol_ppl_after']:.2f} | {r['train_seconds']:.0f} | "
                f"{r.get('recover_peak_rss_gib', '-')} | {r['commit']} |"
            )
    return "\n".join(lines)


def reset_peak_rss() -> None:
    """Linux: start this process's peak resident memory (VmHWM) afresh, so it measures what follows,
    after handing back what earlier runs freed (glibc keeps freed heap resident; the peak would
    start from there)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def task_accuracy(model: Path, args) -> dict:
    """lm-eval zero-shot acc / acc_norm (`moecarve eval tasks`) on the first --task-limit questions."""
    record = evaluate_tasks(model, args.tasks, limit=args.task_limit, batch_size=8)
    return {
        name: {k: v for k, v in metrics.items() if k in ("acc", "acc_norm", "acc_stderr", "questions")}
        for name, metrics in record["tasks"].items()
    }


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def table(paths: list[str]) -> str:
    """The docs table; the gap is carved - dense PPL (as the issue states it), and in log PPL."""
    lines = [
        "| carve | trained | distill | steps | tokens | PPL before | PPL after | dense | gap closed | "
        "gap closed (log) | train s | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            before, after, dense = r["protocol_ppl_before"], r["protocol_ppl_after"], r["dense_ppl"]
            config = r.get("recover_config", {})
            rank = config.get("lora_rank", 8)  # runs that did not record it used rank 8, alpha 32
            alpha = config.get("lora_alpha", 32.0)
            trained = r["mode"] + (f" (LoRA r {rank}, alpha {alpha:g})" if "lora" in r["mode"] else "")
            lines.append(
                f"| {r['config']} | {trained} | {r.get('distill') or 0:g} | {r['steps']} | "
                f"{r['train_tokens']:,} | {before:.2f} | {after:.2f} | {dense:.2f} | "
                f"{(before - after) / (before - dense):.0%} | {r['gap_closed']:.0%} | {r['train_seconds']:.0f} | "
                f"{r['commit']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--carved", action="append", default=[], help="NAME=DIR of a bundled-model carve")
    parser.add_argument("--modes", default="router,lora", help="';'-separated --train values")
    defaults = RecoverConfig.model_fields  # `tune recover`'s own defaults
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="LoRA's (or full's) [default: tune recover's]")
    parser.add_argument("--router-lr", type=float, default=defaults["router_lr"].default)
    parser.add_argument("--bias-rate", type=float, default=defaults["bias_rate"].default)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    parser.add_argument("--length", type=int, default=defaults["length"].default)
    parser.add_argument("--warmup", type=int, default=defaults["warmup"].default)
    parser.add_argument("--distill", type=float, default=0.0, help="weight of KL to the dense source")
    parser.add_argument("--lora-rank", type=int, default=defaults["lora_rank"].default)
    parser.add_argument("--lora-alpha", type=float, default=defaults["lora_alpha"].default)
    parser.add_argument(
        "--compute",
        default="fp32",
        help="','-separated PRECISION[+checkpointing] (fp32, bf16), each run in turn, e.g. fp32,bf16,fp32+checkpointing",
    )
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--curve-windows", type=int, default=4)
    parser.add_argument(
        "--tasks",
        default="",
        help="zero-shot tasks before/after, e.g. arc_easy,piqa (not boolq: the training text is its passages)",
    )
    parser.add_argument("--task-limit", type=int, default=200, help="questions per task")
    parser.add_argument("--work", default=None, help="scratch directory for the recovered models")
    parser.add_argument("--out", default=str(RESULTS / "tune/recover.json"))
    parser.add_argument("--table", nargs="*", help="print the docs table of these results files")
    parser.add_argument(
        "--compute-table", nargs="*", help="print the precision / checkpointing table of these files"
    )
    args = parser.parse_args()
    if args.table is not None or args.compute_table is not None:
        files = args.table if args.table is not None else args.compute_table
        if not files:
            parser.error("--table and --compute-table need results files")
        print(table(files) if args.table is not None else compute_table(files))
        return
    if not args.carved:
        parser.error("give --carved NAME=DIR (a carve of the bundled model), or --table FILE ...")
    if bad := [item for item in args.carved if "=" not in item]:
        parser.error(f"--carved {bad[0]}: give NAME=DIR, as S1A2E8=smollm2-S1A2E8")
    for compute in args.compute.split(","):  # refused before any run
        RecoverConfig(steps=1, precision=compute.removesuffix("+checkpointing"))
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    machine = _machine()  # at the start: the code that runs, not what is checked out when it ends
    for item in args.carved:
        name, directory = item.split("=", 1)
        carved = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(carved)
        windows = evaluation_windows(tokenizer)[-args.curve_windows :]
        tasks_before = task_accuracy(carved, args) if args.tasks else None
        for mode, compute in itertools.product(args.modes.split(";"), args.compute.split(",")):
            result = run(name, carved, mode, compute, args, windows, tasks_before)
            result["commit"] = machine["commit"]
            runs = [r for r in runs if not _same_setting(r, result)]
            runs.append(result)
            out.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k not in ("train_loss", "curve")}))


def _same_setting(old: dict, new: dict) -> bool:
    """A rerun of the same setting (every recovery setting that decides a result, defaults filled in
    for rows recorded before a setting existed, and the same carve where both rows record it)
    replaces its row; other settings add rows."""
    fields = RecoverConfig.model_fields

    def settings(run):
        defaults = {name: field.default for name, field in fields.items() if not field.is_required()}
        return json.dumps(
            result_settings({**defaults, **run.get("recover_config", {})}), sort_keys=True, default=list
        )

    def head(run):
        return run["config"], run["mode"], run["steps"], run.get("distill", 0.0), run.get("compute", "fp32")

    carves = [run.get("carve", {}).get("config") for run in (old, new)]
    return (
        head(old) == head(new)
        and settings(old) == settings(new)
        and (None in carves or carves[0] == carves[1])
    )


def _machine() -> dict:
    import transformers

    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": source_commit(),
    }


if __name__ == "__main__":
    main()
