"""eval tasks: lm-eval run offline on the shipped data, checked against a hand-written scorer."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecarve.eval.tasks import DEFAULT_TASKS, data_dir, evaluate_tasks, parse_tasks

LIMIT = 4  # as in the tiny_tasks_record fixture


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of the continuation's tokens after the context, as lm-eval scores a choice."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = model(ids[None]).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def _choices(task: str, doc: dict) -> tuple[list[str], list[str], int]:
    """(contexts, choices, gold) of one question as lm-eval's task YAML defines it, read from the raw
    record: each choice follows its context after a space."""
    if task == "arc_easy":
        choices = doc["choices"]["text"]
        return (
            [f"Question: {doc['question']}\nAnswer:"] * len(choices),
            choices,
            doc["choices"]["label"].index(doc["answerKey"]),
        )
    if task == "piqa":
        return [f"Question: {doc['goal']}\nAnswer:"] * 2, [doc["sol1"], doc["sol2"]], doc["label"]
    if task == "boolq":  # the raw answer is a bool; lm-eval's choices are ["no", "yes"]
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [context] * 2, ["no", "yes"], 1 if doc["answer"] is True else 0
    if task == "winogrande":  # partial scoring: each option fills the blank; the rest is scored
        blank = doc["sentence"].index("_")
        rest = doc["sentence"][blank + 1 :].strip()
        contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
        return contexts, [rest, rest], int(doc["answer"]) - 1
    raise ValueError(task)


def _by_hand(model_dir, task: str, limit: int) -> dict:
    """Zero-shot accuracy by a plain loop over the shipped records; acc_norm divides each choice's
    log-likelihood by its length in characters (reported by lm-eval for ARC and PIQA only)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = datasets.load_from_disk(str(data_dir(task))).select(range(limit))
    acc = norm = 0
    for doc in docs:
        contexts, choices, gold = _choices(task, doc)
        scores = [
            _loglikelihood(model, tokenizer, c, " " + x) for c, x in zip(contexts, choices, strict=True)
        ]
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        norm += max(range(len(scores)), key=lambda i: scores[i] / len(choices[i])) == gold
    return {"acc": acc / limit, "acc_norm": norm / limit}


def test_lm_eval_offline_matches_hand_scorer(tiny_models, tiny_tasks_record):
    model = tiny_models["llama"]
    # the fixture ran evaluate_tasks(model, every task, limit=4)
    out, record, kept = tiny_tasks_record
    assert json.loads(out.read_text()) == record
    assert kept["model"], "eval wrote into the model directory"
    assert kept["logging"], "lm-eval's logging level was left changed"
    assert kept["random"], "the caller's random generators were left reseeded"
    assert kept["environ"], "the environment was left changed"
    assert not [p for p in data_dir("boolq").iterdir() if p.name.startswith("cache-")], (
        "wrote beside the data"
    )
    tasks = record["tasks"]
    assert list(tasks) == list(DEFAULT_TASKS)
    for row in tasks.values():
        assert row["questions"] == LIMIT and 0.0 <= row["acc"] <= 1.0
    assert tasks["arc_easy"]["available"] == 570 and tasks["boolq"]["available"] == 3270
    assert tasks["hellaswag"]["available"] == 10042 and tasks["piqa"]["available"] == 1838
    # lm-eval defines acc_norm for ARC, PIQA and HellaSwag, only acc for boolq and winogrande
    assert {name for name, row in tasks.items() if "acc_norm" in row} == {
        "arc_easy",
        "arc_challenge",
        "piqa",
        "hellaswag",
    }
    for task in ("arc_easy", "piqa", "boolq", "winogrande"):
        by_hand = _by_hand(model, task, LIMIT)
        for metric in ("acc", "acc_norm"):
            if metric in tasks[task]:
                assert tasks[task][metric] == pytest.approx(by_hand[metric]), (task, metric)
    assert record["task_versions"]["boolq"] is not None and "lm_eval" in record["versions"]


def test_unknown_task_fails_before_loading():
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known tasks: arc_easy"):
        evaluate_tasks("/nonexistent/model", "arc_easy,mmlu")
    assert parse_tasks("piqa, hellaswag,piqa") == ["piqa", "hellaswag"]


def test_bad_limit_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        evaluate_tasks(tmp_path, "piqa", limit=0)
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        evaluate_tasks(tmp_path, "piqa", batch_size=0)
    with pytest.raises(FileNotFoundError, match="model not found"):
        evaluate_tasks(tmp_path / "nope", "piqa")


def test_no_git_message_outside_a_repository(tiny_models, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for the working directory's commit; outside a repository git said `fatal`."""
    monkeypatch.chdir(tmp_path)
    record = evaluate_tasks(tiny_models["llama"], ("boolq",), limit=1, device="cpu")
    assert record["tasks"]["boolq"]["questions"] == 1
    assert "not a git repository" not in capfd.readouterr().err


def test_offline_only_while_evaluating(tiny_models, monkeypatch):
    """The hub and datasets are offline while lm-eval reads the documents, and as they were afterwards:
    an earlier version left both offline for the rest of the process (and, once datasets was imported,
    its own flag was never set at all)."""
    import datasets.config
    import huggingface_hub.constants

    from moecarve.eval import tasks

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    seen = []
    real_load = tasks._load_local

    def load(*args, **kwargs):
        seen.append((huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(tasks, "_load_local", load)
    evaluate_tasks(tiny_models["llama"], ("piqa",), limit=1, device="cpu", progress=False)
    assert seen == [(True, True)]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
