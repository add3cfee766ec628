"""`moecarve eval report RESULTS_DIR`: markdown tables and plots from the JSON records that the eval
commands write (any `*.json` under the directory with "kind": ppl, tasks, speed or load).

Every plot is written as PNG next to the CSV of exactly the numbers it draws, so a figure can be
checked or redrawn without this code. Other JSON files in the directory are ignored, except a
`carve.json` beside a ppl record (a batch job's directory): its carve time joins the PPL table.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from moecarve.carve.writer import (
    OutputError,
    atomic_file,
    check_can_make,
    model_directory_of,
    write_atomically,
)
from moecarve.eval.common import distinct_suffix

KINDS = ("ppl", "tasks", "speed", "load")
TITLE = "# Evaluation report"  # the first line of every report: what marks an earlier one, to replace


def collect(results_dir: str | Path) -> dict[str, list[tuple[Path, dict]]]:
    """(file, record) of every eval record under `results_dir`, by kind, in path order."""
    root = Path(results_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{results_dir} is a file: give the directory the eval records are under")
    if not root.is_dir():
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    found: dict[str, list] = {kind: [] for kind in KINDS}
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a batch job's temporary directory, left by a killed run
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours, or being written by another process
        if isinstance(record, dict) and record.get("kind") in found:
            found[record["kind"]].append((path, record))
    if not any(found.values()):
        raise ValueError(f"no eval results (JSON with kind {', '.join(KINDS)}) under {results_dir}")
    return found


def ppl_rows(records) -> list[dict]:
    """One row per (model, protocol); a later file replaces an earlier measurement of the same."""
    rows = {}
    for path, record in records:
        protocol = record["protocol"]
        for result in record["results"]:
            carve = _carve_beside(path, result.get("carve"))
            row = {
                "source": _source_of(result),
                "model": result["model"],
                "config": result["name"],
                "trained": "+".join(result.get("trained") or []) or "none",  # since the carve
                "active_fraction": result["active_fraction"],
                "ppl": result["ppl"],
                "tokens_scored": result["tokens_scored"],
                "text": protocol["data"],
                "windows_x_length": f"{protocol['windows']}x{protocol['length']}",
                "dtype": protocol.get("dtype", "float32"),  # records before the field scored float32
                "carve_seconds": carve.get("carve_seconds"),
                "file": str(path),
            }
            rows[(row["model"], row["text"], row["windows_x_length"], row["dtype"])] = row
    return sorted(rows.values(), key=lambda r: (r["source"], -(r["active_fraction"] or 0), r["config"]))


def _source_of(described: dict) -> str:
    """The source model of a described model (eval's `describe_model`): its carve's, or itself."""
    source = (described.get("carve") or {}).get("source_path") or described.get("model")
    return _source_id(source) if source else "-"


def _source_id(source: str) -> str:
    """The source model's identity for grouping: a GGUF source's cached copies (one per cache key)
    are one model, named by the GGUF file."""
    from moecarve.carve.source import gguf_file_of

    path = Path(source).resolve()
    return gguf_file_of(path) or str(path)


def _carve_beside(path: Path, carve: dict | None) -> dict:
    """The carve record next to a result file (a batch job writes both) if it is this result's
    carve (same configuration, same source), else {}."""
    if not carve:
        return {}
    try:
        beside = json.loads((path.parent / "carve.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    same = all(beside.get(key) == carve.get(key) for key in ("config", "resolved", "source_path"))
    return beside if same else {}


def task_rows(records) -> list[dict]:
    rows = {}
    for path, record in records:
        dtype = record.get("dtype", "float32")
        for task, metrics in record["tasks"].items():
            rows[(record["model"], dtype, task)] = {  # one per model and task: the table's cell
                "source": _source_of(record),
                "model": record["model"],
                "dtype": dtype,
                "config": record["name"],
                "active_fraction": record["active_fraction"],
                "task": task,
                "acc": metrics["acc"],
                "acc_norm": metrics.get("acc_norm"),
                "questions": metrics["questions"],
                "file": str(path),
            }
    return list(rows.values())


def speed_rows(records) -> list[dict]:
    """One row per (model, role, device or CPU, dtype, mode, prompt, batch); a later file replaces an
    earlier measurement of the same."""
    rows = {}
    for path, record in records:
        where = "CPU" if record["cpu_figures"] else record["machine"].get("gpu", record["machine"]["device"])
        for row in record["rows"]:
            model = record["models"][row["role"]]
            prompt = f"{record.get('prompt_length')}+{record.get('decode_tokens')}"  # prompt + decoded
            cpu = f"{record['machine'].get('cpu')} x{record['machine'].get('cpu_count')}"  # CPUs differ
            model_id = model.get("model", model["name"])
            new = {"source": _source_of(model), "model": model_id, "config": model["name"], "device": where,
                   "cpu": cpu, "dtype": record["dtype"], "mode": speed_mode(record, row["role"]),
                   "tokens": prompt, **row, "file": str(path)}  # fmt: skip
            key = (model_id, row["role"], where, cpu, new["dtype"], new["mode"], prompt, row["batch"])
            rows[key] = new
    return list(rows.values())


def speed_mode(record: dict, role: str) -> str:
    """How a speed row ran: eager or compiled decode, and the kernels for the MoE (never the baseline)."""
    mode = "compiled" if record.get("compiled") else "eager"  # records before --compile were eager
    return f"{mode} + kernels" if record.get("kernels") and role == "model" else mode


def _write_csv(rows: list[dict], path: Path) -> Path:
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _check_place(out: Path, report: Path, assets: Path) -> None:
    """Refuse, before anything is written, a place the report cannot go, and a markdown file there
    that is no earlier report: only a report is replaced."""
    if out.suffix.lower() != ".md" and out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; name a directory or a .md file")
    if report.is_dir():
        raise OutputError(f"output {report} is a directory; the report is a file")
    check_can_make(report)
    check_can_make(assets / "ppl.csv")  # the plots' directory: made, or a writable directory
    if report.exists() and report.stat().st_size and not report.read_text(errors="replace").startswith(TITLE):
        raise OutputError(f"output {report} exists and is no earlier report; remove it or name another")


def render_report(results_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the report, plots (PNG) and their data (CSV); return the paths written.

    `out` is a directory (report.md and the plots inside; default `results_dir`) or a markdown
    file such as docs/results.md (the plots then go to the directory of its name: docs/results/).
    """
    found = collect(results_dir)
    command = f"moecarve eval report {results_dir}" + (f" --out {out}" if out is not None else "")
    out = Path(out).expanduser() if out is not None else Path(results_dir).expanduser()
    if out.suffix.lower() == ".md":
        report, assets, link = out, out.with_suffix(""), out.stem + "/"
    else:
        report, assets, link = out / "report.md", out, ""
    for directory in {assets, report.parent}:
        inside = model_directory_of(directory)
        if inside is not None:
            raise ValueError(
                f"output {directory} is in the model directory {inside}; the report never writes there"
            )
    _check_place(out, report, assets)
    _check_records(found)  # every record of another shape fails here, named, before anything is written
    ppl, tasks, speed = ppl_rows(found["ppl"]), task_rows(found["tasks"]), speed_rows(found["speed"])
    replaced = {  # measurements that a record of the same later in path order replaced
        "ppl": sum(len(r["results"]) for _, r in found["ppl"]) - len(ppl),
        "tasks": sum(len(r["tasks"]) for _, r in found["tasks"]) - len(tasks),
        "speed": sum(len(r["rows"]) for _, r in found["speed"]) - len(speed),
    }
    root = Path(results_dir).expanduser()
    ratios = [
        [path.relative_to(root).as_posix(), *_pair(record), row["batch"], row["prefill"], row["decode"]]
        for path, record in found["speed"]
        for row in record["ratios"]
    ]
    loads = [(path, record, _load_line(record)) for path, record in found["load"]]
    assets.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = [TITLE, f"Generated by `{command}` from the records under `{results_dir}`."]

    if ppl:
        written += _ppl_section(ppl, replaced["ppl"], assets, link, sections)
    if tasks:
        written.append(_write_csv(tasks, assets / "tasks.csv"))
        sections += [
            "## Zero-shot tasks (lm-eval, acc / acc_norm)",
            _tasks_table(tasks),
            *_replaced_line(replaced["tasks"]),
        ]
    if speed:
        written += _speed_section(speed, ratios, replaced["speed"], assets, link, sections)
    written += _load_sections(loads, root, assets, link, sections)

    write_atomically(report, "\n\n".join(sections) + "\n")
    return [report, *written]


def _ppl_section(rows: list[dict], replaced: int, assets: Path, link: str, sections: list[str]) -> list[Path]:
    """The perplexity table and plot: appended to `sections`; returns the files written."""
    from moecarve.eval import plots

    written = [_write_csv(rows, assets / "ppl.csv"), plots.ppl_vs_active(rows, assets / "ppl_vs_active.png")]
    timed = any(r["carve_seconds"] is not None for r in rows)
    front, back = _varying(rows, ["source"]) + _models_if_named_alike(rows), _varying(rows, ["text", "dtype"])
    table = [
        [_shown(r, f, rows) for f in front]
        + [r["config"], r["active_fraction"], r["ppl"], r["tokens_scored"], r["windows_x_length"]]
        + [r[f] for f in back]
        + ([r["carve_seconds"]] if timed else [])
        for r in rows
    ]
    header = front + ["config", "active fraction", "PPL", "tokens scored", "windows"] + back
    common = "; ".join(f"{f}: {rows[0][f]}" for f in ("text", "dtype") if f not in back)
    sections += [
        "## Perplexity",
        *([f"{common[0].upper()}{common[1:]}."] if common else []),
        _table(header + (["carve s"] if timed else []), table),
        *_replaced_line(replaced),
        f"![PPL vs active fraction]({link}ppl_vs_active.png)",
    ]
    return written


def _speed_section(rows, ratios, replaced: int, assets: Path, link: str, sections: list[str]) -> list[Path]:
    """The speed table, the MoE / dense ratios and the plot: appended to `sections`; returns the
    files written."""
    from moecarve.eval import plots

    written = [
        _write_csv(rows, assets / "speed.csv"),
        plots.speed_vs_batch(rows, assets / "speed_vs_batch.png"),
    ]
    front = _varying(rows, ["source"]) + _models_if_named_alike(rows)
    back = _varying(rows, ["cpu", "tokens"])
    table = [
        [_shown(r, f, rows) for f in front]
        + [
            r["config"],
            r["device"],
            *[r[f] for f in back],
            r["dtype"],
            r["mode"],
            r["batch"],
            f"{r['prefill_tokens_per_s']:.1f}",
            f"{r['decode_tokens_per_s']:.1f}",
        ]
        for r in rows
    ]
    sections += [
        "## Speed (tokens/s, median of repeats)",
        _table(front + ["config", "device", *back, "dtype", "mode", "batch", "prefill", "decode"], table),
        *_replaced_line(replaced),
    ]
    if ratios:
        sections += [
            "MoE / dense:",
            _table(["file", "model", "baseline", "batch", "prefill", "decode"], ratios),
        ]
    sections.append(f"![speed vs batch size]({link}speed_vs_batch.png)")
    return written


def _load_sections(loads, root: Path, assets: Path, link: str, sections: list[str]) -> list[Path]:
    """One expert-load heatmap and section per load record; returns the files written."""
    from moecarve.eval import plots

    written, stems = [], set()
    for path, record, line in loads:
        base = stem = "_".join(["load", *path.relative_to(root).with_suffix("").parts])
        for n in itertools.count(2):  # a/b.json and a_b.json would both be load_a_b
            if stem not in stems:
                break
            stem = f"{base}-{n}"
        stems.add(stem)
        written += plots.load_heatmap(record, assets / f"{stem}.png", assets / f"{stem}.csv")
        sections += [
            f"## Expert load: {record['name']} ({path.relative_to(root).as_posix()})",
            line,
            f"![expert load]({link}{stem}.png)",
        ]
    return written


def _check_records(found: dict[str, list[tuple[Path, dict]]]) -> None:
    """Build each record's rows alone, so that one of another shape is named in the error."""
    checks = {
        "ppl": lambda item: [f"{r['ppl']:.3f}" for r in ppl_rows([item])],
        "tasks": lambda item: [f"{r['acc']:.3f}" for r in task_rows([item])],
        "speed": lambda item: [
            [f"{r['prefill_tokens_per_s']:.1f}{r['decode_tokens_per_s']:.1f}" for r in speed_rows([item])],
            [(row["batch"], row["prefill"], row["decode"]) for row in item[1]["ratios"]],
        ],
        "load": lambda item: [_load_line(item[1]), _load_counts(item[1])],
    }
    for kind, items in found.items():
        for item in items:
            try:
                checks[kind](item)
            except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
                raise ValueError(
                    f"{item[0]}: a {kind} record of another shape than `moecarve eval` writes "
                    f"({type(err).__name__}: {err})"
                ) from None


def _load_counts(record: dict):
    """Tokens per routed expert, layers x experts, as the heatmap takes them: one count per expert
    in every layer, and at least one layer."""
    import numpy as np

    layers = record["layers"]
    counts = np.array([[float(v) for v in r["tokens_per_expert"]] for r in layers])
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError("its layers do not each count tokens for the same routed experts")
    return counts


def _models_if_named_alike(rows: list[dict]) -> list[str]:
    """["model"] where two models of one source share a configuration name (two carves both
    S1A2E8): the table then names each by its directory."""
    named = {(r["source"], r["config"]) for r in rows}
    return ["model"] if len({(r["source"], r["config"], r["model"]) for r in rows}) > len(named) else []


def _replaced_line(count: int) -> list[str]:
    """Say how many measurements a repeat replaced: of two records of the same, the table shows the
    one whose path sorts last."""
    if not count:
        return []
    return [
        f"{count} measurement(s) repeated in a record whose path sorts later are shown from that record only."
    ]


def _varying(rows: list[dict], fields: list[str]) -> list[str]:
    """The fields whose values differ between rows: those need a column of their own."""
    return [f for f in fields if len({r[f] for r in rows}) > 1]


def _shown(row: dict, field: str, rows: list[dict]) -> str:
    """A cell: a source model or a model by as much of its path as tells it from the table's others
    (a batch job's `JOB/model`; two sources both called `llama`, in `a/` and `b/`)."""
    if field in ("model", "source"):
        return distinct_suffix(row[field], {r[field] for r in rows})
    return row[field]


def _pair(record: dict) -> list[str]:
    """A speed record's model and baseline, as config @ source name."""
    models = record["models"]
    return [
        f"{models[role]['name']} @ {Path(_source_of(models[role])).name}" if role in models else "-"
        for role in ("model", "baseline")
    ]


def _load_line(record: dict) -> str:
    """The load section's summary line."""
    summary = record["summary"]
    return (
        f"{record['tokens']} tokens, top-{record['top_k']} of {record['routed_experts']} routed experts; "
        f"max/mean per layer: mean {summary['mean_max_over_mean']:.2f}, worst {summary['worst_max_over_mean']:.2f}."
    )


def _tasks_table(rows: list[dict]) -> str:
    """Models as rows, tasks as columns: "acc / acc_norm (questions)"."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    front = _varying(rows, ["source"]) + _models_if_named_alike(rows)
    back = _varying(rows, ["dtype"])
    models = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    cells = {(r["model"], r["dtype"], r["task"]): r for r in rows}
    body = []
    for model in models:
        first = next(r for r in rows if (r["model"], r["dtype"]) == model)
        line = [_shown(first, f, rows) for f in front] + [first["config"], first["active_fraction"]]
        line += [first[f] for f in back]
        for task in tasks:
            r = cells.get((*model, task))
            if r is None:
                line.append(None)
                continue
            norm = f" / {r['acc_norm']:.3f}" if r["acc_norm"] is not None else ""
            line.append(f"{r['acc']:.3f}{norm} ({r['questions']})")
        body.append(line)
    return _table([*front, "config", "active fraction", *back, *tasks], body)
