"""Running recipes: the table, failures, dry runs, --only, refusals, and resuming after a SIGKILL."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moecarve.batch import runner
from moecarve.batch.cli import batch_command
from moecarve.batch.recipe import RecipeError
from moecarve.eval.common import source_commit
from tests.batch.conftest import JOBS

TIMINGS = "seconds"  # columns ending so are timings: the only cells two identical runs may differ in


def rows(output: Path) -> list[dict]:
    table = json.loads((output / "results.json").read_text())
    return [{k: v for k, v in row.items() if not k.endswith(TIMINGS)} for row in table["rows"]]


def csv_rows(output: Path) -> list[dict]:
    with (output / "results.csv").open() as handle:
        return [{k: v for k, v in row.items() if not k.endswith(TIMINGS)} for row in csv.DictReader(handle)]


def test_table_records_results_and_the_failure(reference):
    table = {row["job"]: row for row in rows(reference)}
    assert list(table) == JOBS
    assert [table[j]["status"] for j in JOBS] == ["ok", "ok", "ok", "failed"]
    dense, sparse, full, failed = (table[j] for j in JOBS)
    assert dense["ppl"] > 1 and sparse["ppl"] > 1 and dense["ppl_tokens"] == sparse["ppl_tokens"] == 254
    assert full["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)  # every routed expert: the dense model
    # a tiny random model's FFN barely moves its PPL: the sparse carve differs by more than rounding does
    assert abs(sparse["ppl"] - dense["ppl"]) > 10 * abs(full["ppl"] - dense["ppl"])
    assert (
        sparse["active_fraction"] == 0.375 and sparse["neurons_per_expert"] == 16
    )  # 96 / 8, padded to 8-aligned
    assert "neuron" in failed["error"] and failed["ppl"] is None  # recorded, and the batch went on
    assert (reference / "jobs" / "llama-S1A2E128" / "error.txt").read_text().startswith("Traceback")
    for job in ("llama-S1A2E8", "llama-S1A2E128"):  # the code that ran it, also where it failed
        record = json.loads((reference / "jobs" / job / "result.json").read_text())
        assert record["versions"]["moecarve_commit"] == source_commit()
    assert (reference / "jobs" / "llama-S1A2E8" / "model" / "config.json").is_file()
    ppl_record = json.loads((reference / "jobs" / "llama-S1A2E8" / "ppl.json").read_text())
    assert ppl_record["results"][0]["model"] == str(reference / "jobs" / "llama-S1A2E8" / "model")
    markdown = (reference / "results.md").read_text()
    assert "3 of 4 jobs done" in markdown and markdown.count("\n| llama-") == 4


def test_cli_exit_status_and_dry_run(make_recipe, reference, tmp_path):
    recipe = make_recipe(tmp_path)
    result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert all(job in result.output for job in JOBS) and "4 of 4 job(s) to run" in result.output
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    # Against a finished output: the plan says what a run would skip and what it would retry.
    result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run", "--out", str(reference)])
    assert "done, skipped" in result.output and "failed, runs again" in result.output
    assert "1 of 4 job(s) to run" in result.output and result.exit_code == 0

    # What each job checks before its carve, on a model already on disk: its windows too long here.
    recipe.write_text(recipe.read_text().replace("length: 128, data", "length: 100000, data"))
    result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run"])
    assert result.exit_code == 1 and "4 of 4 job(s) to run" in result.output
    failing = [
        line for line in result.output.splitlines() if line.startswith("would fail before its carve: ")
    ]
    assert [line.split(": ")[1] for line in failing] == JOBS
    assert all("eval_ppl.length 100000 exceeds the 256 positions" in line for line in failing)
    assert not (tmp_path / "out").exists()
    # one configuration's calibration beyond the positions: that job alone (the dense job and the
    # other configurations, checked first, shared one result with it)
    recipe.write_text(
        recipe.read_text()
        .replace("length: 100000, data", "length: 128, data")
        .replace("{experts: 8, active: 7}", "{experts: 8, active: 7, calib_length: 512}")
    )
    result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run"])
    failing = [
        line for line in result.output.splitlines() if line.startswith("would fail before its carve: ")
    ]
    assert result.exit_code == 1 and len(failing) == 1
    assert "llama-S1A7E8: ValueError: carve.calib_length 512 exceeds the 256 positions" in failing[0]
    # a text from the hub is not fetched for a dry run: those jobs are checked when they run
    recipe.write_text(recipe.read_text().replace("data: eval.txt", "data: someone/some-dataset"))
    result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run"])
    assert result.exit_code == 0 and "would fail" not in result.output, result.output


def test_dry_run_checks_what_the_carve_refuses_first(
    make_recipe, reference, tiny_models, calib_file, tmp_path
):
    """A calibration text that is not UTF-8, and a source the carve cannot take (one carved
    already), passed the dry run and failed every job once it ran; an output under a file passed
    it and was refused by the run."""
    recipe = make_recipe(tmp_path)
    base = recipe.read_text()

    def failing_jobs() -> list[str]:
        result = CliRunner().invoke(batch_command, [str(recipe), "--dry-run"])
        assert result.exit_code == 1, result.output
        prefix = "would fail before its carve: "
        return [line.removeprefix(prefix) for line in result.output.splitlines() if line.startswith(prefix)]

    binary = tmp_path / "calib.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    recipe.write_text(base.replace(f"calib: {calib_file}", f"calib: {binary}"))
    failing = failing_jobs()
    assert [line.split(": ")[0] for line in failing] == JOBS[1:]  # the dense job carves nothing
    assert all("not UTF-8" in line for line in failing)
    # one configuration's own text: that job alone (the configurations share checks only on one text)
    recipe.write_text(base.replace("{experts: 8, active: 7}", f"{{experts: 8, active: 7, calib: {binary}}}"))
    assert [line.split(": ")[0] for line in failing_jobs()] == ["llama-S1A7E8"]

    carved = reference / "jobs" / "llama-S1A2E8" / "model"
    recipe.write_text(base.replace(f"path: {tiny_models['llama']}", f"path: {carved}"))
    failing = failing_jobs()
    assert [line.split(": ")[0] for line in failing] == JOBS[1:]
    assert all("glm4_moe" in line for line in failing)

    (tmp_path / "a-file").write_text("")
    recipe.write_text(base.replace("output: out", "output: a-file/out"))
    with pytest.raises(ValueError, match="a-file is a file, not a directory"):
        CliRunner().invoke(batch_command, [str(recipe), "--dry-run"], catch_exceptions=False)
    assert (tmp_path / "a-file").is_file()


def test_only_runs_one_job_by_name_or_index(make_recipe, reference, tmp_path):
    recipe = make_recipe(tmp_path)
    result = CliRunner().invoke(batch_command, [str(recipe), "--only", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "jobs").iterdir() if not p.name.startswith(".")) == ["llama-S1A2E8"]
    got = {row["job"]: row for row in rows(out)}
    want = {row["job"]: row for row in rows(reference)}
    assert got["llama-S1A2E8"] == want["llama-S1A2E8"]
    assert [got[j]["status"] for j in JOBS] == ["pending", "ok", "pending", "pending"]
    result = CliRunner().invoke(batch_command, [str(recipe), "--only", "llama-S1A2E128", "--no-progress"])
    assert result.exit_code == 1  # the job failed: recorded, and said by the exit status
    batch = runner.open_batch(recipe)
    assert batch.status(batch.jobs[3]) == "failed"
    with pytest.raises(ValueError, match="no such job"):
        runner.select(runner.open_batch(recipe), "llama-S9A9E9")


def test_output_of_another_recipe_is_refused(make_recipe, tmp_path):
    first = runner.open_batch(make_recipe(tmp_path / "a", name="first"), tmp_path / "shared")
    runner.prepare(first, [])  # claims the output
    with pytest.raises(ValueError, match="belongs to recipe 'first'"):
        runner.open_batch(make_recipe(tmp_path / "b", name="second"), tmp_path / "shared")
    stranger = tmp_path / "stranger"
    (stranger / "notes.txt").parent.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a batch output"):
        runner.open_batch(make_recipe(tmp_path / "c"), stranger)


def test_output_inside_a_model_is_refused_and_a_failed_start_leaves_no_output(
    make_recipe, tiny_models, tmp_path
):
    recipe = make_recipe(tmp_path / "r")
    with pytest.raises(ValueError, match="batch output .* is inside model"):
        runner.open_batch(recipe, tiny_models["llama"] / "runs")
    assert not (tiny_models["llama"] / "runs").exists()
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("mine")
    text = recipe.read_text().replace(str(tiny_models["llama"]), str(not_a_model))
    with pytest.raises(ValueError, match="has no config.json"):  # as the run would, and a dry run too
        runner.open_batch(make_recipe(tmp_path / "s", text=text), tmp_path / "out")
    # A model that fails only when read: the output this start made is removed, one the user made kept.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a GGUF file")
    text = recipe.read_text().replace(str(tiny_models["llama"]), str(broken))
    for made_by_user in (False, True):
        out = tmp_path / f"out-{made_by_user}"
        if made_by_user:
            out.mkdir()
        batch = runner.open_batch(make_recipe(tmp_path / "t", text=text), out)
        with pytest.raises(ValueError, match="cannot read GGUF file"):
            runner.run(batch, list(batch.jobs), progress=False)
        assert out.exists() == made_by_user and (not made_by_user or not any(out.iterdir()))
    assert (not_a_model / "notes.txt").read_text() == "mine"


def test_a_job_left_to_another_process_is_not_all_done(reference, make_recipe, tmp_path):
    """Exit status 3 when a run leaves a job running elsewhere (the table still shows it pending)."""
    out = shutil.copytree(reference, tmp_path / "out")
    recipe = make_recipe(tmp_path / "r")
    with (out / "jobs" / ".llama-S1A2E128.lock").open("a") as lock:  # the failed job, to run again
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(batch_command, [str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 3 and "running in another process (llama-S1A2E128)" in result.output


def test_a_damaged_record_is_named(reference, make_recipe, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    result_file = out / "jobs" / "llama-dense" / "result.json"
    result_file.write_text(result_file.read_text()[:40])
    with pytest.raises(ValueError, match=f"{result_file} is damaged .*: remove it"):
        runner.open_batch(make_recipe(tmp_path / "r"), out)
    result_file.unlink()
    (out / "batch.json").write_text("{")
    with pytest.raises(ValueError, match='batch.json is damaged .*: write it again as {"recipe": "tiny"}'):
        runner.open_batch(make_recipe(tmp_path / "r"), out)
    (out / "batch.json").write_text('{"recipe": "tiny"}')  # as the message says: accepted again
    runner.open_batch(make_recipe(tmp_path / "r"), out)


def test_changed_settings_of_a_finished_job_are_refused(make_recipe, reference, tmp_path):
    recipe = make_recipe(tmp_path)
    runner.open_batch(recipe, reference)  # same settings: accepted
    recipe.write_text(recipe.read_text().replace("calib_tokens: 1024", "calib_tokens: 512"))
    with pytest.raises(  # every stale job named at once: one round of removals mends them all
        ValueError,
        match=r"llama-S1A2E8 .* other settings than the recipe now gives \(carve.calib_tokens\).*"
        r"So were 1 more, whose directories go too: llama-S1A7E8 \(carve.calib_tokens\)$",
    ):
        runner.open_batch(recipe, reference)
    mistyped = recipe.read_text().replace("path: /", "path: /nonexistent/")
    (tmp_path / "mistyped.yaml").write_text(mistyped)  # a typo is named as one, not as changed settings
    with pytest.raises(FileNotFoundError, match="model llama: not found: /nonexistent/[^ ]*$"):  # as written
        runner.open_batch(tmp_path / "mistyped.yaml", reference)
    recipe.write_text(recipe.read_text().replace("calib_tokens: 512", "calib_tokens: 1024"))
    recipe.write_text(recipe.read_text().replace("windows: 2,", "windows: 3,"))
    with pytest.raises(ValueError, match=r"llama-dense .* gives \(options.eval_ppl.windows\)") as refused:
        runner.open_batch(recipe, reference)
    assert "name the changed configuration anew" not in str(refused.value).split(". So were")[0]  # none


def test_finished_jobs_whose_text_or_model_changed_since_are_refused(
    make_recipe, tiny_models, reference, tmp_path
):
    """The same recipe over the same texts in another directory is accepted; an edited text, or the
    model rewritten in place, refuses the finished jobs that read it (they would mix old and new)."""
    recipe = make_recipe(tmp_path / "a")
    runner.open_batch(recipe, reference)
    (tmp_path / "a" / "eval.txt").write_text((tmp_path / "a" / "eval.txt").read_text() + " more")
    with pytest.raises(ValueError, match=r"llama-dense .* inputs that have changed since \(eval_ppl.data\)"):
        runner.open_batch(recipe, reference)

    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    recipe = make_recipe(
        tmp_path / "b", text=recipe.read_text().replace(str(tiny_models["llama"]), str(model))
    )
    batch = runner.open_batch(recipe)
    runner.run(batch, [batch.jobs[0]], progress=False)  # the dense job
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))  # copied without its times (cp -r), or rebuilt byte for byte
    runner.open_batch(recipe)  # the same model: accepted
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    weights.write_bytes(data)  # rewritten in place
    with pytest.raises(ValueError, match=r"llama-dense .* inputs that have changed since \(model\)"):
        runner.open_batch(recipe)


def test_missing_model_fails_before_work(make_recipe, tmp_path):
    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("path: /", "path: /nonexistent/"))
    with pytest.raises(FileNotFoundError, match="model llama: not found"):
        runner.open_batch(recipe)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (("length: 128, data", "length: 512, data"), "eval_ppl.length 512 exceeds the 256 positions"),
        (("windows: 2, length: 128", "windows: 1000, length: 128"), "1000 x 128 needed"),  # text too short
        (("calib_length: 128", "calib_length: 512"), "carve.calib_length 512 exceeds the 256 positions"),
    ],
    ids=["beyond_positions", "text_too_short", "calibration_beyond_positions"],
)
def test_ppl_windows_the_model_cannot_score_fail_the_job_before_its_carve(make_recipe, tmp_path, edit, error):
    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace(*edit))
    batch = runner.open_batch(recipe)
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["status"] == "failed" and result["stages"] == {}  # the carve never ran
    assert error in result["error"]
    assert not (batch.job_dir(job) / "model").exists()


def _locks_free(jobs_dir: Path, timeout: float = 20) -> bool:
    """True once no process holds a job lock (the killed run's job processes have died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = False
        for lock in jobs_dir.glob(".*.lock"):
            with lock.open("a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                except BlockingIOError:
                    busy = True
        if not busy:
            return True
        time.sleep(0.1)
    return False


def job_results(out: Path) -> list[Path]:
    """The jobs' result.json files, not those of temporaries (`.JOB.tmp-...`) still being written:
    pathlib's glob matches hidden names."""
    return [p for p in (out / "jobs").glob("*/result.json") if not p.parent.name.startswith(".")]


def test_killed_run_resumes_to_the_uninterrupted_table(make_recipe, reference, tmp_path):
    """SIGKILL `moecarve batch --jobs 2` once its first job is done, run it again: same table."""
    recipe = make_recipe(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "moecarve.batch.cli", str(recipe), "--jobs", "2", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not job_results(out):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no job finished in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert _locks_free(out / "jobs"), "a job process outlived the killed batch"
    interrupted = [row["status"] for row in rows(out)]
    assert "pending" in interrupted, "the kill came after the last job: nothing was interrupted"
    done = [p for p in job_results(out) if json.loads(p.read_text())["status"] == "ok"]
    finished = {path: path.stat().st_mtime_ns for path in done}
    assert finished

    result = CliRunner().invoke(batch_command, [str(recipe), "--no-progress"])
    assert result.exit_code == 1, result.output  # the recipe's failing job fails again, recorded
    assert rows(out) == rows(reference)
    assert csv_rows(out) == csv_rows(reference)
    leftovers = sorted(p.name for p in (out / "jobs").iterdir() if not p.name.endswith(".lock"))
    assert leftovers == sorted(JOBS)  # nothing half-written, nothing doubled
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # done jobs were skipped


def test_interrupted_job_starts_clean(make_recipe, tmp_path):
    """What a kill leaves of a job (its temporary directory) is removed before the job runs again."""
    recipe = make_recipe(tmp_path)
    batch = runner.open_batch(recipe)
    stale = batch.output / "jobs" / ".llama-dense.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "ppl.json").write_text("{half")
    record = runner.run_job(batch, batch.jobs[0], progress=False)
    assert record["status"] == "ok" and not stale.exists()
    assert sorted(os.listdir(batch.job_dir(batch.jobs[0]))) == ["ppl.json", "result.json"]


def test_a_failed_start_after_a_model_was_built_leaves_an_output_the_rerun_accepts(
    make_recipe, tiny_models, calib_file, tmp_path
):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a GGUF file")
    text = f"""\
name: tiny
output: out
models:
  - {{name: broken, path: {broken}}}
  - {{name: built, tiny: llama}}
stages: [carve]
carve: {{calib: {calib_file}, calib_tokens: 512, calib_length: 128}}
configs: [{{experts: 8, active: 2}}]
"""
    recipe = make_recipe(tmp_path / "r", text=text)
    batch = runner.open_batch(recipe)
    with pytest.raises((ValueError, OSError)):
        runner.run(batch, list(batch.jobs), progress=False)
    assert (batch.output / "models").is_dir()  # the tiny model built before the broken one failed
    recipe.write_text(text.replace(f"  - {{name: broken, path: {broken}}}\n", ""))
    batch = runner.open_batch(recipe)  # the same recipe's output: accepted
    summary = runner.run(batch, list(batch.jobs), progress=False)
    assert summary.done == ["built-S1A2E8"]


def test_keep_models_changes_no_finished_job_and_drops_a_failed_jobs_model(
    make_recipe, reference, tmp_path, monkeypatch
):
    from moecarve.batch import stages

    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "keep_models: false\n")
    batch = runner.open_batch(recipe, reference)  # finished jobs are not "run with other settings"
    assert all(batch.status(job) == "ok" for job in batch.jobs if job.name != "llama-S1A2E128")
    # a job finished before keep_models was hashed as kept recorded `keep_model: false`: still its own
    legacy = shutil.copytree(reference, tmp_path / "legacy")
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    result = legacy / "jobs" / job.name / "result.json"
    record = json.loads(result.read_text())
    result.write_text(json.dumps({**record, "fingerprint": job._hash(keep_model=False)}))
    assert record["fingerprint"] != job._hash(keep_model=False)
    for text in (recipe.read_text().replace("keep_models: false\n", ""), recipe.read_text()):
        recipe.write_text(text)
        assert runner.open_batch(recipe, legacy).status(job) == "ok"

    def failing_eval(ctx, options):
        raise RuntimeError("eval failed after the carve")

    monkeypatch.setitem(stages.STAGES, "eval_ppl", failing_eval)
    batch = runner.open_batch(recipe, tmp_path / "fresh")
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["status"] == "failed" and "carve" in result["stages"]
    assert not (batch.job_dir(job) / "model").exists()


def test_a_model_inside_the_output_is_refused(make_recipe, tiny_models, tmp_path):
    import shutil

    inside = shutil.copytree(tiny_models["llama"], tmp_path / "out" / "models" / "llama")
    (tmp_path / "out" / "batch.json").write_text(json.dumps({"recipe": "tiny"}))  # this recipe's output
    recipe = make_recipe(
        tmp_path, text=make_recipe(tmp_path / "x").read_text().replace(str(tiny_models["llama"]), str(inside))
    )
    with pytest.raises(ValueError, match="lies inside the batch output"):
        runner.open_batch(recipe, tmp_path / "out")


def test_ppl_text_named_by_protocol_or_hub_name_is_checked_as_the_stage_reads_it(
    tiny_models, tmp_path, hub_datasets
):
    hub_datasets({"org/texts": [{"text": "the router " * 400}]})
    from transformers import AutoTokenizer

    model = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    for data in ("boolq-passages", "org/texts", None):
        runner.check_ppl_windows(model, tokenizer, {"windows": 2, "length": 128, "data": data}, tmp_path)
    with pytest.raises(ValueError, match="8 x 128 needed"):
        runner.check_ppl_windows(
            model, tokenizer, {"windows": 8, "length": 128, "data": "org/texts"}, tmp_path
        )


@pytest.mark.parametrize(
    ("setting", "carve_device", "eval_device"), [("", "cpu", None), ("device: cuda:0\n", "cuda:0", "cuda:0")]
)
def test_the_recipes_device_reaches_the_carve_and_the_evals(
    setting, carve_device, eval_device, make_recipe, tmp_path, monkeypatch
):
    """Without `device` the carve runs on the CPU and the evals where they default to (CUDA where
    present). The stages are handed the recipe's device and run here on the CPU."""
    from moecarve import devices
    from moecarve.batch import stages
    from moecarve.carve import pipeline
    from moecarve.eval import ppl, tasks

    monkeypatch.setattr(devices, "resolve_device", lambda device, stage: str(device))  # "this machine has it"
    seen = {}

    def recording(name, real):
        def run(*args, **kwargs):
            seen[name] = kwargs["device"]
            return real(*args, **{**kwargs, "device": "cpu"})

        return run

    for module, name in ((pipeline, "carve"), (ppl, "evaluate_ppl")):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + setting)
    batch = runner.open_batch(recipe)
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    assert batch.result(job)["status"] == "ok"
    assert seen == {"carve": carve_device, "evaluate_ppl": eval_device}
    # the tasks stage, on its own: lm-eval's run is not needed to see what it is handed
    monkeypatch.setattr(
        tasks, "evaluate_tasks", lambda *args, **kwargs: seen.update(tasks=kwargs["device"]) or {"tasks": {}}
    )
    ctx = stages.Context(job, tmp_path, tmp_path, tmp_path, tmp_path, False, batch.loaded.recipe.device)
    stages.STAGES["eval_tasks"](ctx, {"tasks": ["piqa"], "limit": 1, "batch_size": 1})
    assert seen["tasks"] == eval_device
    # the training stages, on their own: each hands the device to its trainer (and ESFT to its scoring)
    from moecarve.esft import score, select, train
    from moecarve.tune import recover

    class Handed(Exception):
        pass

    def handed(name):
        def run(*args, **kwargs):
            seen[name] = kwargs["device"]
            raise Handed

        return run

    monkeypatch.setattr(recover, "recover", handed("recover"))
    monkeypatch.setattr(score, "score", lambda *args, **kwargs: seen.update(esft_score=kwargs["device"]))
    monkeypatch.setattr(select, "select", lambda *args: {})
    monkeypatch.setattr(train, "train", handed("esft_train"))
    with pytest.raises(Handed):
        stages.STAGES["recover"](ctx, {"data": None, "steps": 1})
    (tmp_path / "task.jsonl").write_text('{"text": "a b"}\n')
    with pytest.raises(Handed):
        stages.STAGES["esft"](
            ctx, {"data": "task.jsonl", "score": "token", "p": 0.5, "tokens": 8, "steps": 1}
        )
    assert (seen["recover"], seen["esft_score"], seen["esft_train"]) == (eval_device,) * 3


def test_a_gpu_recipe_is_planned_anywhere_and_refused_at_its_run_where_there_is_no_gpu(make_recipe, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "device: cuda\n")
    line = recipe.read_text().splitlines().index("device: cuda") + 1
    batch = runner.open_batch(recipe)
    assert "device cuda" in runner.plan_text(batch, list(batch.jobs))  # --dry-run on a login node
    with pytest.raises(
        RecipeError, match=rf"recipe.yaml:{line}: device: CUDA is not available on this machine; use cpu$"
    ):
        runner.run(batch, list(batch.jobs), progress=False)
    assert not batch.output.exists()


def test_bf16_training_the_trainer_cannot_autocast_is_refused_before_any_job(
    make_recipe, tmp_path, monkeypatch
):
    """Without `device` on a machine of two GPUs the Trainer would train under DataParallel, which it
    does not autocast: refused when the batch runs, before any job (its carve) starts."""
    recipe = make_recipe(tmp_path)
    text = recipe.read_text().replace("[carve, eval_ppl]", "[carve, recover, eval_ppl]")
    recipe.write_text(text + "recover: {steps: 1, precision: bf16}\n")
    batch = runner.open_batch(recipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        RecipeError, match=r"recipe.yaml:\d+: recover.precision: --precision bf16: .*DataParallel"
    ):
        runner.run(batch, list(batch.jobs), progress=False)
    assert not batch.output.exists()


def test_jobs_processes_share_the_gpus_of_a_cuda_recipe_out(make_recipe, tmp_path, monkeypatch):
    """`--jobs N` with `device: cuda` on a machine of several GPUs gives each job process one GPU (the
    one fewest running jobs use); with one GPU, or a recipe naming cuda:N, the processes are left alone."""
    recipe = make_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "device: cuda\n")
    batch = runner.open_batch(recipe)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runner.gpu_slots(batch) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the user's own choice of GPUs is shared out
    assert runner.gpu_slots(batch) == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert runner.gpu_slots(batch) is None

    class Process:  # the first job runs for a while, the others end at once (as busy elsewhere: 3)
        def __init__(self, polls):
            self.polls = polls

        def poll(self):
            self.polls -= 1
            return None if self.polls > 0 else 3

    spawned = []

    def spawn(batch, job, gpu=None):
        spawned.append(gpu)
        return Process(polls=4 if len(spawned) == 1 else 1)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(runner, "_spawn", spawn)
    summary = runner.Summary([], [], [], [])
    runner._drive(batch, list(batch.jobs), {}, 2, summary, type("Bar", (), {"update": lambda self: None})())
    assert spawned == ["0", "1", "1", "1"] and len(summary.busy) == 4  # the first kept GPU 0 throughout
    spawned.clear()
    recipe.write_text(recipe.read_text().replace("device: cuda\n", "device: cuda:1\n"))
    runner._drive(
        runner.open_batch(recipe),
        list(batch.jobs),
        {},
        2,
        summary,
        type("Bar", (), {"update": lambda self: None})(),
    )
    assert spawned == [None] * 4
    monkeypatch.undo()  # the real _spawn, with Popen recorded
    popen = []
    monkeypatch.setattr(runner.subprocess, "Popen", lambda command, **kwargs: popen.append(kwargs.get("env")))
    (batch.output / "logs").mkdir(parents=True)
    runner._spawn(batch, batch.jobs[0], "1")
    runner._spawn(batch, batch.jobs[0])
    assert popen[0]["CUDA_VISIBLE_DEVICES"] == "1" and popen[1] is None


def test_a_recover_stage_trains_each_carve_and_the_evals_score_what_it_trained(
    make_recipe, calib_file, tmp_path
):
    text = make_recipe(tmp_path).read_text()
    text = text.replace("stages: [carve, eval_ppl]", "stages: [carve, recover, eval_ppl]")
    text += f"recover: {{steps: 2, batch_size: 2, length: 32, data: {calib_file}}}\nkeep_models: false\n"
    recipe = make_recipe(tmp_path, text=text)
    batch = runner.open_batch(recipe)
    assert [job.stages for job in batch.jobs][:2] == [("eval_ppl",), ("carve", "recover", "eval_ppl")]
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["status"] == "ok", result["error"]
    assert result["columns"]["recover_steps"] == 2 and result["columns"]["recover_loss"] > 0
    ppl = json.loads((batch.job_dir(job) / "ppl.json").read_text())["results"][0]
    assert ppl["name"] == "S1A2E8+recover"  # the recovered model, as carve.json's tune list names it
    assert not any(
        (batch.job_dir(job) / name).exists() for name in ("model", "recovered", "recover-checkpoints")
    )
    row = next(r for r in rows(batch.output) if r["job"] == job.name)
    assert row["recover_loss"] == result["columns"]["recover_loss"]
    assert len(result["stages"]["recover"]["train_loss"]) >= 1 and "recover.data" in result["inputs"]
    # sequences longer than the model's positions fail the job before its carve, naming the setting
    recipe.write_text(recipe.read_text().replace("length: 32, data", "length: 512, data"))
    batch = runner.open_batch(recipe, tmp_path / "too-long")
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["status"] == "failed" and result["stages"] == {}
    assert "recover.length 512 exceeds the 256 positions" in result["error"]
    # a kept recovered checkpoint's record names where its carve lies after the job, not before
    recipe.write_text(
        recipe.read_text().replace("length: 512, data", "length: 32, data").replace("keep_models: false", "")
    )
    batch = runner.open_batch(recipe, tmp_path / "kept")
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    recorded = json.loads((batch.job_dir(job) / "recovered" / "carve.json").read_text())["tune"][0]["model"]
    assert recorded == str(batch.job_dir(job) / "model") and Path(recorded).is_dir()


def test_an_esft_stage_after_the_recovery_specialises_the_model_the_evals_score(
    make_recipe, calib_file, tmp_path, monkeypatch, capfd
):
    from transformers.utils import logging as hf_logging

    from tests.conftest import sample_text

    task = tmp_path / "task.jsonl"
    rows = [
        {"prompt": sample_text(12, seed=100 + i) + " ?", "response": " " + sample_text(4, seed=200 + i)}
        for i in range(16)
    ]
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = (
        make_recipe(tmp_path)
        .read_text()
        .replace("stages: [carve, eval_ppl]", "stages: [carve, recover, esft, eval_ppl]")
    )
    text += f"recover: {{steps: 2, batch_size: 2, length: 32, data: {calib_file}}}\n"
    text += "esft: {data: task.jsonl, steps: 2, batch_size: 2, max_length: 64, tokens: 512, p: 0.5, "
    text += "train_shared: true, mix_general: general.txt, mix_ratio: 0.2}\nkeep_models: false\n"
    (tmp_path / "general.txt").write_text(sample_text(2000, seed=5))
    recipe = make_recipe(tmp_path, text=text)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the recipe's files are found beside it, not here
    batch = runner.open_batch(recipe)
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    assert batch.jobs[0].stages == ("eval_ppl",)  # the dense job evaluates the source only
    capfd.readouterr()
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["status"] == "ok", result["error"]
    # --no-progress: no bar from loading or writing weights, nor the Trainer's; afterwards as before
    bars = [line for line in capfd.readouterr().err.splitlines() if "|" in line and "%" in line]
    assert bars == [] and hf_logging.is_progress_bar_enabled()
    columns, record = result["columns"], result["stages"]["esft"]
    assert 0 < columns["esft_experts"] == record["selected"]
    # the fraction counts all that trained: here the shared experts too, beyond the selected ones
    assert record["fraction_of_model"] < columns["esft_fraction"] < 1
    assert {"esft.data", "esft.mix_general"} <= set(result["inputs"]) and record["training"]["steps"] == 2
    ppl = json.loads((batch.job_dir(job) / "ppl.json").read_text())["results"][0]
    assert ppl["name"] == "S1A2E8+recover+esft"  # what the evals scored: the carve, recovered, specialised
    left = sorted(p.name for p in batch.job_dir(job).iterdir())
    assert left == [
        "carve.json",
        "esft-experts.json",
        "esft-scores.json",
        "esft-scores.png",
        "ppl.json",
        "result.json",
    ]
    # task data that does not parse fails the job before its carve
    task.write_text("{not json\n")
    batch = runner.open_batch(recipe, tmp_path / "bad-task")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert (
        result["status"] == "failed"
        and result["stages"] == {}
        and result["error"].startswith("ValueError: esft: ")
    )
    # sequences beyond the model's positions, too: named by their setting
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe.write_text(recipe.read_text().replace("max_length: 64", "max_length: 100000"))
    batch = runner.open_batch(recipe, tmp_path / "too-long")
    job = next(j for j in batch.jobs if j.name == "llama-S1A2E8")
    runner.run(batch, [job], progress=False)
    result = batch.result(job)
    assert result["stages"] == {} and "esft.max_length 100000 exceeds the 256 positions" in result["error"]


def test_records_name_the_final_directory_also_where_json_escapes_its_name(tmp_path):
    from moecarve.batch import stages

    work, final = tmp_path / ".job-é.tmp-1", tmp_path / "job-é"
    (work / "esft-merged").mkdir(parents=True)
    for path in (work / "ppl.json", work / "esft-merged" / "esft.json"):
        path.write_text(json.dumps({"model": str(work / "model")}))  # ensure_ascii: "\u00e9"
    ctx = stages.Context(None, work, work, work, tmp_path, False)
    stages.finish(ctx, final, keep_model=True)
    for path in (work / "ppl.json", work / "esft-merged" / "esft.json"):
        assert json.loads(path.read_text()) == {"model": str(final / "model")}


def test_no_progress_prints_nothing_from_building_to_the_tasks(tmp_path, capfd, calib_file):
    """--no-progress: no bar and no stray line from building a tiny model, the carve, the evals
    (lm-eval's own bars too); the only output is the batch's own line."""
    text = f"""\
name: quiet
output: out
models:
  - {{name: t, tiny: llama}}
stages: [carve, eval_ppl, eval_tasks]
carve: {{calib: {calib_file}, calib_tokens: 256, calib_length: 64}}
configs: [{{experts: 4, active: 2}}]  # no padding (96 / 4 = 24): its warning would be a line too
eval_ppl: {{windows: 2, length: 64, data: {calib_file}}}
eval_tasks: {{tasks: [boolq], limit: 2}}
"""
    (tmp_path / "recipe.yaml").write_text(text)
    capfd.readouterr()
    result = CliRunner().invoke(batch_command, [str(tmp_path / "recipe.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"1 done, 0 failed; table: {tmp_path / 'out' / 'results.md'}"]
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""


def test_a_job_process_that_refuses_its_input_says_why_in_the_table(make_recipe, tmp_path, monkeypatch):
    """A job process reads the recipe anew: edited since the run started, it refuses (status 2), and
    the job's recorded error quotes its one-line reason, not only the status."""
    batch = runner.open_batch(make_recipe(tmp_path))
    (batch.output / "logs").mkdir(parents=True)
    job = batch.jobs[1]
    reason = "error: job llama-dense in out was run with other settings than the recipe now gives"
    (batch.output / "logs" / f"{job.name}.log").write_text(f"warning: something\n{reason}\n")
    monkeypatch.setattr(
        runner, "_spawn", lambda batch, job, gpu=None: type("P", (), {"poll": lambda self: 2})()
    )
    summary = runner.Summary([], [], [], [])
    runner._drive(batch, [job], {}, 2, summary, type("Bar", (), {"update": lambda self: None})())
    assert summary.failed == [job.name]
    assert (
        batch.result(job)["error"] == f"job process exited with status 2: {reason} (see logs/{job.name}.log)"
    )


def test_the_tables_timing_columns_keep_one_order_whichever_job_finished_first():
    """A script reading results.csv by position sees the same columns after every run."""
    from moecarve.batch.table import columns

    dense = {"job": "d", "status": "done", "ppl": 18.0, "error": None, "seconds": 3.0}
    carved = {"job": "c", "status": "done", "ppl": 40.0, "error": None, "carve_seconds": 2.0, "seconds": 5.0}
    assert columns([carved, dense])[-2:] == columns([dense, carved])[-2:] == ["seconds", "carve_seconds"]


def test_paths_found_only_from_the_working_directory_are_refused(
    make_recipe, tiny_models, tmp_path, monkeypatch
):
    """`m/tiny` looks like a hub id: not found beside the recipe, it was opened from the working
    directory (never fingerprinted as a local model), and a text without a suffix likewise."""
    import shutil

    from moecarve.batch.recipe import RecipeError

    recipe = make_recipe(tmp_path / "rec")
    elsewhere = tmp_path / "cwd"
    shutil.copytree(tiny_models["llama"], elsewhere / "m" / "tiny")
    monkeypatch.chdir(elsewhere)
    text = recipe.read_text()
    (tmp_path / "rec" / "model.yaml").write_text(
        text.replace(f"path: {tiny_models['llama']}", "path: m/tiny")
    )
    with pytest.raises(FileNotFoundError, match="model llama: not found: m/tiny .*relative to the recipe"):
        runner.open_batch(tmp_path / "rec" / "model.yaml")
    (elsewhere / "m" / "text").write_text("words")
    (tmp_path / "rec" / "text.yaml").write_text(text.replace("data: eval.txt", "data: m/text"))
    with pytest.raises(RecipeError, match="eval_ppl.data: not found: m/text .*relative to the recipe"):
        runner.open_batch(tmp_path / "rec" / "text.yaml")
    assert not (tmp_path / "rec" / "out").exists()


def test_a_reordered_list_is_a_changed_setting_but_recovers_parts():
    """recover's default parts were once stored router, lora: the same training, not named. Other
    lists (LoRA targets, tasks) change the fingerprint when reordered, so they are named."""
    recorded = {"options": {"recover": {"train": ["router", "lora"], "lora_targets": ["q_proj", "v_proj"]}}}
    now = {"options": {"recover": {"train": ["lora", "router"], "lora_targets": ["v_proj", "q_proj"]}}}
    assert runner._changed(recorded, now) == "options.recover.lora_targets"
