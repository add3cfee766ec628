"""eval ppl: shared windows across models, the PPL checked against transformers' own loss, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecarve.eval.ppl import evaluate_ppl, protocol_ppl


def _reference_ppl(model_dir, text: str, windows: int, length: int) -> float:
    """exp of transformers' mean causal-LM loss over the last windows x length tokens of the text
    tokenized as one stream without special tokens (EVAL_PROTOCOL.md)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = stream[-windows * length :].view(windows, length)
    with torch.no_grad():
        losses = [model(row[None], labels=row[None]).loss.item() for row in ids]
    return math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means = overall mean


def test_models_share_windows_and_match_transformers_loss(
    tiny_models, tiny_carved, calib_file, tmp_path, unchanged
):
    unchanged(tiny_models["llama"], tiny_carved)
    out = tmp_path / "ppl.json"
    record = evaluate_ppl(
        [tiny_models["llama"], tiny_carved], calib_file, windows=3, length=64, out=out, progress=False
    )
    dense, carved = record["results"]
    assert json.loads(out.read_text()) == record
    assert dense["tokens_scored"] == carved["tokens_scored"] == 3 * 63
    assert dense["name"] == "dense" and dense["active_fraction"] == 1.0
    assert carved["name"] == "S1A2E8" and carved["active_fraction"] == pytest.approx(3 / 8)
    text = calib_file.read_text()
    for row, model_dir in ((dense, tiny_models["llama"]), (carved, tiny_carved)):
        assert row["ppl"] == pytest.approx(_reference_ppl(model_dir, text, 3, 64), rel=1e-5)
    assert dense["ppl"] != carved["ppl"]
    assert record["protocol"]["windows"] == 3 and record["protocol"]["length"] == 64
    assert record["protocol"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert {"torch", "transformers", "moecarve"} <= set(record["versions"]) and record["seed"] == 0


def test_models_with_other_tokenizers_are_scored_on_their_own_ids(
    tiny_models, other_tokenizer_model, calib_file, tmp_path
):
    """The text is tokenized once per distinct tokenizer: a model with another tokenizer is scored
    on its own ids of the same text, and its windows are its own."""
    record = evaluate_ppl(
        [tiny_models["llama"], other_tokenizer_model], calib_file, windows=2, length=32,
        out=tmp_path / "ppl.json", progress=False,
    )  # fmt: skip
    text = calib_file.read_text()
    for row, model_dir in zip(record["results"], (tiny_models["llama"], other_tokenizer_model), strict=True):
        assert row["ppl"] == pytest.approx(_reference_ppl(model_dir, text, 2, 32), rel=1e-5)
    assert record["results"][0]["ppl"] != record["results"][1]["ppl"]
    again = evaluate_ppl([other_tokenizer_model], calib_file, windows=2, length=32, out=tmp_path / "ppl.json")
    assert json.loads((tmp_path / "ppl.json").read_text()) == again  # an earlier ppl record: replaced


def test_protocol_ppl_signature_kept(tiny_models, calib_file):
    result = protocol_ppl(tiny_models["qwen2"], windows=2, length=32, data=calib_file)
    assert result["tokens_scored"] == 2 * 31 and result["windows"] == 2 and result["length"] == 32
    assert result["ppl"] == pytest.approx(
        _reference_ppl(tiny_models["qwen2"], calib_file.read_text(), 2, 32), rel=1e-5
    )


def test_tokenizer_that_adds_special_tokens_scores_the_plain_stream(tiny_models, calib_file, tmp_path):
    """Llama-style tokenizers add a BOS (some an EOS) to every call: the protocol scores the text's
    own tokens only, so none of them may enter the stream or the windows."""
    from tokenizers.processors import TemplateProcessing

    model = tmp_path / "bos"
    shutil.copytree(tiny_models["llama"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    eos = tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<eos> $A <eos>", special_tokens=[("<eos>", eos)]
    )
    tokenizer.save_pretrained(model)
    text = calib_file.read_text()
    reloaded = AutoTokenizer.from_pretrained(model)
    assert reloaded(text)["input_ids"][0] == eos  # the tokenizer does add them by default
    assert eos not in reloaded(text, add_special_tokens=False)["input_ids"]
    result = protocol_ppl(model, windows=2, length=32, data=calib_file)
    assert result["ppl"] == pytest.approx(_reference_ppl(model, text, 2, 32), rel=1e-5)


def test_text_too_short(tiny_models, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the expert and the router")
    with pytest.raises(ValueError, match=r"text has \d+ tokens, 16 x 128 needed"):
        evaluate_ppl([tiny_models["llama"]], short, length=128)


def test_windows_beyond_the_models_positions_are_refused_before_loading(
    tiny_models, tiny_carved, calib_file, tmp_path, monkeypatch
):
    """A window longer than max_position_embeddings would score its tail at positions the model
    never saw; eval ppl, the protocol helper and eval load refuse it before anything loads."""
    import transformers

    from moecarve.eval.load import evaluate_load

    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    out = tmp_path / "ppl.json"
    with pytest.raises(ValueError, match="--length 257 exceeds the 256 positions of .*llama"):
        evaluate_ppl([tiny_models["llama"]], calib_file, windows=1, length=257, out=out)
    with pytest.raises(ValueError, match="window length 2048 exceeds the 256 positions"):
        protocol_ppl(tiny_models["llama"])
    with pytest.raises(ValueError, match="--length 512 exceeds the 256 positions"):
        evaluate_load(tiny_carved, calib_file, windows=1, length=512, out=tmp_path / "load.json")
    assert not out.exists() and not (tmp_path / "load.json").exists()


def test_positions_are_the_configs_or_its_rope_scalings(tiny_models, tmp_path):
    from transformers import LlamaConfig

    from moecarve.eval.ppl import check_positions, model_positions

    check_positions(tiny_models["llama"], 256)  # exactly the model's positions is fine
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    LlamaConfig(max_position_embeddings=256, rope_scaling=yarn).save_pretrained(tmp_path / "yarn")
    assert model_positions(tmp_path / "yarn") == 1024  # YaRN left max_position_embeddings at 256
    check_positions(tmp_path / "yarn", 1024)
    with pytest.raises(ValueError, match="--length 1025 exceeds the 1024 positions"):
        check_positions(tmp_path / "yarn", 1025)


def test_bad_models_fail_before_work(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        evaluate_ppl([tiny_models["llama"], tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate_ppl([tmp_path / "empty"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        evaluate_ppl([broken])
    truncated = shutil.copytree(tiny_models["llama"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt safetensors file .*truncated/model.safetensors"):
        evaluate_ppl([truncated], windows=1, length=16)
    untokenized = shutil.copytree(tiny_models["llama"], tmp_path / "untokenized")
    for tokenizer_file in untokenized.glob("tokenizer*"):
        tokenizer_file.unlink()
    with pytest.raises(FileNotFoundError, match="untokenized holds no tokenizer"):
        evaluate_ppl([untokenized], windows=1, length=16)


def test_a_checkpoint_lacking_a_weight_is_refused(tiny_models, calib_file, tmp_path):
    """transformers initialises a missing weight at random and notes it among the progress output:
    the PPL came out a little worse, with nothing in the record to say why."""
    from safetensors.torch import load_file, save_file

    from moecarve.carve.source import SourceError

    lacking = shutil.copytree(tiny_models["llama"], tmp_path / "lacking")
    state = load_file(lacking / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ppl.json"
    with pytest.raises(
        SourceError, match=r"lacking lacks 1 weight\(s\) .*model.layers.1.mlp.down_proj.weight"
    ):
        evaluate_ppl([lacking], calib_file, windows=1, length=16, out=out)
    assert not out.exists()
    # an edited config.json whose shapes the weights do not have: one line, not transformers' traceback
    edited = shutil.copytree(tiny_models["llama"], tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(
        json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]})
    )
    with pytest.raises(SourceError, match="edited: its weights' shapes do not match its config.json"):
        evaluate_ppl([edited], calib_file, windows=1, length=16, out=out)
    assert not out.exists()


def test_bad_outputs_and_devices_fail_before_loading(tiny_models, calib_file, tmp_path, monkeypatch):
    """The data file is never replaced by the record, and an output or device that cannot be used
    is refused before the model loads."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    before = calib_file.read_bytes()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "load.json").write_text('{"kind": "load"}')
    (tmp_path / "locked").mkdir()
    access = os.access  # a directory this user cannot write (root could write any under chmod)
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p).name != "locked" and access(p, mode, **kw)
    )
    model = tiny_models["llama"]
    for options, message in (
        [
            ({"out": calib_file}, "--out .* is --data"),
            ({"out": tmp_path}, "is a directory"),
            ({"out": tmp_path / "a_file" / "ppl.json"}, "is a file, not a directory"),
            ({"out": tmp_path / "a_file"}, "exists and is no earlier `eval ppl` record"),  # a user's file
            (
                {"out": tmp_path / "load.json"},
                "exists and is no earlier `eval ppl` record",
            ),  # another command's
            ({"out": tmp_path / "locked" / "new" / "ppl.json"}, "locked is not writable by this user"),
            (
                {"out": tiny_models["qwen2"] / "sub" / "ppl.json"},
                "inside the model directory",
            ),  # another model's
            ({"device": "gpu"}, "--device 'gpu'"),
            ({"device": "meta"}, "eval runs on cpu or cuda"),
        ]
        + ([] if torch.cuda.is_available() else [({"device": "cuda"}, "CUDA is not available")])
        + (
            # no file can be made in /proc, though access() grants root everything
            [({"out": Path("/proc/ppl.json")}, "/proc is not writable by this user")]
            if Path("/proc").is_dir()
            else []
        )
    ):
        with pytest.raises(ValueError, match=message):
            evaluate_ppl([model], calib_file, windows=2, length=32, **options)
    with pytest.raises(ValueError, match="--data not found"):
        evaluate_ppl([model], tmp_path / "missing.txt", windows=2, length=32)
    assert calib_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "load.json", "locked"]
    assert (tmp_path / "a_file").read_text() == "x"


def test_refuses_to_write_into_the_model(tiny_models, calib_file, unchanged):
    unchanged(tiny_models["llama"])
    with pytest.raises(ValueError, match="never writes there"):
        evaluate_ppl([tiny_models["llama"]], calib_file, 2, 32, out=tiny_models["llama"] / "ppl.json")


def test_cli_prints_one_line_error(tmp_path, monkeypatch, capsys):
    """Through moecarve.cli's error handler, as `moecarve eval ppl` runs it."""
    from moecarve.cli import _run
    from moecarve.eval.cli import group

    monkeypatch.setattr(sys, "argv", ["moecarve-eval", "ppl", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exit_info:
        _run(group)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: model not found: {tmp_path / 'nope'}"


def test_cli_table(tiny_models, calib_file, tmp_path):
    from click.testing import CliRunner

    from moecarve.eval.cli import group

    out = tmp_path / "r" / "ppl.json"
    args = ["ppl", str(tiny_models["llama"]), "--data", str(calib_file), "--windows", "2", "--length", "32"]
    result = CliRunner().invoke(group, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    ppl = json.loads(out.read_text())["results"][0]["ppl"]
    assert f"{ppl:.3f}" in result.output

    # Cached GGUF copies, in directories named by a hash, are named as their user knows them.
    key = "0123456789abcdef"
    bundled = shutil.copytree(tiny_models["llama"], tmp_path / "gguf" / f"SmolLM2-135M-Instruct.Q4_1-{key}")
    other = shutil.copytree(tiny_models["llama"], tmp_path / "gguf" / f"other-{key}")
    result = CliRunner().invoke(group, ["ppl", str(bundled), str(other), *args[2:]])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[-2:]] == ["bundled", "other.gguf"]


def test_a_damaged_carve_record_fails_before_any_model_is_scored(
    tiny_models, tiny_carved, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    broken = shutil.copytree(tiny_carved, tmp_path / "broken")
    for content, error in (('{"resolved": ', "broken/carve.json is not JSON"),
                           ("[1, 2]", "broken/carve.json is not a carve record"),
                           ('{"resolved": null}', "broken/carve.json is not a carve record")):  # fmt: skip
        (broken / "carve.json").write_text(content)
        with pytest.raises(ValueError, match=error):
            evaluate_ppl([tiny_models["llama"], broken], windows=1, length=16)
    cut = shutil.copytree(tiny_carved, tmp_path / "cut")  # a shard's header whole, its last tensor cut short
    shard = sorted(cut.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"corrupt safetensors file .*cut/{shard.name}: .*not fully covered"):
        evaluate_ppl([tiny_models["llama"], cut], windows=1, length=16)


def test_records_name_models_by_absolute_path(tiny_models, calib_file, tmp_path, monkeypatch):
    """A record written from one directory names the same model as one written from another."""
    monkeypatch.chdir(tiny_models["llama"].parent)
    record = evaluate_ppl(["llama"], calib_file, 1, 16, progress=False)
    assert record["results"][0]["model"] == str(tiny_models["llama"].resolve())


def test_a_json_file_is_refused_as_text(tiny_models, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"text": "the router and the expert " * 200}]))
    with pytest.raises(ValueError, match=r"data.json is a .json file; give a text file, a JSONL file"):
        evaluate_ppl([tiny_models["llama"]], data, 1, 16)


def test_one_model_given_alone_and_moe_models_no_carve_made(tiny_models, tmp_path):
    """evaluate_ppl takes one path as the other evaluate_* functions do; a MoE model that no carve
    made is named by its layout, not as dense, with its stages when trained since."""
    from moecarve.eval.common import describe_model

    record = evaluate_ppl(str(tiny_models["llama"]), windows=1, length=16, progress=False)
    assert [row["name"] for row in record["results"]] == ["dense"]
    native = tmp_path / "native"
    native.mkdir()
    glm4 = {"model_type": "glm4_moe", "n_routed_experts": 7, "n_shared_experts": 1, "num_experts_per_tok": 2}
    (native / "config.json").write_text(json.dumps(glm4))
    assert describe_model(native)["name"] == "glm4_moe-S1A2E8"
    (native / "carve.json").write_text(json.dumps({"tune": [{"stage": "recover"}]}))  # a recovery of it
    assert describe_model(native) == {
        "model": str(native), "model_type": "glm4_moe", "name": "glm4_moe-S1A2E8+recover",
        "active_fraction": None, "trained": ["recover"],
    }  # fmt: skip


def test_a_stale_index_beside_the_single_weights_file_is_not_read(tiny_models, calib_file, tmp_path):
    """transformers reads model.safetensors before an index left from an earlier sharded save; so
    does the up-front check, which would otherwise refuse a model that loads."""
    model = shutil.copytree(tiny_models["llama"], tmp_path / "resaved")
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "ppl.json"
    out.touch()  # an empty file, as mktemp leaves: nothing in it to lose
    record = evaluate_ppl([model], calib_file, windows=1, length=16, out=out, progress=False)
    assert record["results"][0]["ppl"] == pytest.approx(
        _reference_ppl(tiny_models["llama"], calib_file.read_text(), 1, 16)
    )
