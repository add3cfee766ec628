"""Bad input: one clear error before any expensive work, nothing written, the input untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from moecarve import CarveConfig, MoecarveWarning, carve
from moecarve.carve.calib import CalibrationError
from moecarve.carve.families import UnsupportedModel
from moecarve.carve.source import SourceError
from moecarve.carve.writer import OutputError

TINY = {"calib_tokens": 512, "calib_length": 64}


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"experts": 8, "active": 7, "shared": 2}, "exceeds --experts"),
        ({"experts": 8, "active": 0}, "--active must be >= 1"),
        ({"experts": 8, "active": 2, "shared": -1}, "--shared must be >= 1"),
        ({"experts": 8, "active": 2, "shared": 0}, "--shared must be >= 1"),
        ({"experts": 1, "active": 1, "shared": 0}, "--experts must be at least 2"),
        ({"experts": 8, "active": 1, "shared": 7}, "not a mixture"),
    ],
)
def test_impossible_counts(counts, message):
    with pytest.raises(ValidationError, match=message):
        CarveConfig(**counts)


@pytest.mark.parametrize("ridge", [0, -1, float("inf"), float("nan"), True, "AUTO", "none"])
def test_bad_refit_ridge(ridge):
    with pytest.raises(ValidationError, match="refit_ridge must be a number > 0, auto or null"):
        CarveConfig(refit_ridge=ridge)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"top_k_activation": float("inf")}, "finite number"),
        ({"top_k_activation": 2.5}, "a whole number"),
        ({"router_ridge": float("inf")}, "finite number"),
        ({"balance": float("nan")}, "finite number"),
        ({"cluster_tol": float("nan")}, "finite number"),
    ],
)
def test_settings_that_would_fail_mid_carve_or_write_nonsense(setting, message):
    with pytest.raises(ValidationError, match=message):
        CarveConfig(**setting)


def test_top_k_activation_beyond_the_ffn(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="top_k_activation 1000 exceeds the FFN's"):
        carve(tiny_models["llama"], CarveConfig(top_k_activation=1000, **TINY), None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_more_experts_than_neurons(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="< 1 neuron"):
        carve(tiny_models["llama"], CarveConfig(experts=200, active=2, **TINY), None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        carve(tmp_path / "nope", CarveConfig(), None, tmp_path / "o")
    with pytest.raises(SourceError, match="not found"):
        carve(tmp_path / "nope.gguf", CarveConfig(), None, tmp_path / "o")


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import AutoConfig

    src = tmp_path / "gemma"
    src.mkdir()
    AutoConfig.for_model("gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=1).save_pretrained(
        src
    )
    with pytest.raises(UnsupportedModel, match="unsupported architecture 'gemma'"):
        carve(src, CarveConfig(), None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("model_type", "kwargs", "message"),
    [
        ("gpt2", {}, "unsupported architecture 'gpt2'"),  # an ungated GELU MLP
        ("mistral", {"hidden_act": "gelu"}, "only SiLU-gated"),
        ("mistral", {"sliding_window": 64, "max_position_embeddings": 256}, "sliding-window"),
        ("qwen3", {"attention_bias": True}, "o_proj has a bias"),
        ("llama", {"mlp_bias": True}, "MLP has biases"),
    ],
)
def test_models_the_target_cannot_express_are_refused(model_type, kwargs, message, tmp_path):
    from transformers import AutoConfig

    src = tmp_path / "src"
    src.mkdir()
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(src)
    with pytest.raises(UnsupportedModel, match=message):
        carve(src, CarveConfig(), None, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_shard"])
def test_corrupt_checkpoint(damage, tmp_path, calib_file):
    from tests.conftest import make_model

    src = make_model(tmp_path / "src", "llama")
    weights = src / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    else:
        weights.rename(src / "model-00001-of-00002.safetensors")
        (src / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        "x": "model-00001-of-00002.safetensors",
                        "y": "model-00002-of-00002.safetensors",
                    }
                }
            )
        )
    with pytest.raises(SourceError, match="truncated|corrupt|missing shard"):
        carve(src, CarveConfig(**TINY), calib_file, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_calibration_too_short(tiny_models, tmp_path, monkeypatch):
    from moecarve.carve import pipeline

    short = tmp_path / "short.txt"
    short.write_text("the expert router " * 5)

    def resolved(model):
        raise AssertionError("the source was resolved (a GGUF converted, a hub model downloaded) first")

    with monkeypatch.context() as patched:  # a hub model: the text is checked before the download
        patched.setattr(pipeline, "resolve_source", resolved)
        with pytest.raises(CalibrationError, match="has 90 bytes, fewer than the 512 tokens requested"):
            carve("org/model", CarveConfig(**TINY), short, tmp_path / "o")
    with pytest.raises(ValueError, match="would hold < 1 neuron each"):  # a local one: its config first
        carve(
            tiny_models["llama"], CarveConfig(**{**TINY, "experts": 500, "active": 2}), short, tmp_path / "o"
        )
    with pytest.raises(CalibrationError, match="has 90 bytes"):
        carve(tiny_models["llama"], CarveConfig(**TINY), short, tmp_path / "o")
    short.write_text("the expert router " * 40)  # bytes enough, tokens not
    with pytest.raises(CalibrationError, match=r"has \d+ tokens, 512 requested"):
        carve(tiny_models["llama"], CarveConfig(**TINY), short, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("character", ["a", "\0"])
def test_calibration_of_one_token_repeated(tiny_models, tmp_path, monkeypatch, character):
    """Every FFN input is then the same vector: refused by name before any weight is read (it
    failed in the router's Cholesky factor, with a traceback, after the first layer's weights)."""
    from moecarve.carve import pipeline

    def read(*args, **kwargs):
        raise AssertionError("a weight was read before the calibration text was checked")

    monkeypatch.setattr(pipeline.TensorSource, "get", read)
    monkeypatch.setattr(pipeline.TensorSource, "load_into", read)
    same = tmp_path / "same.txt"
    same.write_text(character * 20000)
    with pytest.raises(CalibrationError, match=r"one token repeated \(.*same.txt\).*give varied text"):
        carve(tiny_models["llama"], CarveConfig(**TINY), same, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


class WordTokenizer:
    """One token per word."""

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize(
    ("words", "shape"), [(1060, (4, 256)), (1030, (4, 256)), (1000, (4, 250)), (960, None)]
)
def test_a_text_short_of_the_budget_gives_shorter_sequences_never_longer(words, shape, tmp_path):
    """--calib-tokens 1100 at --calib-length 256 uses 1,024 tokens: a text a few short of them is
    cut into shorter sequences, never longer ones (which could pass the model's positions)."""
    from moecarve.carve.calib import calibration

    text = tmp_path / "t.txt"
    text.write_text("w " * words)
    with pytest.warns(UserWarning, match="1024 tokens are used"):
        if shape is None:
            with pytest.raises(CalibrationError, match="960 tokens, 1024 requested"):
                calibration(WordTokenizer(), text, 1100, 256)
        else:
            assert tuple(calibration(WordTokenizer(), text, 1100, 256).input_ids.shape) == shape


def test_calibration_sources_named_oddly(tmp_path):
    from moecarve.carve.calib import read_text

    with pytest.raises(CalibrationError, match="an empty name"):
        read_text("")  # Path("") is the current directory: it would read every .txt below it
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "A.TXT").write_text("the router")
    assert read_text(tmp_path / "texts")[0] == "the router"


