"""The report's three plots. Each takes the rows it draws (already written as CSV by the caller, or
written here for the heatmap) and returns the PNG path. Figures are made without pyplot, so no
display is needed and the process's matplotlib backend (a notebook's) is left as it is."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.figure import Figure

from moecarve.carve.writer import atomic_file
from moecarve.eval.common import distinct_suffix


def ppl_vs_active(rows: list[dict], png: Path) -> Path:
    """Perplexity (log scale) against the active FFN fraction, one line per source model (and per
    training since the carve, text, windows and dtype where the rows hold several). Rows without an
    active fraction are not drawn."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = [r for r in rows if r["active_fraction"] is not None]
    fields = ("source", "trained", "text", "windows_x_length", "dtype")
    models = {r["model"] for r in drawn}
    alike = {
        c for c in (r["config"] for r in drawn) if len({r["model"] for r in drawn if r["config"] == c}) > 1
    }
    for label, points in lines(drawn, fields, always=("source",)):
        points = sorted(points, key=lambda r: r["active_fraction"])
        ax.plot([r["active_fraction"] for r in points], [r["ppl"] for r in points], "o-", label=label)
        for r in points:
            ax.annotate(
                distinct_suffix(r["model"], models) if r["config"] in alike else r["config"],
                (r["active_fraction"], r["ppl"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_xlabel("active fraction of FFN neurons per token")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return _save(fig, png)


def speed_vs_batch(rows: list[dict], png: Path) -> Path:
    """Prefill and decode tokens/s against batch size, one line per model, device (and CPU), dtype,
    mode and prompt."""
    fig = Figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    fields = ("config", "source", "model", "device", "cpu", "dtype", "mode", "tokens")
    for label, points in lines(rows, fields, always=("config", "device", "dtype", "mode")):
        points = sorted(points, key=lambda r: r["batch"])
        for ax, column in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), strict=True):
            ax.plot([r["batch"] for r in points], [r[column] for r in points], "o-", label=label)
    batches = sorted({r["batch"] for r in rows})
    for ax, title in zip(axes, ("prefill", "decode"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    return _save(fig, png)


def lines(rows: list[dict], fields: tuple[str, ...], always: tuple[str, ...]) -> list[tuple[str, list[dict]]]:
    """(label, rows) of each line: rows grouped by `fields`, labelled by the `always` fields and those
    whose values differ between the rows (a source by its file or directory name), so no two lines
    share a label."""
    keys = list(dict.fromkeys(tuple(r[f] for f in fields) for r in rows))
    shown = [i for i in range(len(fields)) if fields[i] in always or len({key[i] for key in keys}) > 1]

    def label(key, short=True):
        parts = [
            Path(key[i]).name if short and fields[i] in ("source", "model") else str(key[i]) for i in shown
        ]
        return parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")

    short = len({label(key) for key in keys}) == len(keys)  # else two sources share a name
    return [(label(key, short), [r for r in rows if tuple(r[f] for f in fields) == key]) for key in keys]


def load_heatmap(record: dict, png: Path, data: Path) -> list[Path]:
    """Tokens per expert / mean tokens per expert, layers x routed experts (1.0 = balanced)."""
    import numpy as np

    counts = np.array([row["tokens_per_expert"] for row in record["layers"]], dtype=float)
    relative = counts / counts.mean(axis=1, keepdims=True)
    layers = [row["layer"] for row in record["layers"]]
    with atomic_file(data) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *[f"expert_{e}" for e in range(counts.shape[1])]])
        writer.writerows([layer, *map(int, row)] for layer, row in zip(layers, counts, strict=True))
    fig = Figure(figsize=(max(4, 0.35 * counts.shape[1] + 2), max(3, 0.18 * len(layers) + 1)))
    ax = fig.subplots()
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_title(f"{record['name']}: tokens per expert / mean ({record['tokens']} tokens)", fontsize=9)
    fig.colorbar(image, ax=ax, label="load / mean")
    return [_save(fig, png), data]


def _save(fig, png: Path) -> Path:
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return png
