"""The stages a batch job runs, one registry entry each: carve, recover, esft, eval_ppl, eval_tasks.

A stage reads `ctx.model_dir` (the source, or the model an earlier stage wrote), may set it, writes
its files into the job's working directory and returns (record, columns): the record goes into the
job's result.json, the columns into the results table. Adding a stage is one function here, its
options in recipe.py and its name in STAGE_ORDER (and, if it reads a text, its checks in runner.py's
TEXT_CHECKS and job_inputs).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moecarve.batch.recipe import Job
from moecarve.resources import is_protocol_text


@dataclass
class Context:
    job: Job
    work: Path  # the job's temporary directory, renamed into place when every stage is done
    source: Path  # the resolved source model directory
    model_dir: Path  # what the next stage evaluates
    root: Path  # the recipe's directory: relative paths in the recipe are relative to it
    progress: bool
    device: str | None = None  # the recipe's: None runs each stage where it runs by default

    def path(self, value: str | None) -> str | None:
        return recipe_path(self.root, value)


def recipe_path(root: Path, value: str | None) -> str | None:
    """A recipe path relative to the recipe file (`root`); other values (hub names, the bundled
    passages' names, None) as given."""
    if is_protocol_text(value):
        return value
    local = root / Path(value).expanduser()
    return str(local) if local.exists() else value


StageResult = tuple[dict, dict]
STAGES: dict[str, Callable[[Context, dict], StageResult]] = {}


def stage(name: str):
    def register(function):
        STAGES[name] = function
        return function

    return register


@stage("carve")
def carve(ctx: Context, options: dict) -> StageResult:
    from moecarve.carve import pipeline

    out = ctx.work / "model"
    calib = ctx.path(ctx.job.calib)
    result = pipeline.carve(
        ctx.source, ctx.job.carve, calib, out, progress=ctx.progress, device=ctx.device or "cpu"
    )
    shutil.copy(out / "carve.json", ctx.work / "carve.json")  # kept when the checkpoint is not
    ctx.model_dir = out
    record = result.record
    columns = {
        "active_fraction": record["resolved"]["active_fraction"],  # with dense layers counted
        "neurons_per_expert": record["resolved"]["neurons_per_expert"],
        "calib_tokens": record["calibration"]["tokens"],
        "carve_seconds": record["carve_seconds"],
    }
    summary = {k: record[k] for k in ("resolved", "calibration", "carve_seconds")}
    return {
        **summary,
        "file": "carve.json",
        "model": "model" if ctx.job.keep_model else None,
    }, columns


@stage("recover")
def recover(ctx: Context, options: dict) -> StageResult:
    """`moecarve tune recover` of the job's carve: the evals after it score the recovered model."""
    from moecarve.tune.recover import RecoverConfig
    from moecarve.tune.recover import recover as run_recover

    settings = dict(options)
    data = ctx.path(settings.pop("data"))
    out = ctx.work / "recovered"
    result = run_recover(
        ctx.model_dir,
        RecoverConfig(**settings),
        data,
        out,
        checkpoints=ctx.work / "recover-checkpoints",
        device=ctx.device,
    )
    ctx.model_dir = out
    keys = ("config", "data", "trainable_parameters", "train_loss", "final_train_loss", "teacher", "device")
    record = {k: result.record[k] for k in keys}  # kept when the checkpoint is not
    columns = {
        "recover_steps": settings["steps"],
        "recover_loss": record["final_train_loss"],
        "recover_seconds": result.record["seconds"],
    }
    kept = ctx.job.keep_model
    return {**record, "seconds": result.record["seconds"], "model": "recovered" if kept else None}, columns


@stage("esft")
def esft(ctx: Context, options: dict) -> StageResult:
    """ESFT of the job's model (its carve, or the carve's recovery): score the routed experts on the
    task, select, train the selected ones, merge. The evals after it score the merged model."""
    from moecarve.esft.merge import merge
    from moecarve.esft.score import score
    from moecarve.esft.select import select
    from moecarve.esft.train import train

    started = time.perf_counter()
    data, kind, p, tokens, config = esft_settings(options, ctx.root)
    scores, experts = ctx.work / "esft-scores.json", ctx.work / "esft-experts.json"
    # scoring and training on the recipe's device; without one, each where it runs by default
    score(
        ctx.model_dir,
        data,
        scores,
        tokens=tokens,
        max_length=config.max_length,
        device=ctx.device,
        progress=ctx.progress,
        seed=config.seed,
    )
    chosen = select(scores, kind, p, experts)
    trained = train(ctx.model_dir, experts, data, ctx.work / "esft-adapter", config, device=ctx.device)
    ctx.model_dir = merge(ctx.model_dir, ctx.work / "esft-adapter", ctx.work / "esft-merged")
    kept = ctx.job.keep_model
    losses = trained["training"]["losses"]  # the last logged loss, as recover's column
    columns = {
        "esft_experts": chosen["selected"],
        # of the model's parameters, all that trained (shared experts and more where the settings say)
        "esft_fraction": trained["trainable_parameters"] / chosen["total_parameters"],
        "esft_loss": losses[-1] if losses else trained["training"]["train_loss"],
        "esft_seconds": round(time.perf_counter() - started, 2),  # score, select, train and merge
    }
    record = {key: chosen[key] for key in ("score", "p", "experts", "selected", "fraction_of_model")}
    return {
        **record,
        "trainable_parameters": trained["trainable_parameters"],
        "config": trained["config"],
        "training": trained["training"],
        "files": ["esft-scores.json", "esft-scores.png", "esft-experts.json"],
        "model": "esft-merged" if kept else None,
    }, columns


def esft_settings(options: dict, root: Path):
    """The esft stage's (task data, score kind, p, tokens, EsftConfig), its files relative to the recipe."""
    from moecarve.esft.train import EsftConfig

    settings = dict(options)
    data = recipe_path(root, settings.pop("data"))
    kind, p, tokens = settings.pop("score"), settings.pop("p"), settings.pop("tokens")
    if not is_protocol_text(settings.get("mix_general")):
        settings["mix_general"] = recipe_path(root, settings["mix_general"])
    return data, kind, p, tokens, EsftConfig(**settings)


@stage("eval_ppl")
def eval_ppl(ctx: Context, options: dict) -> StageResult:
    from moecarve.eval.ppl import evaluate_ppl

    record = evaluate_ppl(
        [ctx.model_dir],
        data=ctx.path(options["data"]),
        windows=options["windows"],
        length=options["length"],
        out=ctx.work / "ppl.json",
        progress=ctx.progress,
        device=ctx.device,
    )
    result = record["results"][0]
    columns = {"ppl": result["ppl"], "ppl_tokens": result["tokens_scored"]}
    return {"ppl": result["ppl"], "tokens_scored": result["tokens_scored"], "file": "ppl.json"}, columns


@stage("eval_tasks")
def eval_tasks(ctx: Context, options: dict) -> StageResult:
    from moecarve.eval.tasks import evaluate_tasks

    record = evaluate_tasks(
        ctx.model_dir,
        tasks=options["tasks"],
        limit=options["limit"],
        batch_size=options["batch_size"],
        out=ctx.work / "tasks.json",
        device=ctx.device,
        progress=ctx.progress,
    )
    scores = record["tasks"]
    columns = {}
    for task, metrics in scores.items():
        columns.update({f"{task}.{m}": metrics[m] for m in ("acc", "acc_norm") if metrics.get(m) is not None})
        columns[f"{task}.questions"] = metrics.get("questions")
    return {"tasks": scores, "file": "tasks.json"}, columns


def drop_models(work: Path) -> None:
    """The checkpoints a job wrote: its carve's, its recovery's and its ESFT's."""
    for name in ("model", "recovered", "recover-checkpoints", "esft-adapter", "esft-merged"):
        shutil.rmtree(work / name, ignore_errors=True)


def finish(ctx: Context, final: Path, keep_model: bool) -> None:
    """Drop the checkpoint if the recipe does not keep it; point the eval files at the final path."""
    if not keep_model:
        drop_models(ctx.work)
    records = ("carve.json", "esft.json", "esft_config.json")  # of the checkpoints a job wrote
    # as written, and as JSON escapes it (a name beyond ASCII)
    spellings = [(str(ctx.work), str(final)), (json.dumps(str(ctx.work))[1:-1], json.dumps(str(final))[1:-1])]
    for path in [*ctx.work.glob("*.json"), *(p for p in ctx.work.glob("*/*.json") if p.name in records)]:
        text = original = path.read_text(encoding="utf-8")
        for old, new in spellings:  # records name the models they read: their place after the rename
            text = text.replace(old, new)
        if text != original:
            path.write_text(text, encoding="utf-8")
