"""The results table (results.json, results.csv, results.md), rebuilt from the job directories.

The job directories are the truth; the table is derived from them every time a job ends, under a
lock, and written atomically. A killed run therefore never leaves a row lost, doubled or half
written, and processes running jobs side by side (Slurm arrays) cannot clobber each other's rows.
Columns ending in `seconds` are timings: the only cells that differ between two identical runs.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
from contextlib import contextmanager
from pathlib import Path

from moecarve.batch.recipe import Job
from moecarve.carve.writer import write_atomically

FIRST = ["job", "model", "config", "shared", "active", "experts", "active_fraction", "status"]
# then tasks, as they come
STAGE_COLUMNS = [
    "neurons_per_expert", "calib_tokens", "recover_steps", "recover_loss", "esft_experts", "esft_fraction",
    "esft_loss", "ppl", "ppl_tokens",
]  # fmt: skip
LAST = ["error"]
TIMINGS = [
    "seconds",
    "carve_seconds",
    "recover_seconds",
    "esft_seconds",
]  # in this order, whichever finished first


def job_row(job: Job, result: dict | None) -> dict:
    """One table row: the job's identity, its status and the columns its stages reported."""
    config = job.carve
    row = {
        "job": job.name,
        "model": job.model.name,
        "config": job.config_name,
        "shared": config.shared if config else None,
        "active": config.active if config else None,
        "experts": config.experts if config else None,
        # with dense layers it depends on the model's layer count: known once the carve records it
        "active_fraction": (None if config.dense_layers else config.active_fraction) if config else 1.0,
        "status": "pending",
    }
    if result is not None:
        row["status"] = result["status"]
        row.update(result.get("columns", {}))
        row["error"] = result.get("error")
        row["seconds"] = result.get("seconds")
    return row


def columns(rows: list[dict]) -> list[str]:
    """Identity first, stage columns in order of first appearance, error, then the timings."""
    seen = [key for row in rows for key in row]
    known = [k for k in STAGE_COLUMNS if k in seen]
    rest = [k for k in dict.fromkeys(seen) if k not in FIRST + known + LAST and not k.endswith("seconds")]
    middle = known + rest
    found = [k for k in dict.fromkeys(seen) if k.endswith("seconds")]
    timings = [k for k in TIMINGS if k in found] + [k for k in found if k not in TIMINGS]
    return FIRST + middle + LAST + timings


def write_table(output: Path, recipe_name: str, rows: list[dict]) -> None:
    """results.json, results.csv and results.md, each replaced atomically."""
    names = columns(rows)
    full = [{name: row.get(name) for name in names} for row in rows]
    _replace(
        output / "results.json", json.dumps({"recipe": recipe_name, "columns": names, "rows": full}, indent=2)
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in full)
    _replace(output / "results.csv", buffer.getvalue())
    _replace(output / "results.md", markdown(recipe_name, names, full))


def markdown(recipe_name: str, names: list[str], rows: list[dict]) -> str:
    done = sum(row["status"] == "ok" for row in rows)
    lines = [
        f"# Batch `{recipe_name}`: {done} of {len(rows)} jobs done",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
    ]
    lines += ["| " + " | ".join(_cell(row[name]) for name in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _replace(path: Path, text: str) -> None:
    write_atomically(path, text if text.endswith("\n") else text + "\n")


@contextmanager
def locked(path: Path, blocking: bool = True):
    """An exclusive flock on `path`; yields False when not blocking and another process holds it.
    The kernel drops the lock when its process dies, so a killed run never leaves one behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
