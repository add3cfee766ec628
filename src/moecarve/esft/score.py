"""ESFT step 1-2: how relevant each routed expert is to a task (ALGORITHMS.md section 3).

Per MoE layer and routed expert i, over the task's tokens:
- gate:  g_i = mean over tokens of the gate value of i (0 where i is not selected);
- token: r_i = mean over tokens of 1[i selected] / K.
Averaged per sequence, then over sequences, then normalised to sum 1 within each layer, so a
threshold p means the same with and without top-k renormalisation. Task data larger than the
budget are sampled at random (the paper's D_s), whole examples only.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecarve import MoecarveWarning, moe
from moecarve.carve.calib import read_json
from moecarve.carve.source import load_causal_lm
from moecarve.carve.writer import atomic_file, check_apart, check_output_file, write_atomically
from moecarve.esft.data import file_sha256, load_examples
from moecarve.esft.shape import model_shape
from moecarve.eval.common import versions
from moecarve.eval.ppl import model_positions

FORMAT = "moecarve-esft-scores/1"
SCORES = ("token", "gate")


def sequence_scores(routing: moe.Routing, num_experts: int) -> dict[str, torch.Tensor]:
    """Both scores of one sequence's routing in one layer: [E] each (T tokens, K active)."""
    tokens, k = routing.indices.shape
    flat = routing.indices.reshape(-1)
    selected = torch.bincount(flat, minlength=num_experts).double()  # [E]
    gates = torch.zeros(num_experts, dtype=torch.float64).index_add_(
        0, flat, routing.weights.reshape(-1).double()
    )
    return {"token": selected / (tokens * k), "gate": gates / tokens}


def sample_examples(examples: list, tokens: int, seed: int) -> list[list[int]]:
    """The token ids to score within a budget of `tokens`: every example where they all fit, else a
    seeded random sample (the paper's D_s; in file order, a file sorted by topic or length would give
    its first slice), of whole examples: in the per-sequence average a cut-off fragment would weigh
    as much as a whole example. Only an example over the budget by itself, drawn first, is cut."""
    if sum(len(e.input_ids) for e in examples) <= tokens:
        return [e.input_ids for e in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen, used = [], 0
    for index in order:
        ids = examples[index].input_ids
        if used + len(ids) > tokens:
            break
        chosen.append(ids)
        used += len(ids)
    return chosen or [examples[order[0]].input_ids[:tokens]]


def normalise(values: torch.Tensor) -> list[float]:
    total = values.sum()
    if total <= 0:
        raise ValueError("a layer received no routing mass: no tokens were scored")
    return (values / total).tolist()


@torch.no_grad()
def score(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tokens: int = 131072,
    max_length: int = 512,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Score every routed expert on the task data; writes `out` (JSON) and a heatmap beside it.
    `device`: cpu, cuda or cuda:N (None: CUDA where present); `seed` draws the examples scored
    where the data hold more than `tokens`."""
    from transformers import AutoTokenizer

    from moecarve.devices import resolve_device

    if out is None:
        raise ValueError("an output file is needed for the scores (--out)")
    model_dir = Path(model_dir).expanduser()
    for name, value, least in (("--tokens", tokens, 1), ("--max-length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:  # True would be 1
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    device = resolve_device(device, "esft score")
    if Path(out).suffix.lower() == ".png":
        raise ValueError(f"--out {out}: the scores are JSON; the heatmap is written beside them as .png")
    out = check_output_file(out)
    check_apart({"--out": out, "the heatmap": out.with_suffix(".png")}, {"model": model_dir, "--data": data})
    check_own_output(out, FORMAT, beside=out.with_suffix(".png"))
    shape = model_shape(model_dir)  # dense / unsupported / missing model: refused before loading
    max_length = length_cap(model_dir, max_length)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, data_sha256 = load_examples(data, tokenizer, max_length), file_sha256(data)
    chosen = sample_examples(examples, tokens, seed)
    model = load_causal_lm(model_dir, dtype="auto", **moe.experts_loading(model_dir, "auto"))
    model = model.eval().to(device)
    sums = {
        kind: {index: torch.zeros(shape.num_experts, dtype=torch.float64) for index in shape.moe_layers}
        for kind in SCORES
    }
    used_tokens, sequences = 0, 0
    with (
        moe.record_routing(model) as log,
        tqdm(total=sum(map(len, chosen)), desc="esft score", leave=False, disable=not progress) as bar,
    ):
        for input_ids in chosen:
            ids = torch.tensor([input_ids], device=model.device)
            log.clear()
            model(ids)
            for index, calls in log.layers.items():
                for kind, value in sequence_scores(calls[0], shape.num_experts).items():
                    sums[kind][index] += value
            used_tokens += ids.shape[1]
            sequences += 1
            bar.update(ids.shape[1])
    record = {
        "format": FORMAT,
        "model": str(Path(model_dir).expanduser().resolve()),
        "data": str(Path(data).expanduser().resolve()),
        "data_sha256": data_sha256,
        **shape.record(),
        "sequences": sequences,
        "tokens": used_tokens,
        "examples": len(examples),  # in the data; `sequences` of them scored
        "seed": seed,
        "token_budget": tokens,  # --tokens
        "max_length": max_length,  # as capped to the model's positions
        "device": str(device),
        "versions": versions(),
        "scores": {kind: {str(i): normalise(v) for i, v in layers.items()} for kind, layers in sums.items()},
    }
    heatmap(record, out.with_suffix(".png"))  # first: a failure leaves no scores
    write_json(out, record)
    return record


def length_cap(model_dir, max_length: int) -> int:
    """--max-length, lowered to the model's positions (with a warning): a cap above them would let
    long examples run on positions the model was never trained on."""
    positions = model_positions(model_dir)
    if positions and max_length > positions:
        warnings.warn(
            f"--max-length {max_length} is lowered to the {positions} positions of {model_dir}",
            MoecarveWarning,
            stacklevel=2,
        )
        return positions
    return max_length


def check_own_output(out: Path, format_: str, beside: Path | None = None) -> None:
    """Replace only an earlier output of the same command (its JSON says `format_`), and a file
    `beside` it only with it: any other file at either path is refused before work."""
    ours = False
    if out.exists():
        try:
            ours = read_json(out).get("format") == format_
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise ValueError(f"output {out} exists and is not a {format_} file; remove it or name another")
    if beside is not None and beside.exists() and (not ours or not beside.is_file()):
        raise ValueError(f"{beside} exists and is no earlier output's; remove it or name another --out")


def write_json(path: Path, record: dict) -> None:
    """Write-then-rename: a failed run leaves no half file."""
    write_atomically(path, json.dumps(record, indent=1) + "\n")


def heatmap(record: dict, path: Path) -> None:
    """Layers x experts, one panel per score."""
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left as it is

    fig = Figure(figsize=(12, 0.25 * len(record["moe_layers"]) + 2))
    axes = fig.subplots(1, len(SCORES), squeeze=False)
    for ax, kind in zip(axes[0], SCORES, strict=True):
        grid = [record["scores"][kind][str(i)] for i in record["moe_layers"]]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"{kind} score (normalised per layer)", xlabel="routed expert", ylabel="layer")
        ax.set_yticks(range(len(grid)), [str(i) for i in record["moe_layers"]], fontsize=6)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
