"""`moecarve tune ...`: recovery fine-tune of a carved checkpoint."""

from __future__ import annotations

import click

from moecarve.tune.recover import DEFAULT_LORA_TARGETS, RecoverConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _help(name: str) -> str:
    return RecoverConfig.model_fields[name].description or ""


def compute_options(command):
    """Where and how a training runs: `tune recover`'s and `esft train`'s --device, --precision and
    --gradient-checkpointing (the two settings are fields of both configs)."""
    for option in reversed(
        [
            click.option("--device", default=None, help="cpu, cuda or cuda:N [default: CUDA where present, every GPU]"),
            click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                         help=_help("precision")),
            click.option("--gradient-checkpointing", is_flag=True, help=_help("gradient_checkpointing")),
        ]
    ):  # fmt: skip
        command = option(command)
    return command


@click.group("tune", context_settings=CONTEXT)
def group():
    """Fine-tune carved checkpoints (see docs/tune.md)."""


@group.command("recover", context_settings=CONTEXT)
@click.argument("carved")
@click.option(
    "--data",
    default=None,
    help="training text, as --calib of carve [default: BoolQ passages minus the protocol's evaluation tokens]",
)
@click.option("--steps", type=int, required=True, help=_help("steps"))
@click.option("--train", default="router,lora", show_default=True, help=_help("train"))
@click.option("--lora-rank", type=int, default=32, show_default=True, help=_help("lora_rank"))
@click.option("--lora-alpha", type=float, default=128.0, show_default=True, help=_help("lora_alpha"))
@click.option(
    "--lora-targets",
    default=",".join(DEFAULT_LORA_TARGETS),
    show_default=True,
    help=_help("lora_targets"),
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help=f"{_help('lr')}  [default: {RecoverConfig.model_fields['lr'].default:g}]",
)
@click.option("--router-lr", type=float, default=1e-2, show_default=True, help=_help("router_lr"))
@click.option("--bias-rate", type=float, default=1e-5, show_default=True, help=_help("bias_rate"))
@click.option("--batch-size", type=int, default=4, show_default=True, help=_help("batch_size"))
@click.option("--grad-accum", type=int, default=1, show_default=True, help=_help("grad_accum"))
@click.option("--length", type=int, default=512, show_default=True, help=_help("length"))
@click.option("--warmup", type=int, default=4, show_default=True, help=_help("warmup"))
@click.option("--save-every", type=int, default=50, show_default=True, help=_help("save_every"))
@click.option("--distill", type=float, default=0.0, show_default=True, help=_help("distill"))
@click.option("--teacher", default=None, help="dense model to distil from [default: the carve's source]")
@compute_options
@click.option("--seed", type=int, default=0, show_default=True, help=_help("seed"))
@click.option("--out", "-o", required=True, help="output directory (a native glm4_moe checkpoint)")
@click.option("--checkpoints", default=None, help="checkpoint directory [default: OUT.checkpoints]")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an earlier moecarve output at OUT")
@click.option("--adapter-out", default=None, help="also save the LoRA adapter alone here")
@click.option("--eval-ppl", is_flag=True, help="measure protocol perplexity before and after")
def recover_command(
    carved, data, out, checkpoints, resume, overwrite, adapter_out, eval_ppl, teacher, device, **options
):
    """Recover the quality of a CARVED checkpoint with a light fine-tune; writes a merged glm4_moe model."""
    from moecarve.tune.recover import recover
    from moecarve.tune.trainer import Announce

    options["lora_targets"] = tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip())
    if options["lr"] is None:  # the config's default, which --train full does not take
        del options["lr"]
    config = RecoverConfig(**options)
    result = recover(
        carved,
        config,
        data,
        out,
        checkpoints=checkpoints,
        resume=resume,
        overwrite=overwrite,
        evaluate=eval_ppl,
        adapter_out=adapter_out,
        teacher=teacher,
        device=device,
        callbacks=(Announce(f"training {'+'.join(config.train)} for {config.steps} steps"),),
    )
    record = result.record
    if not record:  # another process of `accelerate launch`: the main one reports and writes
        return
    first = record["train_loss"][0]["loss"] if record["train_loss"] else record["final_train_loss"]
    resumed = record["resumed_from_step"]
    seconds = f"{record['seconds']} s" + (f" (from step {resumed} on, in this run)" if resumed else "")
    click.echo(
        f"trained {record['trainable_parameters']:,} parameters on {record['data']['tokens']:,} tokens "
        f"in {seconds}; train loss {first:.4f} -> {record['final_train_loss']:.4f} (first and last logged)"
    )
    if "protocol_ppl" in record:
        ppl = record["protocol_ppl"]
        click.echo(f"protocol PPL: before {ppl['before']['ppl']:.3f}, after {ppl['after']['ppl']:.3f}")
    click.echo(f"wrote {result.out}")
