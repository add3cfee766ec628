"""Perplexity on the project's protocol (docs/eval.md, EVAL_PROTOCOL): the last 16 x 2048 tokens
of the BoolQ passage stream, non-overlapping windows, PPL = exp(mean next-token NLL), fp32."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecarve.carve.calib import read_text, tokenize_stream


def evaluation_windows(tokenizer, windows: int = 16, length: int = 2048, source=None) -> torch.Tensor:
    """The last `windows` x `length` tokens of the text stream as [windows, length]."""
    text, description = read_text(source)
    stream = tokenize_stream(tokenizer, text)
    if stream.numel() < windows * length:
        raise ValueError(f"text has {stream.numel()} tokens, {windows} x {length} needed ({description})")
    return stream[-windows * length :].view(windows, length)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = True) -> dict:
    """exp(mean NLL) over every next-token prediction inside each window."""
    total, count = 0.0, 0
    for ids in tqdm(windows, desc="ppl", disable=not progress, leave=False):
        logits = model(ids[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
        total += nll.item()
        count += ids.numel() - 1
    return {"ppl": math.exp(total / count), "tokens_scored": count}


def protocol_ppl(model_dir: str | Path, windows: int = 16, length: int = 2048) -> dict:
    """Protocol PPL of a saved model directory, loaded in fp32 with stock transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = perplexity(model, evaluation_windows(tokenizer, windows, length))
    return {**result, "windows": windows, "length": length}