def test_bad_jsonl_names_the_line(tiny_models, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match=r"c.jsonl:2"):
        carve(tiny_models["llama"], CarveConfig(**TINY), bad, tmp_path / "o")


def test_binary_calibration_file_is_named(tiny_models, tmp_path):
    binary = tmp_path / "c.txt"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    with pytest.raises(ValueError, match="c.txt is not UTF-8 text"):
        carve(tiny_models["llama"], CarveConfig(**TINY), binary, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_not_empty_or_inside_source(tiny_models, calib_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="has no carve.json"):  # --overwrite never deletes foreign data
        carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="--out .*/moe is inside model"):
        carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, tiny_models["llama"] / "moe")
    with pytest.raises(OutputError, match="--out .* holds model"):
        carve(
            tiny_models["llama"], CarveConfig(**TINY), calib_file, tiny_models["llama"].parent, overwrite=True
        )
    (out / "keep.txt").unlink()
    carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, out, progress=False)
    (out / "stale.txt").write_text("from the earlier carve")
    carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "carve.json").exists()
    # a calibration text inside the output it replaces: it was read, then deleted with the old output
    (out / "text.txt").write_text(calib_file.read_text())
    with pytest.raises(OutputError, match="--out .* holds --calib"):
        carve(tiny_models["llama"], CarveConfig(**TINY), out / "text.txt", out, overwrite=True)
    assert (out / "text.txt").is_file()


