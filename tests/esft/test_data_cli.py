"""Task data formats and the command line."""

from __future__ import annotations

import json
import sys

import pytest
from transformers import AutoTokenizer

from moecarve.esft.data import IGNORE, Collator, load_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_carved):
    return AutoTokenizer.from_pretrained(tiny_carved)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_response_loss_on_response_only(tokenizer, tmp_path):
    (example,) = load_examples(
        write(tmp_path / "t.jsonl", [{"prompt": "the expert", "response": " router"}]), tokenizer
    )
    prompt = tokenizer("the expert")["input_ids"]
    response = tokenizer(" router", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE] * len(prompt) + response


def test_long_prompt_keeps_its_end(tokenizer, tmp_path):
    rows = [{"prompt": "the " * 50 + "expert", "response": " router"}]
    (example,) = load_examples(write(tmp_path / "t.jsonl", rows), tokenizer, max_length=8)
    assert len(example.input_ids) == 8 and example.labels[-1] == tokenizer.eos_token_id


def test_long_response_keeps_its_start_and_the_prompt_half_the_room(tokenizer, tmp_path):
    """A response longer than the room left is cut at its end; the example is never dropped."""
    rows = [
        {"prompt": "the expert", "response": " router" * 40},
        {"prompt": "the " * 30, "response": " a" * 30},
    ]
    long_response, both_long = load_examples(write(tmp_path / "t.jsonl", rows), tokenizer, max_length=16)
    prompt = tokenizer("the expert")["input_ids"]
    response = tokenizer(" router" * 40, add_special_tokens=False)["input_ids"]
    assert long_response.input_ids == prompt + response[: 16 - len(prompt)]
    assert long_response.labels == [IGNORE] * len(prompt) + response[: 16 - len(prompt)]
    assert len(both_long.input_ids) == 16 and both_long.labels.count(IGNORE) == 8


def test_a_directory_is_refused_as_task_data(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="is a directory: give a JSONL or text file"):
        load_examples(tmp_path, tokenizer)


def test_chat_messages_use_the_template(tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    rows = [
        {"messages": [{"role": "user", "content": "the token"}, {"role": "assistant", "content": "a layer"}]}
    ]
    (example,) = load_examples(write(tmp_path / "t.jsonl", rows), tokenizer)
    scored = [t for t in example.labels if t != IGNORE]
    assert tokenizer.decode(scored) == "a layer\n"
    assert tokenizer.decode(example.input_ids).startswith("<user>the token\n<assistant>")


def test_chat_without_template_refused(tiny_carved, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_carved)
    tokenizer.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(ValueError, match="chat template"):
        load_examples(write(tmp_path / "t.jsonl", rows), tokenizer)


def test_plain_text_chunks(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the expert router " * 40)
    examples = load_examples(path, tokenizer, max_length=16)
    assert all(len(e.input_ids) <= 16 and e.labels == e.input_ids for e in examples)
    assert sum(len(e.input_ids) for e in examples) == len(tokenizer("the expert router " * 40)["input_ids"])


@pytest.mark.parametrize(
    "line, message", [("{", "not JSON"), ('{"q": "x"}', "expected"), ("[1]", "JSON object")]
)
def test_bad_lines_refused(tokenizer, tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_examples(path, tokenizer)


def test_collator_pads_without_loss():
    batch = Collator(0)(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def run_cli(monkeypatch, capsys, *args):
    from moecarve import cli
    from moecarve.esft.cli import group

    # The esft group through the project's error handling (`moecarve esft ...` mounts this group).
    monkeypatch.setattr(sys, "argv", ["moecarve esft", *map(str, args)])
    try:
        cli._run(group)  # returns on success (standalone_mode=False), exits on error
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr()


def test_cli_select_and_bad_p(tiny_carved, task_file, tmp_path, monkeypatch, capsys):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "score",
        tiny_carved,
        "--data",
        task_file,
        "--out",
        tmp_path / "s.json",
        "--tokens",
        64,
    )
    assert code == 0 and "scored" in out.out, out.err[-300:]
    code, out = run_cli(
        monkeypatch,
        capsys,
        "select",
        tmp_path / "s.json",
        "--score",
        "gate",
        "--p",
        0.3,
        "--out",
        tmp_path / "e.json",
    )
    assert code == 0 and "of the model" in out.out and (tmp_path / "e.json").is_file()
    code, out = run_cli(
        monkeypatch, capsys, "select", tmp_path / "s.json", "--p", 2, "--out", tmp_path / "x.json"
    )
    assert code == 2 and out.err.strip() == "error: --p must be a number in (0, 1], got 2.0"
    assert not (tmp_path / "x.json").exists()
