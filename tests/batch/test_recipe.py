"""Recipe validation: every malformed recipe fails before any work, naming the file, line and key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from moecarve.batch.recipe import RecipeError, load_recipe

GOOD = """\
name: sweep
output: out
models:
  - {name: m, path: some/model}
stages: [carve, eval_ppl]
configs:
  - {experts: 8, active: 2}
  - {experts: 16, active: 4, shared: 2}
eval_ppl: {windows: 4, length: 128}
"""

# (what to change in GOOD, expected line, expected text in the message)
BAD = {
    "unknown top-level key": (("output: out", "output: out\noutptu: x"), 3, "outptu: unknown key"),
    "unknown carve setting in a configuration": (
        ("{experts: 16, active: 4, shared: 2}", "{experts: 16, activ: 4, shared: 2}"),
        8,
        "configs[1].activ: unknown carve setting",
    ),
    "wrong type": (("{experts: 8, active: 2}", "{experts: eight, active: 2}"), 7, "configs[0].experts"),
    "a boolean for a number": (
        ("windows: 4", "windows: true"),
        9,
        "eval_ppl.windows: Input should be a valid integer",
    ),
    "a boolean for a carve count": (
        ("{experts: 8, active: 2}", "{experts: 8, active: true}"),
        7,
        "configs[0].active: Input should be a valid integer",
    ),
    "a word for a stage's switch": (
        (
            "[carve, eval_ppl]",
            "[carve, recover, eval_ppl]\nrecover: {steps: 2, gradient_checkpointing: 'no'}",
        ),
        6,
        "recover.gradient_checkpointing: Input should be a valid boolean",
    ),
    "a boolean in the shared carve section, named there": (
        ("configs:\n", "carve: {router_ridge: true}\nconfigs:\n"),
        6,
        "carve.router_ridge: Input should be a valid number",
    ),
    "a word for a boolean": (
        ("output: out", "output: out\nkeep_models: 'no'"),
        3,
        "keep_models: Input should be a valid boolean",
    ),
    "impossible configuration": (
        ("{experts: 8, active: 2}", "{experts: 8, active: 8}"),
        7,
        "exceeds --experts 8",
    ),
    "unknown stage": (("[carve, eval_ppl]", "[carve, eval_pl]"), 5, "stages[1]"),
    "stages out of order": (("[carve, eval_ppl]", "[eval_ppl, carve]"), 1, "in the order"),
    "missing models": (("models:\n  - {name: m, path: some/model}\n", ""), 1, "models: missing"),
    "model with two sources": (("path: some/model}", "path: some/model, tiny: llama}"), 4, "exactly one"),
    "unknown tiny family": (("path: some/model}", "tiny: gemma}"), 4, "models[0].tiny"),
    "model name with a slash": (("{name: m,", "{name: a/b,"), 4, "models[0].name"),
    "bad ppl option": (("{windows: 4, length: 128}", "{windows: 0, length: 128}"), 9, "eval_ppl.windows"),
    "duplicate key": (("name: sweep", "name: sweep\nname: other"), 2, "name: duplicate key"),
    "duplicate configuration": (
        ("{experts: 16, active: 4, shared: 2}", "{experts: 8, active: 2}"),
        8,
        "is used twice",
    ),
    "settings for a stage not run": (
        ("eval_ppl: {windows", "eval_tasks: {tasks: [piqa]}\neval_ppl: {windows"),
        1,
        "eval_tasks is not in stages",
    ),
    "unknown task": (
        ("[carve, eval_ppl]", "[carve, eval_ppl, eval_tasks]\neval_tasks: {tasks: [piqa, pika]}"),
        6,
        "unknown task 'pika'",
    ),
    "not YAML": (("  - {experts: 8, active: 2}", "  - {experts: 8, active: 2"), 8, "not valid YAML"),
    "missing calibration file": (
        ("{experts: 8, active: 2}", "{experts: 8, active: 2, calib: texts/missing.txt}"),
        7,
        "configs[0].calib: not found: texts/missing.txt",
    ),
    "calibration not a path": (("{experts: 8, active: 2}", "{experts: 8, active: 2, calib: 5}"), 7, "got 5"),
    "unknown device": (
        ("output: out", "output: out\ndevice: tpu"),
        3,
        "device: expected cpu, cuda or cuda:N",
    ),
    "device no batch runs on": (
        ("output: out", "output: out\ndevice: mps"),
        3,
        "device: a batch runs on cpu or cuda",
    ),
    "recover without its section": (
        ("[carve, eval_ppl]", "[carve, recover, eval_ppl]"),
        1,
        "needs carve in stages and its `recover:` section",
    ),
    "recover settings without the stage": (
        ("eval_ppl: {windows", "recover: {steps: 2}\neval_ppl: {windows"),
        1,
        "recover is not in stages",
    ),
    "bad recover setting": (
        ("[carve, eval_ppl]", "[carve, recover, eval_ppl]\nrecover: {steps: 0}"),
        6,
        "recover.steps",
    ),
    "unknown recover setting": (
        ("[carve, eval_ppl]", "[carve, recover, eval_ppl]\nrecover: {steps: 2, step: 5}"),
        6,
        "recover.step: unknown key",
    ),
    "missing recover text": (
        ("[carve, eval_ppl]", "[carve, recover, eval_ppl]\nrecover: {steps: 2, data: gone.txt}"),
        6,
        "recover.data: not found",
    ),
    "esft without its data": (
        ("[carve, eval_ppl]", "[carve, esft, eval_ppl]\nesft: {steps: 2}"),
        6,
        "esft.data: missing",
    ),
    "esft data not a file": (
        ("[carve, eval_ppl]", "[carve, esft, eval_ppl]\nesft: {data: task.jsonl}"),
        6,
        "esft.data: not a file: task.jsonl",
    ),
    "esft without its section": (
        ("[carve, eval_ppl]", "[carve, esft, eval_ppl]"),
        1,
        "needs carve in stages and its `esft:` section",
    ),
    "missing ppl text": (
        ("{windows: 4, length: 128}", "{windows: 4, length: 128, data: ./gone.txt}"),
        9,
        "eval_ppl.data: not found",
    ),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_good_recipe_expands_models_x_configs(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD + "dense: true\n"))
    assert [job.name for job in loaded.jobs] == ["m-dense", "m-S1A2E8", "m-S2A4E16"]
    assert loaded.jobs[0].stages == ("eval_ppl",) and loaded.jobs[0].carve is None
    assert loaded.jobs[2].carve.active_fraction == 6 / 16
    assert loaded.output() == tmp_path / "out"  # relative to the recipe file, not the working directory
    home = load_recipe(write(tmp_path, GOOD.replace("output: out", "output: ~/sweep")))
    assert home.output() == Path.home() / "sweep"  # was a directory named `~` beside the recipe


def test_text_settings_found_relative_to_the_recipe_or_named_as_hub_datasets(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "c.txt").write_text("text")
    text = GOOD.replace("{experts: 8, active: 2}", "{experts: 8, active: 2, calib: texts/c.txt}")
    text = text.replace(
        "{experts: 16, active: 4, shared: 2}", "{experts: 16, active: 4, shared: 2, calib: wikitext}"
    )
    assert [job.calib for job in load_recipe(write(tmp_path, text)).jobs] == ["texts/c.txt", "wikitext"]


def test_shared_defaults_then_model_then_configuration(tmp_path):
    text = GOOD.replace("{name: m, path: some/model}", "{name: m, path: some/model, carve: {seed: 2}}")
    text = text.replace("{experts: 8, active: 2}", "{experts: 8, active: 2, seed: 3}")
    text += "carve: {seed: 1, calib_length: 64, calib_tokens: 640}\n"
    jobs = load_recipe(write(tmp_path, text)).jobs
    assert [job.carve.seed for job in jobs] == [3, 2]
    assert {job.carve.calib_length for job in jobs} == {64}


def test_fingerprint_follows_the_settings(tmp_path):
    first = load_recipe(write(tmp_path, GOOD)).jobs
    again = load_recipe(write(tmp_path, GOOD)).jobs
    changed = load_recipe(write(tmp_path, GOOD.replace("length: 128", "length: 64"))).jobs
    assert [j.fingerprint for j in first] == [j.fingerprint for j in again]
    assert all(a.fingerprint != b.fingerprint for a, b in zip(first, changed, strict=True))
    elsewhere = load_recipe(write(tmp_path, GOOD + "device: cpu\n")).jobs  # where it runs: no result
    assert [j.fingerprint for j in first] == [j.fingerprint for j in elsewhere]


def test_a_preset_is_spelled_out_at_its_level_and_its_name_is_not_fingerprinted(tmp_path):
    entries = "{experts: 8, active: 2, preset: fast, calib_length: 64}"
    text = GOOD.replace("{experts: 8, active: 2}", entries) + "carve: {calib_tokens: 640, refine_iters: 1}\n"
    fast, other = load_recipe(write(tmp_path, text)).jobs
    # the entry's preset overrides the shared settings; the entry's own calib_length overrides the preset
    assert (fast.carve.calib_tokens, fast.carve.refine_iters, fast.carve.calib_length) == (2048, 2, 64)
    assert (other.carve.calib_tokens, other.carve.refine_iters) == (640, 1)  # no preset: the shared ones
    spelled_out = (
        "{experts: 8, active: 2, calib_tokens: 2048, cluster_iters: 1, refine_iters: 2, calib_length: 64}"
    )
    same, _ = load_recipe(write(tmp_path, text.replace(entries, spelled_out))).jobs
    assert same.carve.preset == "quality" and same.fingerprint == fast.fingerprint
    # a later level's `quality` undoes an earlier level's `fast`
    undone = GOOD.replace("{experts: 8, active: 2}", "{experts: 8, active: 2, preset: quality}")
    quality, fast_too = load_recipe(write(tmp_path, undone + "carve: {preset: fast}\n")).jobs
    assert (quality.carve.calib_tokens, quality.carve.refine_iters) == (16384, 6)
    assert (fast_too.carve.calib_tokens, fast_too.carve.preset) == (2048, "fast")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_names_line_and_key(tmp_path, case):
    (old, new), line, text = BAD[case]
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert text in message
    assert "\n" not in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ValueError, match="binary.yaml is not UTF-8 text"):
        load_recipe(tmp_path / "binary.yaml")


@pytest.mark.parametrize("name, jobs", [("bundled-sweep", 10), ("families", 12)])
def test_shipped_recipes_validate(name, jobs):
    loaded = load_recipe(Path(__file__).parents[2] / "recipes" / f"{name}.yaml")
    assert len(loaded.jobs) == jobs
    assert all(job.stages[-2:] == ("eval_ppl", "eval_tasks") for job in loaded.jobs)


@pytest.mark.parametrize(
    ("recover", "eval_ppl", "message"),
    [
        (
            "{steps: 2, data: hub_texts}",
            "{windows: 4, length: 128, data: hub_texts}",
            "the text eval_ppl scores",
        ),
        ("{steps: 2}", "{windows: 32, length: 2048}", "last 65536 tokens, training holds out only 32768"),
    ],
    ids=["same_text", "passages_beyond_the_hold_out"],
)
def test_a_recovery_that_would_train_on_the_scored_tokens_is_refused(tmp_path, recover, eval_ppl, message):
    text = GOOD.replace("[carve, eval_ppl]", "[carve, recover, eval_ppl]")
    text = text.replace("eval_ppl: {windows: 4, length: 128}", f"eval_ppl: {eval_ppl}\nrecover: {recover}")
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=rf"^{path}:10: recover.data: .*{message}"):
        load_recipe(path)
    apart = text.replace(f"recover: {recover}", "recover: {steps: 2, data: other_texts}")
    assert load_recipe(write(tmp_path, apart)).jobs  # another text: accepted


def test_recover_settings_leave_the_dense_jobs_fingerprints_alone(tmp_path):
    text = (
        GOOD.replace("[carve, eval_ppl]", "[carve, recover, eval_ppl]") + "dense: true\nrecover: {steps: 2}\n"
    )
    two = load_recipe(write(tmp_path, text)).jobs
    three = load_recipe(write(tmp_path, text.replace("steps: 2", "steps: 3"))).jobs
    assert two[0].name == "m-dense" and two[0].stages == ("eval_ppl",)
    assert two[0].fingerprint == three[0].fingerprint
    assert all(a.fingerprint != b.fingerprint for a, b in zip(two[1:], three[1:], strict=True))


def test_training_settings_that_decide_no_result_leave_the_fingerprints_alone(tmp_path):
    """Gradient checkpointing recomputes the same values; precision fp32 is what jobs run before the
    setting existed trained in: neither makes a finished job stale. bf16 does."""
    (tmp_path / "task.jsonl").write_text('{"text": "a b c"}\n')
    text = GOOD.replace("[carve, eval_ppl]", "[carve, recover, esft, eval_ppl]")
    text += "recover: {steps: 2%s}\nesft: {data: task.jsonl, steps: 2%s}\n"

    def fingerprints(recover="", esft=""):
        return [job.fingerprint for job in load_recipe(write(tmp_path, text % (recover, esft))).jobs]

    plain = fingerprints()
    jobs = load_recipe(write(tmp_path, text % ("", ""))).jobs
    for job, fingerprint in zip(jobs, plain, strict=True):  # as the job hashed before the settings existed
        new = ("precision", "gradient_checkpointing")
        options = {
            stage: {k: v for k, v in settings.items() if k not in new}
            for stage, settings in job.options.items()
        }
        assert dataclasses.replace(job, options=options).fingerprint == fingerprint
    for setting in (", precision: fp32", ", gradient_checkpointing: true"):
        assert fingerprints(setting, setting) == plain
    assert fingerprints(", save_every: 7") == plain  # how often recover checkpoints
    for job in jobs:  # jobs finished before save_every was left out hashed it: still their own
        hashed_before = job._hash(keep_model=True, save_every=True)
        assert hashed_before != job.fingerprint and hashed_before in job.fingerprints
    for recover, esft in ((", precision: bf16", ""), ("", ", precision: bf16")):
        assert all(a != b for a, b in zip(fingerprints(recover, esft), plain, strict=True))
    # recover's default parts written out, in either order: the same jobs (the default was stored
    # router, lora and given ones sorted, so writing it out made finished jobs stale)
    assert fingerprints(", train: [router, lora]") == plain == fingerprints(", train: [lora, router]")
    # jobs finished with the default stored in its old order (router, lora) keep their fingerprints:
    # these two are what 84d3a2d's code hashed this recipe's jobs as
    old = GOOD.replace("[carve, eval_ppl]", "[carve, recover, eval_ppl]") + "recover: {steps: 2}\n"
    old_jobs = load_recipe(write(tmp_path, old)).jobs
    recorded_by_84d3a2d = ["778219af3e64bfdf", "011378bb4a648e48"]
    assert [job.fingerprint for job in old_jobs] != recorded_by_84d3a2d
    assert all(fp in job.fingerprints for fp, job in zip(recorded_by_84d3a2d, old_jobs, strict=True))


@pytest.mark.parametrize(
    ("setting", "message"),
    [("score: weight", "esft.score: one of token, gate"), ("p: 0", "esft.p: a fraction in (0, 1]"),
     ("tokens: 0", "esft.tokens: a positive whole number"), ("steps: 0", "esft.steps"), ("lrate: 1", "esft.lrate: unknown key"),
     ("mix_general: protocol", "esft.mix_general: esft.mix_general and esft.mix_ratio go together"),
     ("mix_ratio: 0.2", "esft.mix_ratio: esft.mix_general and esft.mix_ratio go together"),
     ("mix_general: gone.txt, mix_ratio: 0.2", "esft.mix_general: not found: gone.txt")],
)  # fmt: skip
def test_bad_esft_settings_name_their_key(tmp_path, setting, message):
    (tmp_path / "task.jsonl").write_text('{"text": "a b c"}\n')
    text = (
        GOOD.replace("[carve, eval_ppl]", "[carve, esft, eval_ppl]")
        + f"esft: {{data: task.jsonl, {setting}}}\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=rf"^{path}:10: {re.escape(message)}"):
        load_recipe(path)


def test_esft_on_the_text_eval_ppl_scores_is_refused(tmp_path):
    (tmp_path / "task.txt").write_text("a b c")
    text = GOOD.replace("[carve, eval_ppl]", "[carve, esft, eval_ppl]")
    text = text.replace(
        "eval_ppl: {windows: 4, length: 128}", "eval_ppl: {windows: 4, length: 128, data: task.txt}"
    )
    path = write(tmp_path, text + "esft: {data: ./task.txt}\n")
    with pytest.raises(RecipeError, match=rf"^{path}:10: esft.data: the text eval_ppl scores"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("general", "eval_ppl", "message"),
    [
        ("general.txt", "{windows: 4, length: 128, data: general.txt}", "the text eval_ppl scores"),
        ("protocol", "{windows: 32, length: 2048}", "last 65536 tokens, training holds out only 32768"),
        ("boolq-passages", "{windows: 32, length: 2048}", "last 65536 tokens, training holds out only 32768"),
    ],
    ids=["same_text", "passages_beyond_the_hold_out", "passages_by_their_other_name"],
)
def test_esft_general_text_that_reaches_the_scored_tokens_is_refused(tmp_path, general, eval_ppl, message):
    for name in ("task.jsonl", "general.txt", "other.txt"):
        (tmp_path / name).write_text('{"text": "a b c"}\n')
    text = GOOD.replace("[carve, eval_ppl]", "[carve, esft, eval_ppl]")
    text = text.replace("eval_ppl: {windows: 4, length: 128}", f"eval_ppl: {eval_ppl}")
    text += f"esft: {{data: task.jsonl, mix_general: {general}, mix_ratio: 0.2}}\n"
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=rf"^{path}:10: esft.mix_general: .*{message}"):
        load_recipe(path)
    apart = text.replace(f"mix_general: {general}", "mix_general: other.txt")
    assert load_recipe(write(tmp_path, apart)).jobs  # another text: accepted


def test_the_eval_ppl_stage_without_its_section_takes_its_defaults(tmp_path):
    from moecarve.batch.recipe import PplOptions

    text = GOOD.split("eval_ppl:")[0]
    assert "eval_ppl" in text  # in stages
    jobs = load_recipe(write(tmp_path, text)).jobs
    assert all(job.options["eval_ppl"] == PplOptions().model_dump() for job in jobs)


def test_a_recipe_reached_through_a_symlink_names_files_beside_the_file(tmp_path, monkeypatch):
    """One directory for the checks, the output and the run: the recipe file's, not the link's."""
    from moecarve.batch.stages import recipe_path

    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.mkdir()
    (real / "recipe.yaml").write_text(GOOD + "carve: {calib: calib.txt}\n")
    (link / "recipe.yaml").symlink_to(real / "recipe.yaml")
    (link / "calib.txt").write_text("the text")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"carve.calib: not found: calib.txt \\(relative to {real}\\)"):
        load_recipe("link/recipe.yaml")
    (link / "calib.txt").rename(real / "calib.txt")
    loaded = load_recipe("link/recipe.yaml")
    assert loaded.root == real and loaded.output() == real / "out"
    assert recipe_path(loaded.root, loaded.jobs[0].calib) == str(real / "calib.txt")


def test_settings_as_yaml_writes_them_are_taken(tmp_path):
    """YAML reads `1e-4` as a string and has lists, not tuples: a strict check refused both (the
    first is what docs/tune.md tells a recipe to write), where the CLI takes them."""
    (tmp_path / "task.jsonl").write_text('{"text": "a b c"}\n')
    text = GOOD.replace("[carve, eval_ppl]", "[carve, recover, esft, eval_ppl]")
    text += "recover: {steps: 2, lr: 2e-4, warmup: 0, lora_targets: [q_proj, v_proj]}\n"
    text += "esft: {data: task.jsonl, steps: 2, lr: 1e-5}\ncarve: {router_ridge: 1e-3}\n"
    job = load_recipe(write(tmp_path, text)).jobs[0]
    assert job.options["recover"]["lr"] == 2e-4 and job.options["recover"]["lora_targets"] == [
        "q_proj",
        "v_proj",
    ]
    assert job.options["esft"]["lr"] == 1e-5 and job.carve.router_ridge == 1e-3
