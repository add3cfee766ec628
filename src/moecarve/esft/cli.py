"""`moecarve esft score|select|train|merge`: parse, call the library, print."""

from __future__ import annotations

import click

from moecarve.esft.train import EsftConfig
from moecarve.tune.cli import compute_options

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _help(name: str) -> str:
    return EsftConfig.model_fields[name].description or ""


@click.group(context_settings=CONTEXT)
def group():
    """Expert-specialised fine-tuning: score experts on a task, select, train them, merge."""


@group.command("score", context_settings=CONTEXT)
@click.argument("model")
@click.option(
    "--data", required=True, help="task data: JSONL (prompt/response, messages, text) or plain text"
)
@click.option("--out", "-o", required=True, help="scores JSON (a heatmap PNG is written beside it)")
@click.option("--tokens", type=int, default=131072, show_default=True, help="task tokens to route")
@click.option("--max-length", type=int, default=512, show_default=True, help="tokens per sequence")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda if present]")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="draws the examples scored when the data exceed --tokens",
)
def score_command(model, data, out, tokens, max_length, device, seed):
    """Gate and token-selection scores of every routed expert of MODEL on the task."""
    from moecarve.esft.score import score

    record = score(model, data, out, tokens=tokens, max_length=max_length, device=device, seed=seed)
    click.echo(
        f"scored {record['tokens']} tokens in {record['sequences']} of {record['examples']} examples; wrote {out}"
    )


@group.command("select", context_settings=CONTEXT)
@click.argument("scores")
@click.option(
    "--score",
    "kind",
    type=click.Choice(["token", "gate"]),
    default="token",
    show_default=True,
    help="rank experts by token selection ratio or by average gate score",
)
@click.option("--p", type=float, default=0.2, show_default=True, help="cumulative score to reach per layer")
@click.option("--out", "-o", required=True, help="experts JSON for `esft train`")
def select_command(scores, kind, p, out):
    """Per layer, the fewest experts whose cumulative score reaches p."""
    from moecarve.esft.select import select

    r = select(scores, kind, p, out)
    click.echo(
        f"{r['selected']} of {r['routed_total']} routed experts ({r['selected'] / r['routed_total']:.1%}); "
        f"{r['trainable_parameters']:,} parameters, {r['fraction_of_model']:.2%} of the model; wrote {out}"
    )


def _mix(value: str | None) -> tuple[str | None, float]:
    if value is None:
        return None, 0.0
    text, sep, ratio = value.rpartition(":")
    try:
        if not sep or not text:
            raise ValueError
        share = float(ratio)
    except ValueError:
        raise click.BadParameter(f"expected TEXT:RATIO, got {value!r}", param_hint="--mix-general") from None
    if not 0 < share < 1:  # a NaN fails too
        raise click.BadParameter(
            f"RATIO is the general text's share of the training set, between 0 and 1 (exclusive), got {ratio}",
            param_hint="--mix-general",
        )
    return text, share


@group.command("train", context_settings=CONTEXT)
@click.argument("model")
@click.option("--experts", "experts_file", required=True, help="experts JSON from `esft select`")
@click.option("--data", required=True, help="task data (as for score)")
@click.option("--steps", type=int, required=True, help=_help("steps"))
@click.option("--out", "-o", required=True, help="adapter directory")
@click.option("--train-shared", is_flag=True, help=_help("train_shared"))
@click.option("--train-non-expert", is_flag=True, help=_help("train_non_expert"))
@click.option("--lr", type=float, default=1e-5, show_default=True, help=_help("lr"))
@click.option("--batch-size", type=int, default=4, show_default=True, help=_help("batch_size"))
@click.option("--grad-accum", type=int, default=1, show_default=True, help=_help("grad_accum"))
@click.option("--max-length", type=int, default=512, show_default=True, help=_help("max_length"))
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help=_help("weight_decay"))
@click.option(
    "--mix-general",
    default=None,
    metavar="TEXT:RATIO",
    help="general text (file or 'protocol') and its share",
)
@compute_options
@click.option("--seed", type=int, default=0, show_default=True, help=_help("seed"))
@click.option("--overwrite", is_flag=True, help="replace an earlier adapter")
def train_command(model, experts_file, data, out, overwrite, mix_general, device, **options):
    """Train only the selected experts of MODEL; saves only the trained tensors."""
    from moecarve.esft.train import train

    text, ratio = _mix(mix_general)
    config = EsftConfig(mix_general=text, mix_ratio=ratio, **options)
    r = train(model, experts_file, data, out, config, overwrite=overwrite, device=device)
    click.echo(
        f"trained {r['trainable_parameters']:,} parameters for {config.steps} steps "
        f"({r['training']['seconds']:.0f} s, mean loss {r['training']['train_loss']:.4f}); wrote {out}"
    )


@group.command("merge", context_settings=CONTEXT)
@click.argument("model")
@click.argument("adapter")
@click.option("--out", "-o", required=True, help="merged checkpoint directory")
@click.option("--overwrite", is_flag=True, help="replace an earlier merge")
def merge_command(model, adapter, out, overwrite):
    """Write MODEL with the ADAPTER's trained experts as a full native checkpoint."""
    from moecarve.esft.merge import merge

    click.echo(f"wrote {merge(model, adapter, out, overwrite=overwrite)}")
