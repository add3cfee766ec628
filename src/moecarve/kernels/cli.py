"""`moecarve kernels tune MODEL`: time the kernels for MODEL's MoE shape on this GPU and write the
table that `moe_ffn(path="auto")` follows there (tuning.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
BATCHES = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"
MAX_TOKENS = 65536


@click.group("kernels", context_settings=CONTEXT)
def group():
    """The Triton MoE kernels: tune them for this GPU."""


@group.command("tune")
@click.argument("model")
@click.option("--batches", default=BATCHES, show_default=True, help="comma-separated token counts")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="weight dtype the model will run in [default: its config's if bf16/fp16, else bfloat16]",
)
@click.option(
    "--quick", is_flag=True, help="each path's built-in tiles only: which path is fastest per batch"
)
@click.option(
    "--reps", type=click.IntRange(3), default=20, show_default=True, help="timed replays per candidate"
)
@click.option(
    "--out",
    default=None,
    help="table directory [default: first of $MOECARVE_KERNEL_CONFIGS, else $XDG_CACHE_HOME/moecarve/kernels]",
)
@click.option(
    "--device",
    default="cuda",
    show_default=True,
    help="cuda, cuda:1 ...; cpu only checks the command (TRITON_INTERPRET=1)",
)
@click.option(
    "--experts-interface",
    is_flag=True,
    help='also tune the routed experts alone, as experts_implementation="moecarve" runs them',
)
def tune_command(model, batches, dtype, quick, reps, out, device, experts_interface):
    """Time the decode, dense and grouped paths and their tiles for MODEL's MoE blocks over batch
    sizes on this GPU (random weights of MODEL's shape), and write the fastest per batch."""
    from moecarve.carve.writer import check_can_make, model_directory_of

    from .tuner import check_device, model_shapes, save_table, tune
    from .tuning import config_dirs, default_dir, device_name

    try:
        sizes = sorted({int(b) for b in batches.split(",") if b.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_TOKENS:
        raise click.BadParameter(
            f"expected comma-separated integers from 1 to {MAX_TOKENS}, got {batches!r}",
            param_hint="--batches",
        )
    shapes = model_shapes(model, dtype)
    dtype = shapes[0].dtype
    if experts_interface:  # transformers' experts interface passes no shared expert: another shape
        shapes = list(
            dict.fromkeys([*shapes, *(dataclasses.replace(s, shared_intermediate=0) for s in shapes)])
        )
    dev = check_device(device, dtype)
    dirs = config_dirs()
    out_dir = Path(out).expanduser() if out else dirs[0] if dirs else default_dir()
    check_can_make(out_dir / "table.json")  # refused before the timing; nothing is created
    inside = model_directory_of(out_dir)  # this model's, or another's: a config.json beside weights
    weights = inside is not None and any(
        next(inside.glob(f"*.{k}"), None) for k in ("safetensors", "bin", "gguf")
    )
    if inside is not None and (inside == Path(model).expanduser().resolve() or weights):
        raise ValueError(
            f"tables directory {out_dir} is in the model directory {inside}; give --out elsewhere"
        )
    if out_dir.resolve() not in [d.resolve() for d in dirs]:
        click.echo(
            f"note: `auto` does not read {out_dir}; add it to $MOECARVE_KERNEL_CONFIGS to use the table",
            err=True,
        )
    made_by = (
        f"moecarve kernels tune {model} --batches {','.join(map(str, sizes))} --dtype {dtype} --reps {reps}"
    )
    made_by += " --quick" * quick + " --experts-interface" * experts_interface
    tables = {}
    for shape in shapes:  # every shape timed before anything is written
        click.echo(f"{shape} on {device_name(dev)}")
        try:
            tables[shape] = tune(
                shape, sizes, device=str(dev), quick=quick, reps=reps, log=lambda m: click.echo(m, err=True)
            )
        except RuntimeError as err:
            raise click.ClickException(str(err)) from None
    for shape, table in tables.items():
        click.echo(f"{'batch':>6} {'path':<8} {'us':>9} {'dense FFN us':>13} {'x dense':>8}")
        for b, e in table.items():
            ratio = e["dense_ffn_us"] / e["median_us"]
            click.echo(
                f"{b:>6} {e['path']:<8} {e['median_us']:>9.1f} {e['dense_ffn_us']:>13.1f} {ratio:>8.2f}"
            )
        click.echo(f"wrote {save_table(table, shape, out_dir, dev, made_by)}")