def test_the_default_output_inside_the_model_says_no_out_was_given(tiny_models, calib_file, monkeypatch):
    """`carve .` inside the model: the error named an --out the user never gave."""
    monkeypatch.chdir(tiny_models["llama"])
    with pytest.raises(
        OutputError, match=r"^the default output \(no --out given\) .*llama-S1A2E8 is inside model"
    ):
        carve(".", CarveConfig(**TINY), calib_file)
    assert not list(tiny_models["llama"].glob("*S1A2E8*"))


def test_failure_mid_carve_leaves_nothing_and_source_untouched(
    tiny_models, calib_file, tmp_path, monkeypatch
):
    from moecarve.carve import pipeline

    before = {p.name: p.read_bytes() for p in tiny_models["llama"].iterdir()}

    def explode(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pipeline, "carve_ffn", explode)
    with pytest.raises(RuntimeError, match="interrupted"):
        carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.read_bytes() for p in tiny_models["llama"].iterdir()} == before


def test_missing_tensor_is_found_before_work(tmp_path, calib_file):
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_model

    src = make_model(tmp_path / "src", "qwen2")
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(SourceError, match="model.layers.1.self_attn.k_proj.bias"):
        carve(src, CarveConfig(**TINY), calib_file, tmp_path / "o")


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
def test_nan_weights_are_named(tmp_path, calib_file, name):
    """A damaged source: nan embeddings were copied into the carve silently, and a nan FFN weight
    failed in the clustering with an error that named no tensor."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_model

    src = make_model(tmp_path / "src", "llama")
    state = load_file(src / "model.safetensors")
    state[name][3, :5] = float("nan")
    save_file(state, str(src / "model.safetensors"))
    before = (src / "model.safetensors").read_bytes()
    with pytest.raises(SourceError, match=rf"tensor {name} in .*model.safetensors holds nan or inf"):
        carve(src, CarveConfig(**TINY), calib_file, tmp_path / "o")
    assert not (tmp_path / "o").exists() and (src / "model.safetensors").read_bytes() == before


def test_cli_prints_one_line_and_exits_nonzero(tiny_models, tmp_path):
    cmd = [sys.executable, "-m", "moecarve.cli", str(tiny_models["llama"]), "--experts", "8", "--active", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config: --shared 1 + --active 8 exceeds --experts 8: at most 7 routed experts can be active"
    ]
    result = subprocess.run(
        [*cmd[:3], str(tmp_path / "missing"), "-e", "8", "-a", "2"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: model not found")
    assert result.stdout == ""  # no configuration announced for a model that is not there
    result = subprocess.run([*cmd[:4], "--set", "colour=blue"], capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: Invalid value for --set: colour: unknown carve setting; the settings are preset"
    )
    # a field with its own option: -e 4 was silently overridden by --set experts=16
    result = subprocess.run([*cmd[:4], "-e", "4", "--set", "experts=16"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(
        "error: Invalid value for --set: experts has its own option: give --experts"
    )
    result = subprocess.run([*cmd[:4], "--set", "calib-length=64"], capture_output=True, text=True)
    assert "calib_length has its own option: give --calib-length instead" in result.stderr


@pytest.mark.parametrize(
    "args,line",
    [
        (["--calib-tokens", "0"], "error: --calib-tokens: Input should be greater than or equal to 1"),
        (["--dense-layers", "-1"], "error: --dense-layers: Input should be greater than or equal to 0"),
        (
            ["--set", "refine_iters=-1"],
            "error: --set refine_iters: Input should be greater than or equal to 0",
        ),
        # 2^64 failed after the configuration was announced, as "Overflow when unpacking long long"
        (["--seed", str(2**64)], "error: --seed: Input should be less than or equal to 18446744073709551615"),
    ],
)
def test_a_setting_out_of_range_is_named_as_given(tiny_models, tmp_path, args, line):
    cmd = [
        sys.executable,
        "-m",
        "moecarve.cli",
        str(tiny_models["llama"]),
        *args,
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.strip().splitlines() == [line]


def _no_tokenizer(src, tmp_path):
    for path in src.glob("tokenizer*"):
        path.unlink()
    return src, None, tmp_path / "o"


def _tokenizer_beyond_embeddings(src, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(["expert"])  # one id past the embedding rows
    tokenizer.save_pretrained(src)
    (tmp_path / "c.txt").write_text("the expert router " * 200)
    return src, tmp_path / "c.txt", tmp_path / "o"


def _bin_only(src, tmp_path):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # a .bin checkpoint's name
    return src, None, tmp_path / "o"


@pytest.mark.parametrize(
    ("setup", "settings", "error", "message"),
    [
        (lambda src, tmp: (src, None, tmp / "o"), {"dense_layers": 9}, ValueError, "leaves no MoE layer of the model's 2: give at most 1"),
        (lambda src, tmp: (src, None, tmp / "o"), {"dense_layers": 2}, ValueError, "leaves no MoE layer of the model's 2: give at most 1"),
        (lambda src, tmp: (src, None, tmp / "o"), {"calib_length": 4096, "calib_tokens": 4096}, ValueError, r"4096 exceeds the model's \d+ positions"),
        (_bin_only, {}, SourceError, "only safetensors checkpoints are read"),
        (lambda src, tmp: (src, tmp / "missing.txt", tmp / "o"), {}, CalibrationError, "calibration source not found"),
        (lambda src, tmp: (src, (tmp / "texts").mkdir() or tmp / "texts", tmp / "o"), {}, CalibrationError, "directory holding no .txt files"),
        (lambda src, tmp: (src, None, (tmp / "o").write_text("x") and tmp / "o"), {}, OutputError, "exists and is not a directory"),
        (lambda src, tmp: (src, None, (tmp / "f").write_text("x") and tmp / "f" / "sub"), {}, OutputError, "f is a file, not a directory"),
        (_no_tokenizer, {}, SourceError, "src holds no tokenizer"),
        (_tokenizer_beyond_embeddings, {}, SourceError, r"token id (\d+), the embeddings have \1 rows"),
    ],
    ids=["dense_layers", "all_layers_dense", "calib_length", "bin_only", "calib_missing", "calib_dir_empty", "out_is_file", "out_under_a_file", "no_tokenizer", "tokenizer_beyond_embeddings"],
)  # fmt: skip
def test_more_refusals_before_work(setup, settings, error, message, tmp_path):
    """Each refusal comes before any layer is read: nothing beside the output, the source unchanged."""
    from tests.conftest import make_model

    src, calib, out = setup(make_model(tmp_path / "src", "llama"), tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message):
        carve(src, CarveConfig(**{**TINY, **settings}), calib, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_output_never_replaces_the_current_directory_and_defaults_to_the_models_name(
    tiny_models, calib_file, tmp_path, monkeypatch
):
    import shutil

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", ""):
        with pytest.raises(OutputError, match="replace the current directory"):
            carve(tiny_models["llama"], CarveConfig(**TINY), calib_file, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not list(here.iterdir())
    dotted = shutil.copytree(tiny_models["llama"], tmp_path / "Qwen2.5-0.5B")
    result = carve(dotted, CarveConfig(experts=8, active=2, **TINY), calib_file, None, progress=False)
    assert result.out == here / "Qwen2.5-0.5B-S1A2E8"


def test_hub_datasets_without_a_text_column_are_refused_in_one_line(hub_datasets):
    from moecarve.carve.calib import read_text

    hub_datasets(
        {"org/plain": [{"text": "the router"}, {"text": "the expert"}], "org/pairs": [{"q": "a", "a": "b"}]}
    )
    assert read_text("org/plain") == ("the router\n\nthe expert", "hub dataset org/plain")
    with pytest.raises(
        CalibrationError, match=r"hub dataset 'org/pairs' has no \"text\" string column: \['a', 'q'\]"
    ):
        read_text("org/pairs")


def test_a_config_that_does_not_describe_the_weights_is_refused_before_work(tmp_path, calib_file):
    from tests.conftest import make_model

    src = make_model(tmp_path / "src", "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(
        SourceError, match=r"mlp.gate_proj.weight has shape \[96, 48\] in the checkpoint, \[128, 48\]"
    ):
        carve(src, CarveConfig(**TINY), calib_file, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_calibration_tokens_not_a_multiple_of_the_length_warn(tiny_models, calib_file):
    from transformers import AutoTokenizer

    from moecarve.carve.calib import calibration

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    with pytest.warns(UserWarning, match="--calib-tokens 1000 is not a multiple of --calib-length 128: 896"):
        assert calibration(tokenizer, calib_file, 1000, 128).tokens == 896


def test_settings_refuse_a_flag_for_a_number_and_a_word_for_a_flag():
    """pydantic's lax mode took `active=True` as 1 (a carve of one routed expert) and `"no"` as
    false; every stage's settings refuse both, from Python as from a recipe."""

    from moecarve.esft.train import EsftConfig
    from moecarve.tune.recover import RecoverConfig

    for make, message in (
        (lambda: CarveConfig(active=True), "active\n  Input should be a valid integer"),
        (lambda: CarveConfig(balance=False), "balance\n  Input should be a valid number"),
        (lambda: RecoverConfig(steps=True), "steps\n  Input should be a valid integer"),
        (lambda: RecoverConfig(steps=2, gradient_checkpointing="no"), "Input should be a valid boolean"),
        (lambda: EsftConfig(lr=True), "lr\n  Input should be a valid number"),
        (lambda: EsftConfig(beta1=2.0), "beta1\n  Input should be less than 1"),
        (lambda: EsftConfig(max_grad_norm=-1), "max_grad_norm\n  Input should be greater than or equal to 0"),
    ):
        with pytest.raises(ValidationError, match=message):
            make()
    # seeds in numpy's range, which transformers' set_seed needs: refused before any model loads
    for make in (lambda: RecoverConfig(steps=2, seed=2**32), lambda: EsftConfig(seed=-1)):
        with pytest.raises(ValidationError, match="seed\n  Input should be"):
            make()
    assert CarveConfig(active=2, balance="0.5").balance == 0.5  # numbers as strings, as the CLI gives them


