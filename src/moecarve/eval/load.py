"""Expert load of a carved glm4_moe model on given text: how many tokens each routed expert of each
layer receives, and the imbalance max/mean that decides how well a sparse kernel can use the GPU.

Counts come from forward hooks on each `mlp.gate` (transformers' Glm4MoeTopkRouter, whose forward
returns (router_logits, topk_weights, topk_indices)); shared experts see every token, so they
are not counted.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moecarve.carve.calib import read_text, text_sha256, tokenize_stream
from moecarve.devices import resolve_device
from moecarve.eval import common
from moecarve.eval.ppl import _tail_windows, check_positions


def routers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> router (`mlp.gate` with `top_k`) of every MoE layer."""
    found = {}
    for index, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            found[index] = gate
    return found


@torch.no_grad()
def count_tokens(model, windows: torch.Tensor, progress: bool = True) -> dict[int, torch.Tensor]:
    """Layer index -> [E] tokens routed to each expert, over every token of `windows` [S, L]."""
    gates = routers(model)
    if not gates:
        kind = getattr(model.config, "model_type", "?")
        raise ValueError(f"model ({kind}) has no routed experts: expert load needs a carved glm4_moe model")
    counts = {i: torch.zeros(g.weight.shape[0], dtype=torch.long) for i, g in gates.items()}

    def hook(index):
        def record(_module, _inputs, outputs):
            topk_indices = outputs[2]  # [T, K]
            counts[index] += torch.bincount(topk_indices.flatten().cpu(), minlength=counts[index].numel())

        return record

    handles = [gate.register_forward_hook(hook(i)) for i, gate in gates.items()]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(windows, desc="expert load", disable=not progress, leave=False):
            model(ids[None].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return counts


def imbalance(counts: torch.Tensor) -> dict:
    """max/mean (1.0 = perfectly balanced; the slowest expert sets the pace), min/mean, idle experts."""
    mean = counts.double().mean().item()
    return {
        "max_over_mean": counts.max().item() / mean,
        "min_over_mean": counts.min().item() / mean,
        "idle_experts": int((counts == 0).sum()),
    }


def evaluate_load(
    model: str | Path,
    data: str | Path | None = None,
    windows: int = 4,
    length: int = 2048,
    dtype: str = "float32",
    device: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Tokens per routed expert per layer on the last `windows` x `length` tokens of the text.

    Returns (and writes to `out` as JSON) the counts matrix [layers x experts], per-layer
    imbalance, and the summary (mean and worst max/mean over layers).
    """
    from moecarve.resources import refuse_bundled

    refuse_bundled(model, "eval load")  # dense: said so, not by its GGUF cache's path
    path = common.resolve_model(model)
    check_positions(path, length)
    out = common.check_output(out, "load", data)
    torch_dtype = common.parse_dtype(dtype)
    device = resolve_device(device)
    from transformers import AutoConfig, AutoTokenizer

    from moecarve.moe import meta_model

    if not routers(meta_model(AutoConfig.from_pretrained(path))):  # the skeleton only: nothing loaded
        raise ValueError(f"{path} has no routed experts: expert load needs a carved glm4_moe model")
    text, description = read_text(data, "--data")

    ids = _tail_windows(
        tokenize_stream(AutoTokenizer.from_pretrained(path), text), windows, length, description
    )
    start = time.perf_counter()
    loaded, _ = common.load_model(path, torch_dtype, device)
    counts = count_tokens(loaded, ids, progress)
    top_k = next(iter(routers(loaded).values())).top_k
    layers = [{"layer": i, "tokens_per_expert": c.tolist(), **imbalance(c)} for i, c in counts.items()]
    ratios = [row["max_over_mean"] for row in layers]
    record = {
        "kind": "load",
        **common.describe_model(path),
        "data": description,
        "data_sha256": text_sha256(text),
        "windows": windows,
        "length": length,
        "tokens": ids.numel(),
        "top_k": top_k,
        "routed_experts": len(layers[0]["tokens_per_expert"]),
        "layers": layers,
        "summary": {"mean_max_over_mean": sum(ratios) / len(ratios), "worst_max_over_mean": max(ratios)},
        "dtype": dtype,
        "seconds": round(time.perf_counter() - start, 2),
        "versions": common.versions(),
        "machine": common.machine(device),
    }
    common.write_json(record, out)
    return record
