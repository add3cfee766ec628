"""`moecarve batch RECIPE.yaml`: many models x configurations x stages from one resumable recipe."""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.command("batch", context_settings=CONTEXT)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "-o", default=None, help="output directory [default: the recipe's `output`]")
@click.option(
    "--dry-run", is_flag=True, help="validate, print the plan and what a run would do; write nothing"
)
@click.option(
    "--jobs",
    "-j",
    "workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="jobs at once (above 1, each job runs as its own process)",
)
@click.option(
    "--only",
    default=None,
    metavar="JOB",
    help="run just this job (its name or its index in the plan), e.g. one Slurm array task",
)
@click.option("--progress/--no-progress", default=True, help="tqdm bars over jobs and inside each")
def batch_command(recipe, out, dry_run, workers, only, progress):
    """Run every job of RECIPE (see docs/batch.md); run it again after a kill to finish the rest.

    Finished jobs are skipped, an interrupted one starts clean, a failed one is recorded and
    tried again next time. Exit status: 0 all done, 1 a job failed (with --dry-run: would fail
    before its carve), 2 bad input, 3 a job (or --only JOB) is running in another process.
    """
    from moecarve.batch import runner

    batch = runner.open_batch(recipe, out)
    jobs = runner.select(batch, only)
    if dry_run:
        click.echo(runner.plan_text(batch, jobs))
        failures = runner.dry_run_failures(batch, jobs)
        for line in failures:
            click.echo(f"would fail before its carve: {line}", err=True)
        sys.exit(1 if failures else 0)
    summary = runner.run(batch, jobs, workers=workers, progress=progress)
    click.echo(f"{runner.describe(summary)}; table: {batch.output / 'results.md'}")
    if summary.failed:
        for name in summary.failed:
            click.echo(f"failed: {name}: {batch.result(batch.jobs[_index(batch, name)])['error']}", err=True)
        sys.exit(1)
    if summary.busy:  # not all done: the table still shows them pending
        sys.exit(3)


def _index(batch, name: str) -> int:
    return [job.name for job in batch.jobs].index(name)


if __name__ == "__main__":  # how --jobs N runs each job: python -m moecarve.batch.cli RECIPE --only JOB
    from moecarve.cli import _exit_on_sigterm, _run, _short_warnings

    _exit_on_sigterm()
    _short_warnings()
    _run(batch_command)