def test_the_python_api_names_an_argument_of_the_wrong_kind(tiny_models, calib_file, tmp_path):
    import torch

    import moecarve.kernels
    from moecarve.eval.ppl import evaluate_ppl

    loaded = torch.nn.Linear(2, 2)  # a loaded model where a path belongs: its repr was taken as a file name
    with pytest.raises(TypeError, match="model must be a directory, a .gguf file or a hub id, got a Linear"):
        carve(loaded, out=tmp_path / "a")
    with pytest.raises(TypeError, match="a model is given as its directory .*, got a Linear"):
        evaluate_ppl(loaded)
    with pytest.raises(TypeError, match="enable takes a loaded model .*, got a str"):
        moecarve.kernels.enable(str(tiny_models["llama"]))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "carve.json").write_text("{}")
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):  # "no" is truthy
        carve(
            tiny_models["llama"], CarveConfig(experts=4, active=2), calib_file, tmp_path / "b", overwrite="no"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["carve.json"]


def test_experts_of_padding_only_are_refused_and_much_padding_is_warned_of(tiny_models, calib_file, tmp_path):
    """Experts round up to multiples of 8 neurons and the zero padding goes to routed experts: a
    routed expert of padding alone (never useful, never chosen) is refused before any work, and
    padding over a tenth of the FFN is warned of, as the active fraction counts it."""
    llama = tiny_models["llama"]  # d_h 96
    for settings, left in (({"experts": 16, "shared": 12}, "leave 0 neuron\\(s\\) for 4"),  # 12 x 8 = 96
                           ({"experts": 96}, "leave 88 neuron\\(s\\) for 95")):  # fmt: skip
        with pytest.raises(ValueError, match=f"experts of 8 neurons .* {left} routed experts"):
            carve(llama, CarveConfig(**{**TINY, "active": 2, **settings}), calib_file, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.warns(MoecarveWarning, match="S1A2E8: 32 of the 128 expert neurons are zero padding"):
        carve(llama, CarveConfig(**{**TINY, "experts": 8, "active": 2}), calib_file, tmp_path / "o")
    with pytest.raises(ValueError, match="use --experts >= 3"):  # --shared 0 is no way out
        CarveConfig(experts=2, active=1)
