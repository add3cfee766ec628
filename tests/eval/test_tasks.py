"""eval tasks: lm-eval run offline on the shipped data, checked against a hand-written scorer."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecarve.eval.tasks import data_dir, evaluate_tasks, parse_tasks

LIMIT = 4  # as in the tiny_tasks_record fixture


def _arc_by_hand(model_dir, limit: int) -> dict:
    """ARC-Easy zero-shot as lm-eval defines it: "Question: q\\nAnswer:" + " choice", summed
    log-likelihood of the continuation; acc_norm divides by the choice's length in characters."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = datasets.load_from_disk(str(data_dir("arc_easy"))).select(range(limit))
    acc = norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]["text"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(whole)
            with torch.no_grad():
                logprobs = model(ids[None]).logits[0].float().log_softmax(-1)
            scored = range(len(context_ids), len(whole))
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in scored))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        lengths = [len(c) for c in doc["choices"]["text"]]
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == gold
    return {"acc": acc / limit, "acc_norm": norm / limit}


def test_lm_eval_offline_matches_hand_scorer(tiny_models, tiny_tasks_record):
    model = tiny_models["llama"]
    # the fixture ran evaluate_tasks(model, "arc_easy,boolq,winogrande", limit=4)
    out, record, model_unchanged = tiny_tasks_record
    assert json.loads(out.read_text()) == record
    assert model_unchanged, "eval wrote into the model directory"
    assert not [p for p in data_dir("boolq").iterdir() if p.name.startswith("cache-")], (
        "wrote beside the data"
    )
    tasks = record["tasks"]
    assert list(tasks) == ["arc_easy", "boolq", "winogrande"]
    for row in tasks.values():
        assert row["questions"] == LIMIT and 0.0 <= row["acc"] <= 1.0
    assert tasks["arc_easy"]["available"] == 570 and tasks["boolq"]["available"] == 3270
    # lm-eval defines acc_norm for ARC, only acc for boolq and winogrande: reported as it does
    assert (
        "acc_norm" in tasks["arc_easy"]
        and "acc_norm" not in tasks["boolq"]
        and "acc_norm" not in tasks["winogrande"]
    )
    by_hand = _arc_by_hand(model, LIMIT)
    assert tasks["arc_easy"]["acc"] == pytest.approx(by_hand["acc"])
    assert tasks["arc_easy"]["acc_norm"] == pytest.approx(by_hand["acc_norm"])
    assert record["task_versions"]["boolq"] is not None and "lm_eval" in record["versions"]


def test_unknown_task_fails_before_loading():
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known tasks: arc_easy"):
        evaluate_tasks("/nonexistent/model", "arc_easy,mmlu")
    assert parse_tasks("piqa, hellaswag,piqa") == ["piqa", "hellaswag"]


def test_bad_limit_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        evaluate_tasks(tmp_path, "piqa", limit=0)
    with pytest.raises(FileNotFoundError, match="model not found"):
        evaluate_tasks(tmp_path / "nope", "piqa")
