"""A small recipe over the tiny Llama: a dense baseline, two carves and one that must fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import sample_text

RECIPE = """\
name: {name}
output: out
models:
  - {{name: llama, path: {model}}}
dense: true
stages: [carve, eval_ppl]
carve: {{calib: {calib}, calib_tokens: 1024, calib_length: 128}}
configs:
  - {{experts: 8, active: 2}}
  - {{experts: 8, active: 7}}      # every routed expert: the dense model's PPL
  - {{experts: 128, active: 2}}    # 128 experts of 96 neurons: fails inside the carve
eval_ppl: {{windows: 2, length: 128, data: eval.txt}}
"""
JOBS = ["llama-dense", "llama-S1A2E8", "llama-S1A7E8", "llama-S1A2E128"]


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaltext") / "eval.txt"
    path.write_text(sample_text(1500, seed=3))
    return path


@pytest.fixture
def make_recipe(tiny_models, calib_file, eval_text):
    """make_recipe(directory, name="tiny") writes the recipe (and its eval text) into `directory`."""

    def make(directory: Path, name: str = "tiny", text: str | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "eval.txt").write_text(eval_text.read_text())  # relative to the recipe file
        path = directory / "recipe.yaml"
        body = text or RECIPE.format(name=name, model=tiny_models["llama"], calib=calib_file)
        path.write_text(body)
        return path

    return make


@pytest.fixture(scope="module")
def reference(tiny_models, calib_file, eval_text, tmp_path_factory) -> Path:
    """An uninterrupted in-process run of the recipe: its output directory."""
    from moecarve.batch import runner

    directory = tmp_path_factory.mktemp("reference")
    (directory / "eval.txt").write_text(eval_text.read_text())
    path = directory / "recipe.yaml"
    path.write_text(RECIPE.format(name="tiny", model=tiny_models["llama"], calib=calib_file))
    batch = runner.open_batch(path)
    runner.run(batch, list(batch.jobs), progress=False)
    return batch.output
