"""Each CLI option's default is the one the Python call it runs would take: the CLI spells its
defaults out (importing torch for --help would slow every command), so they are checked here."""

from __future__ import annotations

import inspect

import pytest

from moecarve.cli import cli


def function_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not p.empty
    }


def field_defaults(settings) -> dict:
    return {name: field.default for name, field in settings.model_fields.items()}


def command(path: str):
    import click

    found = cli
    for name in path.split():
        found = found.get_command(click.Context(found), name)
    return found


def library_defaults(path: str) -> dict:
    from moecarve.carve.config import CarveConfig
    from moecarve.esft.score import score
    from moecarve.esft.select import select
    from moecarve.esft.train import EsftConfig
    from moecarve.eval.load import evaluate_load
    from moecarve.eval.ppl import evaluate_ppl
    from moecarve.eval.speed import evaluate_speed
    from moecarve.eval.tasks import DEFAULT_TASKS, evaluate_tasks
    from moecarve.tune.recover import RecoverConfig

    return {
        "carve": field_defaults(CarveConfig),
        "tune recover": field_defaults(RecoverConfig),
        "esft score": function_defaults(score),
        "esft select": function_defaults(select),
        "esft train": field_defaults(EsftConfig),
        "eval ppl": function_defaults(evaluate_ppl),
        "eval load": function_defaults(evaluate_load),
        "eval speed": function_defaults(evaluate_speed),
        "eval tasks": {**function_defaults(evaluate_tasks), "tasks": DEFAULT_TASKS},
    }[path]


def comparable(value):
    """A comma-separated option's default as the items it parses to (their order aside)."""
    if isinstance(value, str) and "," in value:
        return sorted(value.split(","))
    if isinstance(value, (tuple, list)):
        return sorted(map(str, value))
    return value


@pytest.mark.parametrize(
    "path",
    [
        "carve",
        "tune recover",
        "esft score",
        "esft select",
        "esft train",
        "eval ppl",
        "eval load",
        "eval speed",
        "eval tasks",
    ],
)
def test_cli_defaults_are_the_librarys(path):
    library = library_defaults(path)
    compared = [  # options with a default of their own (not a flag, not left out)
        (p.name, p.default, library[p.name])
        for p in command(path).params
        if p.name in library and isinstance(p.default, (str, int, float)) and not isinstance(p.default, bool)
    ]
    assert compared, f"no option of {path} has a library default to compare"
    assert [c for c in compared if comparable(c[1]) != comparable(c[2])] == [], compared


def test_protocol_constants_agree():
    from moecarve.batch.recipe import PplOptions
    from moecarve.eval.ppl import PROTOCOL_LENGTH, PROTOCOL_WINDOWS
    from moecarve.tune.data import PROTOCOL_TOKENS

    assert PROTOCOL_TOKENS == PROTOCOL_WINDOWS * PROTOCOL_LENGTH
    options = PplOptions()
    assert (options.windows, options.length) == (PROTOCOL_WINDOWS, PROTOCOL_LENGTH)
