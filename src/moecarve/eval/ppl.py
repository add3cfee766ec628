"""Perplexity on the project's protocol (docs/eval.md, EVAL_PROTOCOL): the last 16 x 2048 tokens
of the BoolQ passage stream, non-overlapping windows, PPL = exp(mean next-token NLL), fp32.

Several models in one call read the text once and tokenize it once per distinct tokenizer (a
carve keeps its source's tokenizer), so dense and carved models are scored on the same tokens.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecarve.carve.calib import read_text, text_sha256, tokenize_stream
from moecarve.devices import resolve_device
from moecarve.eval import common
from moecarve.isolation import kept_random_state

PROTOCOL_WINDOWS, PROTOCOL_LENGTH = 16, 2048  # EVAL_PROTOCOL.md


def evaluation_windows(
    tokenizer, windows: int = PROTOCOL_WINDOWS, length: int = PROTOCOL_LENGTH, source=None
) -> torch.Tensor:
    """The last `windows` x `length` tokens of the text stream as [windows, length]."""
    text, description = read_text(source, "--data")
    return _tail_windows(tokenize_stream(tokenizer, text), windows, length, description)


def _tail_windows(stream: torch.Tensor, windows: int, length: int, description: str) -> torch.Tensor:
    if windows < 1 or length < 2:
        raise ValueError(f"need at least 1 window of 2 tokens, got {windows} x {length}")
    if stream.numel() < windows * length:
        raise ValueError(f"text has {stream.numel()} tokens, {windows} x {length} needed ({description})")
    return stream[-windows * length :].view(windows, length)


def model_positions(model_dir: str | Path) -> int | None:
    """The positions a model serves: its (text) config's max_position_embeddings, or the rope
    scaling's factor x original positions where that is more (YaRN configs may leave the first
    at the original length); None when the config names neither."""
    from transformers import AutoConfig

    model_dir = Path(model_dir).expanduser()
    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
    except (OSError, ValueError, KeyError):  # a model type this transformers does not know
        return common.read_config(model_dir).get("max_position_embeddings")
    positions = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default")
    if positions and scaled and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or positions
        positions = max(positions, int(rope["factor"] * original))
    return positions


def check_positions(model_dir: str | Path, length: int, what: str = "--length", instead: str = "") -> None:
    """Refuse windows longer than the model's positions: their tail would be scored at positions
    the model was never trained on, and the figure would look like any other. `instead`: what to
    do then, formatted with the model's `positions`."""
    positions = model_positions(model_dir)
    if positions and length > positions:
        advice = f"; {instead.format(positions=positions)}" if instead else ""
        raise ValueError(f"{what} {length} exceeds the {positions} positions of {model_dir}{advice}")


def check_eval_ppl_positions(model_dir: str | Path) -> None:
    """`--eval-ppl` (carve's, recover's) scores the protocol's windows: refused, before any work, on
    a model too short for them, with how to measure it instead."""
    check_positions(
        model_dir,
        PROTOCOL_LENGTH,
        "--eval-ppl's protocol window length",
        "leave it out and measure with `moecarve eval ppl OUT --length {positions}` after",
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = True) -> dict:
    """exp(mean NLL) over every next-token prediction inside each window."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids in tqdm(windows, desc="ppl", disable=not progress, leave=False):
        ids = ids.to(device)
        logits = model(ids[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
        total += nll.item()
        count += ids.numel() - 1
    return {"ppl": math.exp(total / count), "tokens_scored": count}


def protocol_ppl(
    model_dir: str | Path,
    windows: int = PROTOCOL_WINDOWS,
    length: int = PROTOCOL_LENGTH,
    data=None,
    device: str = "cpu",
) -> dict:
    """Protocol PPL of a saved model directory, loaded in fp32 with stock transformers, as
    `eval ppl` loads it (a damaged file named; experts of unaligned widths with the eager experts)."""
    model_dir, device = common.resolve_model(model_dir), resolve_device(device)
    check_positions(model_dir, length, "the protocol's window length")
    model, tokenizer = common.load_model(model_dir, torch.float32, device)
    result = perplexity(model, evaluation_windows(tokenizer, windows, length, data))
    return {**result, "windows": windows, "length": length}


def tokenizer_fingerprint(tokenizer) -> str:
    """Identical for tokenizers that split text identically (the carve copies its source's files)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(content.encode()).hexdigest()


def evaluate_ppl(
    models: str | Path | list[str | Path],
    data: str | Path | None = None,
    windows: int = PROTOCOL_WINDOWS,
    length: int = PROTOCOL_LENGTH,
    dtype: str = "float32",
    device: str | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Perplexity of each model on the same windows; checks every input before loading a model.

    Returns (and writes to `out` as JSON) the protocol, the seed, versions, machine and one
    result per model: its name, active fraction, PPL and the number of tokens scored.
    """
    from transformers import AutoTokenizer

    if not isinstance(models, list | tuple):  # one model, as the other evaluate_* functions take it
        models = [models]
    if not models:
        raise ValueError("no model given")
    paths = [common.resolve_model(m) for m in models]
    for path in paths:
        check_positions(path, length)
    out = common.check_output(out, "ppl", data)
    torch_dtype = common.parse_dtype(dtype)
    device = resolve_device(device)
    text, description = read_text(data, "--data")

    shared: dict[str, torch.Tensor] = {}  # tokenizer fingerprint -> windows
    per_model = []
    for path in paths:
        tokenizer = AutoTokenizer.from_pretrained(path)
        key = tokenizer_fingerprint(tokenizer)
        if key not in shared:
            stream = tokenize_stream(tokenizer, text)
            shared[key] = _tail_windows(stream, windows, length, description)
        per_model.append(key)

    results = []
    with kept_random_state():  # seeded per model, then given back as the caller had it
        for path, key in zip(paths, per_model, strict=True):
            torch.manual_seed(seed)
            start = time.perf_counter()
            model, _ = common.load_model(path, torch_dtype, device)
            scored = perplexity(model, shared[key], progress=progress)
            results.append(
                {**common.describe_model(path), **scored, "seconds": round(time.perf_counter() - start, 2)}
            )
            del model
    record = {
        "kind": "ppl",
        "protocol": {
            "data": description,
            "sha256": text_sha256(text),
            "windows": windows,
            "length": length,
            "tokens": "the last windows x length tokens of the stream, no special tokens",
            "dtype": dtype,
        },
        "seed": seed,
        "versions": common.versions(),
        "machine": common.machine(device),
        "results": results,
    }
    common.write_json(record, out)
    return record
