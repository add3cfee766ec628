"""The recipes the docs tell users to run load and plan (what `--dry-run` does) as shipped."""

from pathlib import Path

import pytest

from moecarve.batch import runner

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_plans(recipe, tmp_path):
    batch = runner.open_batch(recipe, tmp_path / "out")
    assert batch.jobs and all(batch.status(job) == "pending" for job in batch.jobs)
    assert not (tmp_path / "out").exists()  # planning writes nothing
