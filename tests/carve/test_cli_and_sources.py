"""The CLI end to end, the source kinds (directory, hub id, GGUF) and the bundled real model."""

from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from moecarve import MoecarveWarning
from moecarve.carve.source import SourceError, model_identity, resolve_source
from moecarve.cli import carve_command, cli
from moecarve.eval.common import source_commit


@pytest.mark.parametrize("command", [["carve"], []])
def test_cli_carves_and_reports(command, tiny_models, calib_file, tmp_path):
    group = cli if command else carve_command
    args = [
        *command,
        str(tiny_models["qwen2"]),
        "-e",
        "4",
        "-a",
        "2",
        "-s",
        "1",
        "--calib",
        str(calib_file),
        "--calib-tokens",
        "256",
        "--calib-length",
        "64",
        "--out",
        str(tmp_path / "o"),
        "--set",
        "cluster_iters=3",
    ]
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (
        "S1A2E4: 1 shared + 2 of 3 routed experts active, 75.0% of the FFN neurons per token "
        "(quality preset)" in result.output
    )
    assert "neurons per expert: 24" in result.output and "s carving the layers)" in result.output
    record = json.loads((tmp_path / "o" / "carve.json").read_text())
    assert record["config"]["cluster_iters"] == 3 and record["calibration"]["tokens"] == 256
    # what reproduces it: the text's and the source's content, the code's commit
    assert record["calibration"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert record["source_identity"] == model_identity(tiny_models["qwen2"])
    assert record["versions"]["moecarve_commit"] == source_commit()
    assert 0 < record["construction_seconds"] < record["carve_seconds"]
    stages = {"attention", "activations", "partition", "router", "forward", "refit"}
    assert all(set(layer["seconds"]) == stages for layer in record["layers"])  # where the time went


def test_fast_preset_sets_defaults_that_explicit_options_override(tiny_models, calib_file, tmp_path):
    args = [str(tiny_models["llama"]), "-e", "4", "--preset", "fast", "--calib", str(calib_file)]
    args += [
        "--calib-length",
        "64",
        "--calib-tokens",
        "256",
        "--set",
        "refine_iters=1",
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(carve_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(fast preset)" in result.output
    config = json.loads((tmp_path / "o" / "carve.json").read_text())["config"]
    # the preset's own values where nothing was given, the user's where something was
    assert config["preset"] == "fast" and config["cluster_iters"] == 1 and config["refit_ridge"] == "auto"
    assert (config["calib_tokens"], config["calib_length"], config["refine_iters"]) == (256, 64, 1)
    from moecarve.carve.config import CarveConfig

    # the record alone reproduces the carve: every field is resolved, whatever the preset says
    assert CarveConfig(**{**config, "preset": "quality"}).model_dump(exclude={"preset"}) == {
        k: v for k, v in config.items() if k != "preset"
    }
    fast, default = CarveConfig(preset="fast"), CarveConfig()
    assert (fast.calib_tokens, fast.calib_length, fast.refine_iters) == (2048, 256, 2)
    assert (default.calib_tokens, default.refit_ridge, default.preset) == (16384, "auto", "quality")


def test_eval_ppl_scores_source_and_carve_on_the_protocol(tiny_models, calib_file, tmp_path):
    """The README's set-up command prints and records the dense and carved protocol PPL; with every
    routed expert active the carve is the dense model, so the two must agree. A model with fewer
    positions than the protocol's windows is refused before the carve."""
    from moecarve.eval.ppl import protocol_ppl
    from tests.conftest import make_model

    options = ["-e", "8", "-a", "7", "--calib", str(calib_file), "--eval-ppl"]
    options += ["--calib-tokens", "256", "--calib-length", "64", "--out", str(tmp_path / "o")]
    short = CliRunner().invoke(carve_command, [str(tiny_models["llama"]), *options])
    assert (
        short.exit_code != 0
        and "--eval-ppl's protocol window length 2048 exceeds the 256 positions" in str(short.exception)
        and "measure with `moecarve eval ppl OUT --length 256` after" in str(short.exception)
    )
    assert not (tmp_path / "o").exists()
    model = make_model(tmp_path / "llama2048", "llama", positions=2048)
    result = CliRunner().invoke(carve_command, [str(model), *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    quality = json.loads((tmp_path / "o" / "carve.json").read_text())["quality"]["protocol_ppl"]
    dense, carved = quality["dense"], quality["carved"]
    assert dense["tokens_scored"] == carved["tokens_scored"] == 16 * 2047
    assert dense["ppl"] == pytest.approx(protocol_ppl(model)["ppl"], rel=1e-9)
    assert carved["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
    assert f"protocol PPL: dense {dense['ppl']:.3f}, carved {carved['ppl']:.3f}" in result.output


def test_cli_options_left_unset_fall_to_the_preset_then_the_default():
    from moecarve.cli import _build_config

    unset = {"experts": 8, "active": 2, "calib_tokens": None, "calib_length": None}
    fast = _build_config({**unset, "preset": "fast"}, ())
    assert (fast.calib_tokens, fast.calib_length, fast.cluster_iters) == (2048, 256, 1)
    quality = _build_config({**unset, "preset": "quality", "calib_length": 128}, ())
    assert (quality.calib_tokens, quality.calib_length, quality.cluster_iters) == (16384, 128, 2)


def test_unknown_preset_is_refused_before_loading(tmp_path):
    result = CliRunner().invoke(carve_command, [str(tmp_path / "missing"), "--preset", "turbo"])
    assert result.exit_code == 2 and "'turbo' is not one of 'quality', 'fast'" in result.output
    from moecarve.cli import USER_ERRORS, _build_config

    with pytest.raises(USER_ERRORS, match="preset"):  # what the CLI prints as one line, exit 2
        _build_config({"experts": 8, "active": 2}, ("preset=[1]",))


def test_hub_id_without_hub_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="cannot fetch 'someone/no-such-model'"):
        resolve_source("someone/no-such-model")


@pytest.fixture
def hub_unresolvable(monkeypatch, tmp_path):
    """No proxy, and the hub's host name does not resolve (as offline or behind a package mirror);
    an empty hub cache of the test's own."""
    import socket

    import huggingface_hub.constants

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for kind in ("https", "http", "all"):
        for name in (f"{kind}_proxy", f"{kind.upper()}_PROXY"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return tmp_path / "hub"


def test_unreachable_hub_is_said_at_once_not_retried(hub_unresolvable):
    import time

    started = time.perf_counter()
    with pytest.raises(
        SourceError,
        match=r"hub is unreachable \(huggingface.co: Name or service not known\), "
        "the model is not in the local hub cache",
    ):
        resolve_source("someone/no-such-model")
    assert time.perf_counter() - started < 10  # huggingface_hub's own retries take about 25 s


def test_hub_model_in_the_local_cache_is_carved_without_the_hub(
    hub_unresolvable, tiny_models, calib_file, tmp_path
):
    import shutil

    from moecarve.carve import CarveConfig, carve

    repo = hub_unresolvable / "models--someone--tiny-llama"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_source("someone/tiny-llama") == repo / "snapshots" / ("0" * 40)
    result = carve(
        "someone/tiny-llama",
        CarveConfig(calib_tokens=256, calib_length=64),
        calib_file,
        tmp_path / "o",
        progress=False,
    )
    assert result.record["source"] == "someone/tiny-llama"
    assert AutoModelForCausalLM.from_pretrained(result.out).config.model_type == "glm4_moe"


def test_hub_dataset_needs_the_hub(hub_unresolvable, monkeypatch):
    import sys
    import types

    from moecarve.carve.calib import CalibrationError, read_text

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
    with pytest.raises(
        CalibrationError,
        match="'org/texts' is not a file, and as a hub dataset it needs "
        r"the Hugging Face hub, which is unreachable \(huggingface.co",
    ):
        read_text("org/texts")


def test_jsonl_and_directory_calibration(tiny_models, tmp_path):
    from moecarve.carve.calib import read_text

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(tmp_path / "a.jsonl")[0] == "one\n\ntwo"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "2.txt").write_text("second")
    (tmp_path / "d" / "1.txt").write_text("first")
    assert read_text(tmp_path / "d")[0] == "first\n\nsecond"


def _tokenizer(split_words: bool):
    """A small BPE: byte-level words (GPT-2 style), or SentencePiece style with no split at spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moecarve.batch.tiny import sample_text

    tok = Tokenizer(models.BPE(unk_token=None))
    if split_words:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder, alphabet = decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder, alphabet = decoders.Metaspace(), list("▁abcdefghijklmnopqrstuvwxyz")
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet)
    tok.train_from_iterator([sample_text(2000, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("split_words", [True, False])
def test_calibration_tokenizes_only_a_prefix_and_gets_the_whole_texts_tokens(split_words):
    from moecarve.carve.calib import calibration, tokenize_prefix, tokenize_stream
    from moecarve.resources import boolq_passages

    tokenizer, text = _tokenizer(split_words), boolq_passages()[:300_000]
    whole = tokenize_stream(tokenizer, text)
    seen = []
    spy = lambda piece, **kwargs: seen.append(len(piece)) or tokenizer(piece, **kwargs)  # noqa: E731
    for budget in (1, 700, 4096):
        seen.clear()
        assert torch.equal(tokenize_prefix(spy, text, budget), whole[:budget])
        assert max(seen) < len(text) / 4  # never the whole corpus for a small budget
    assert torch.equal(tokenize_prefix(tokenizer, text, whole.numel() + 5), whole)  # short: all of it

    # A tokenizer whose first token depends on how much text follows: prefixes disagree, so it doubles
    # until they agree, and still returns the whole text's tokens.
    def far_reaching(piece, **kwargs):
        ids = [ord(c) for c in piece]
        ids[0] = -1 if len(piece) < 1000 else ids[0]  # the first prefix tried is 800 characters
        return {"input_ids": ids}

    assert torch.equal(tokenize_prefix(far_reaching, text, 100), tokenize_stream(far_reaching, text)[:100])
    assert tokenize_prefix(tokenizer, "", 10).numel() == 0
    calib = calibration(tokenizer, None, 2048, 512)
    assert calib.input_ids.shape == (4, 512)
    assert torch.equal(calib.input_ids.flatten(), tokenize_stream(tokenizer, boolq_passages())[:2048])


@pytest.mark.slow
def test_bundled_gguf_all_experts_active_is_exact(tmp_path):
    """The real model, read from its GGUF file: every routed expert active reproduces it."""
    from moecarve import CarveConfig, carve
    from moecarve.resources import bundled_gguf

    out = carve(
        bundled_gguf(),
        CarveConfig(experts=8, active=7, calib_tokens=512, calib_length=256),
        None,
        tmp_path / "o",
    ).out
    src = resolve_source(bundled_gguf())
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(ids).logits
        # float32 sums re-associated over 30 layers: a tolerance relative to the logits' scale
        scale = expected.abs().max().item()
        torch.testing.assert_close(moe(ids).logits, expected, atol=1e-4 * scale, rtol=1e-4)


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """A reinstalled copy of the same GGUF (new path, new mtime) reuses the dequantized cache."""
    import os

    from moecarve.carve.source import cached_gguf_dir

    monkeypatch.setenv("MOECARVE_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes")
    os.utime(second, ns=(1, 1))
    cached = tmp_path / "cache" / "gguf" / f"m-{hashlib.sha256(b'GGUF same bytes').hexdigest()[:16]}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert cached_gguf_dir(first) == cached_gguf_dir(second) == cached


def test_phi3_gguf_is_refused_before_dequantizing(tmp_path, monkeypatch):
    """transformers' GGUF loader drops Phi-3's partial rotary and longrope factors: such a file would
    carve another model, so it is refused, and nothing is cached."""
    import transformers

    from moecarve.carve import source

    monkeypatch.setenv("MOECARVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "phi-4-mini.gguf"
    gguf.write_bytes(b"GGUF")
    phi3 = transformers.Phi3Config(pad_token_id=None, sliding_window=None)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: phi3)
    monkeypatch.setattr(source, "gguf_to_hf_dir", lambda *a: pytest.fail("dequantized"))
    with pytest.raises(source.SourceError, match="drops Phi-3's partial rotary and longrope"):
        source.resolve_source(gguf)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_calibration_dtype_is_bfloat16_only_where_the_device_multiplies_it_natively(monkeypatch):
    from moecarve.carve.pipeline import calibration_dtype

    assert calibration_dtype("float32") is torch.float32
    assert calibration_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # no probe there: float32
    assert calibration_dtype("auto") is torch.float32
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in [
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (False, False, torch.float32),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert calibration_dtype("auto") is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe
    assert calibration_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibration_dtype("auto", "cuda:0") is torch.float32  # no CUDA: asked, not an error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native, expected in [(True, torch.bfloat16), (False, torch.float32)]:  # from Ampere on; before
        # emulated bfloat16 counts as supported unless asked otherwise, as in torch
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, v=native: v or including_emulation,
        )
        assert calibration_dtype("auto", "cuda:0") is expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["moecarve", "esft", "train", "m", "--experts", "e", "--data", "d", "--steps", "1", "--out", "o",
          "--mix-general", "protocol"],
         "error: Invalid value for --mix-general: expected TEXT:RATIO, got 'protocol' (see `"),
        (["moecarve", "carve", "m", "--experts", "x"], "error: Invalid value for '--experts'"),
        (["moecarve", "no-such-stage"], "error: No such command 'no-such-stage'."),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_too(argv, message, monkeypatch, capsys):
    import warnings

    from moecarve.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and line.startswith(message)
    assert line.endswith("--help`)")  # the command's help, by the program name click detects


def test_a_group_alone_prints_its_help(monkeypatch, capsys):
    import warnings

    from moecarve.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr("sys.argv", ["moecarve", "tune"])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr()
    help_text = out.out + out.err
    assert help_text.startswith("Usage: ") and "recover" in help_text and "error:" not in help_text


def test_the_cli_prints_its_own_warnings_in_one_line(monkeypatch):
    import warnings

    from moecarve import MoecarveWarning, cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored afterwards
    cli._short_warnings()
    cli._short_warnings()  # once only: not wrapped twice
    ours = warnings.formatwarning("--calib-tokens 1000 is not a multiple", MoecarveWarning, cli.__file__, 160)
    assert ours == "warning: --calib-tokens 1000 is not a multiple\n"
    for category in (FutureWarning, UserWarning):  # other warnings, wherever they are reported
        theirs = warnings.formatwarning("deprecated", category, cli.__file__, 3, "line")
        assert theirs.startswith(f"{cli.__file__}:3: {category.__name__}: deprecated")


def test_paths_with_a_tilde_and_configs_of_the_wrong_type(tiny_models, calib_file, tmp_path, monkeypatch):
    """`~` is the home directory in every path, the returned output included; a config that is
    neither a CarveConfig nor a dict of its fields is refused by type."""
    import shutil

    from moecarve import CarveConfig, carve

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models["llama"], tmp_path / "llama")
    config = CarveConfig(experts=8, active=2, calib_tokens=512, calib_length=64)
    result = carve("~/llama", config, str(calib_file), "~/carved", progress=False)
    assert result.out == tmp_path / "carved" and (result.out / "carve.json").is_file()
    with pytest.raises(TypeError, match="config must be a CarveConfig or a dict of its fields, got str"):
        carve("~/llama", "S1A2E8", str(calib_file), "~/other", progress=False)


def test_a_source_without_generation_config_keeps_its_special_tokens(tiny_models, calib_file, tmp_path):
    """Without the source's generation_config.json the carve wrote an empty one, which transformers
    then used instead of config.json's ids: generate() never stopped at EOS."""
    import shutil

    from moecarve.carve import pipeline
    from moecarve.carve.config import CarveConfig

    source = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], source)
    (source / "generation_config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "eos_token_id": [0, 3], "pad_token_id": 2}))
    out = tmp_path / "carved"
    pipeline.carve(
        source, CarveConfig(experts=4, active=2, calib_tokens=512, calib_length=128), str(calib_file), out
    )
    want = AutoModelForCausalLM.from_pretrained(source).generation_config
    got = AutoModelForCausalLM.from_pretrained(out).generation_config
    assert (got.eos_token_id, got.bos_token_id, got.pad_token_id) == (want.eos_token_id, want.bos_token_id, 2)
    assert got.eos_token_id == [0, 3]
    # one transformers cannot read: as transformers loads such a source, from config.json (it failed
    # the carve at its very end)
    (source / "generation_config.json").write_text("{not json")
    with pytest.warns(MoecarveWarning, match="generation_config.json is unreadable"):
        pipeline.carve(
            source,
            CarveConfig(experts=4, active=2, calib_tokens=512, calib_length=128),
            str(calib_file),
            tmp_path / "c2",
        )
    assert not (tmp_path / "c2" / "generation_config.json").exists()


def test_the_carve_subpackage_imports_and_calls():
    """`moecarve.carve(...)` is the carve and `import moecarve.carve.pipeline` the subpackage's module
    (a function of the same name once hid the subpackage from `import ... as`)."""
    import subprocess
    import sys

    code = (
        "import moecarve.carve.pipeline as p, moecarve\n"
        "from moecarve import carve\n"
        "assert moecarve.carve.pipeline is p and carve is moecarve.carve and callable(carve)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
