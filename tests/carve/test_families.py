"""Every supported family carved end to end: loads natively, exact with every expert active, generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecarve import CarveConfig, carve
from tests.conftest import FAMILIES, ROPE_SCALING, make_model

TINY = {"calib_tokens": 512, "calib_length": 64}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_experts_active_reproduces_dense(family, tiny_models, calib_file, tmp_path):
    dense_layers = 1 if family == "llama" else 0  # first_k_dense_replace is exact too
    out = carve(
        tiny_models[family],
        # bf16 calibration: the written weights must still be the source's, unrounded
        CarveConfig(experts=8, active=7, shared=1, dense_layers=dense_layers, calib_dtype="bfloat16", **TINY),
        calib_file,
        tmp_path / "out",
        progress=False,
    ).out
    dense, moe = load(tiny_models[family]), load(out)
    assert moe.config.model_type == "glm4_moe"
    ids = torch.randint(0, dense.config.vocab_size, (2, 40))
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=2e-5, rtol=1e-5)


def test_dense_layers_count_whole_in_the_recorded_active_fraction(tiny_models, calib_file, tmp_path):
    """S1A2E8 keeps 3/8 of each MoE layer's neurons; with the first of 2 layers dense, 11/16 of all
    (the config may be given as a dict, as a recipe holds it)."""
    config = {"experts": 8, "active": 2, "dense_layers": 1, **TINY}
    result = carve(tiny_models["llama"], config, calib_file, tmp_path / "out", progress=False)
    assert result.record["resolved"]["active_fraction"] == (1 + 3 / 8) / 2
    assert json.loads((result.out / "carve.json").read_text())["resolved"]["active_fraction"] == 11 / 16


@pytest.mark.parametrize("rope", sorted(ROPE_SCALING))
def test_scaled_rope_carries_over(rope, calib_file, tmp_path):
    """A source with a scaled rope (Llama 3.1's llama3, yarn) carves exactly, at positions past the
    rope's original context."""
    src = make_model(tmp_path / "src", "llama")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = ROPE_SCALING[rope]
    (src / "config.json").write_text(json.dumps(config))
    out = carve(
        src, CarveConfig(experts=8, active=7, **TINY), calib_file, tmp_path / "out", progress=False
    ).out
    dense, moe = load(src), load(out)
    assert dense.config.rope_parameters["rope_type"] == rope  # the source really is scaled
    assert moe.config.rope_parameters == {**ROPE_SCALING[rope], "partial_rotary_factor": 1.0}
    ids = torch.randint(0, dense.config.vocab_size, (1, 160))
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_partial_rotary_factor_the_source_ignores_is_not_carried(family, calib_file, tmp_path):
    """Llama's and Qwen2's rope rotate the whole head even where config.json carries a
    `partial_rotary_factor`; glm4_moe would honour it, so the carve writes 1.0."""
    src = make_model(tmp_path / "src", family)
    config = json.loads((src / "config.json").read_text())
    config["partial_rotary_factor"] = 0.5
    (src / "config.json").write_text(json.dumps(config))
    out = carve(
        src, CarveConfig(experts=8, active=7, **TINY), calib_file, tmp_path / "out", progress=False
    ).out
    dense, moe = load(src), load(out)
    assert dense.config.rope_parameters["partial_rotary_factor"] == 0.5  # transformers keeps the key...
    assert dense.model.rotary_emb.inv_freq.numel() == 6  # ...and rotates all 12 dims of each head
    assert moe.config.rope_parameters["partial_rotary_factor"] == 1.0
    ids = torch.randint(0, dense.config.vocab_size, (2, 40))
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_granite_with_tied_embeddings_carves_exactly(dtype, calib_file, tmp_path):
    """Granite 3.x ties its embeddings and scales them (x12) and its logits (/16): the written
    lm_head is the embeddings before their scale, over the logits'. A bf16 source, as Granite
    ships, written in float32 is scaled once, in float32."""
    src = make_model(tmp_path / "src", "granite", tied=True, dtype=dtype)
    config = CarveConfig(experts=8, active=7, dtype="float32", calib_dtype="float32", **TINY)
    out = carve(src, config, calib_file, tmp_path / "out", progress=False).out
    dense, moe = load(src), load(out)
    assert dense.config.tie_word_embeddings and dense.config.embedding_multiplier == 12.0
    ids = torch.randint(0, dense.config.vocab_size, (2, 40))
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=2e-5, rtol=1e-5)


def test_a_sparse_granite_carve_is_the_carve_of_its_weights_with_the_multipliers_folded(calib_file, tmp_path):
    """The calibration follows Granite's own forward (its multipliers applied where it applies them,
    a dense first layer's included): carving it sparse gives the carve of a Llama holding the
    folded weights, which exactness with every expert active could not show."""
    from safetensors.torch import load_file, save_file

    granite = make_model(tmp_path / "granite", "granite")
    config = json.loads((granite / "config.json").read_text())
    scales = {
        "model.embed_tokens.weight": config["embedding_multiplier"], "lm_head.weight": 1 / config["logits_scaling"],
        "self_attn.q_proj.weight": config["attention_multiplier"] * 12**0.5,  # 12-dim heads
        "self_attn.o_proj.weight": config["residual_multiplier"], "mlp.down_proj.weight": config["residual_multiplier"],
    }  # fmt: skip
    folded = {
        name: tensor * next((v for k, v in scales.items() if name.endswith(k)), 1.0)
        for name, tensor in load_file(granite / "model.safetensors").items()
    }
    llama = shutil.copytree(granite, tmp_path / "llama")
    save_file(folded, llama / "model.safetensors", metadata={"format": "pt"})
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(config))
    settings = CarveConfig(experts=8, active=2, dense_layers=1, calib_dtype="float32", **TINY)
    ours, theirs = (
        load(carve(src, settings, calib_file, tmp_path / f"{src.name}-out", progress=False).out)
        for src in (granite, llama)
    )
    ids = torch.randint(0, config["vocab_size"], (2, 40))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)


def test_phi4_mini_like_source_carves_exactly(calib_file, tmp_path):
    """Phi-4-mini's shape: fused q/k/v and gate/up, a partial rotary, longrope and tied embeddings;
    compared past the rope's original context, where longrope switches to its long factors."""
    src = make_model(tmp_path / "src", "phi3", tied=True)
    config = json.loads((src / "config.json").read_text())
    del config["rope_parameters"]  # written as Phi-4-mini's config.json writes them
    config.update(
        partial_rotary_factor=0.5,
        original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 3.0, 5.0]},
    )
    (src / "config.json").write_text(json.dumps(config))
    out = carve(
        src, CarveConfig(experts=8, active=7, **TINY), calib_file, tmp_path / "out", progress=False
    ).out
    dense, moe = load(src), load(out)
    assert dense.model.rotary_emb.inv_freq.numel() == 3  # the source really rotates half of each head
    assert dense.config.rope_parameters["rope_type"] == moe.config.rope_parameters["rope_type"] == "longrope"
    written = json.loads((out / "config.json").read_text())
    assert written["partial_rotary_factor"] == written["rope_parameters"]["partial_rotary_factor"] == 0.5
    for length in (40, 160):
        ids = torch.randint(0, dense.config.vocab_size, (1, length))
        torch.testing.assert_close(logits(moe, ids), logits(dense, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_carve_loads_and_generates(family, tiny_models, calib_file, tmp_path):
    config = CarveConfig(experts=8, active=2, shared=1, dense_layers=1, **TINY)
    out = carve(tiny_models[family], config, calib_file, tmp_path / "out", progress=False).out
    moe = load(out)
    assert moe.config.first_k_dense_replace == 1
    assert moe.config.n_routed_experts == 7 and moe.config.num_experts_per_tok == 2
    router = moe.model.layers[1].mlp.gate
    assert router.weight.abs().sum() > 0, "a sparse carve needs a fitted router"
    assert router.e_score_correction_bias.dtype == torch.float32
    generated = moe.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    record = json.loads((out / "carve.json").read_text())
    assert record["calibration"]["tokens"] == 512
    assert record["resolved"]["name"] == "S1A2E8"
    assert record["resolved"]["calib_dtype"] in ("float32", "bfloat16")  # what "auto" resolved to
    carved = [layer for layer in record["layers"] if not layer.get("dense")]
    assert carved and all(1 <= layer["refine_iterations"] <= 6 for layer in carved)
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("dtype", "refit", "calib_dtype", "refit_target"),
    [
        (torch.float32, None, "float32", "layer"),
        (torch.float32, 0.1, "float32", "layer"),
        (torch.float32, "auto", "float32", "layer"),
        (torch.float32, 0.1, "float32", "stream"),
        (torch.float32, 0.1, "bfloat16", "stream"),
        (torch.bfloat16, None, "float32", "layer"),
    ],
)
def test_checkpoint_computes_what_the_carve_computed(
    dtype, refit, calib_dtype, refit_target, tmp_path, calib_file, monkeypatch
):
    """Each written MoE layer, reloaded by transformers, gives the carve's own output on its inputs."""
    from moecarve.carve import pipeline
    from tests.conftest import make_model

    src = make_model(tmp_path / "src", "llama", dtype=dtype)
    seen = []

    def recording(x, *args, **kwargs):
        carved, out = carve_ffn(x, *args, **kwargs)
        seen.append((x, carved.routing(x) > 0, out))
        return carved, out

    carve_ffn = pipeline.carve_ffn
    monkeypatch.setattr(pipeline, "carve_ffn", recording)
    config = CarveConfig(
        experts=8, active=3, refit_ridge=refit, refit_target=refit_target, calib_dtype=calib_dtype, **TINY
    )
    out = carve(src, config, calib_file, tmp_path / "o", progress=False).out
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for layer, (x, selected, expected) in zip(moe.model.layers, seen, strict=True):
        _, gates, picks = layer.mlp.gate(x)
        torch.testing.assert_close(gates, torch.ones_like(gates), atol=6e-3, rtol=0)  # training-free: ~1
        # the written router picks for every token the experts the carve picked (its weight rounded
        # to the checkpoint's dtype before the carve routed with it)
        assert torch.equal(torch.zeros_like(selected).scatter_(1, picks, True), selected)
        with torch.no_grad():
            got = layer.mlp(x)
        if calib_dtype == "float32":  # fp32 products, even over bf16 weights: the carve's output
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        else:  # bf16 products: the same routing, the carve's output rounded
            assert (got - expected).norm() / expected.norm() < 6e-3


def test_tied_source_writes_explicit_lm_head_and_pads_uneven_split(tmp_path, calib_file):
    from tests.conftest import make_model

    src = make_model(tmp_path / "tied", "llama", intermediate=100, tied=True)
    out = carve(
        src, CarveConfig(experts=8, active=7, **TINY), calib_file, tmp_path / "out", progress=False
    ).out
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (
        config["moe_intermediate_size"] == 16
    )  # 100 / 8 rounded up to a multiple of 8: 28 zero neurons pad the split
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"] == 1.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    ids = torch.randint(0, 300, (1, 30))
    torch.testing.assert_close(logits(load(out), ids), logits(load(src), ids), atol=2e-5, rtol=1e-5)


def test_same_inputs_give_bit_identical_tensors(tiny_models, calib_file, tmp_path):
    from safetensors.torch import load_file

    config = CarveConfig(experts=8, active=2, **TINY)
    a = carve(tiny_models["qwen3"], config, calib_file, tmp_path / "a", progress=False).out
    b = carve(tiny_models["qwen3"], config, calib_file, tmp_path / "b", progress=False).out
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in shards:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_auto_refit_ridge_grows_as_tokens_per_neuron_fall(tiny_models, calib_file, tmp_path):
    """With few calibration tokens per neuron the refit still runs, with a larger ridge (recorded)."""
    ridges = {}
    for tokens in (128, 512):
        result = carve(
            tiny_models["llama"],
            CarveConfig(experts=8, active=2, calib_tokens=tokens, calib_length=64),
            calib_file,
            tmp_path / str(tokens),
            progress=False,
        )
        ridges[tokens] = {layer["refit_ridge"] for layer in result.record["layers"]}
    neurons = 8 * 16  # the carved layer's: 96 padded to 8 experts of 16 (16-byte aligned in bf16)
    assert ridges == {128: {(neurons / 128) ** 2}, 512: {(neurons / 512) ** 2}}


def test_balance_evens_the_load_of_every_layer(tiny_models, calib_file, tmp_path):
    """--balance 1 biases the router towards equal loads on the calibration tokens (recorded per layer)."""
    imbalance = {}
    for balance in (0.0, 1.0):
        result = carve(
            tiny_models["llama"],
            CarveConfig(experts=8, active=2, calib_tokens=512, calib_length=64, balance=balance),
            calib_file,
            tmp_path / str(balance),
            progress=False,
        )
        imbalance[balance] = [layer["load_imbalance"] for layer in result.record["layers"]]
    assert all(after < before for before, after in zip(imbalance[0.0], imbalance[1.0], strict=True)), (
        imbalance
    )
    assert max(imbalance[1.0]) < 1.2, imbalance


def test_config_names_the_causal_lm_class(tiny_carved):
    """vLLM picks its model class from `architectures`; without it, it serves an embedding model."""
    config = json.loads((tiny_carved / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"]


@pytest.mark.parametrize("refit_target", ["layer", "stream"])  # stream: the dense stream passes too
def test_passes_of_any_size_give_the_same_carve(refit_target, tiny_models, calib_file, tmp_path, monkeypatch):
    """The calibration streams go through a layer a few sequences at a time; how many at once
    must not change what is carved (8 sequences: one pass by default, four of two here)."""
    import importlib

    from safetensors.torch import load_file

    pipeline = importlib.import_module("moecarve.carve.pipeline")
    config = CarveConfig(experts=8, active=2, refit_target=refit_target, **TINY)
    whole = carve(tiny_models["llama"], config, calib_file, tmp_path / "whole", progress=False).out
    monkeypatch.setattr(pipeline, "TOKENS_PER_PASS", 2 * TINY["calib_length"])
    passes = carve(tiny_models["llama"], config, calib_file, tmp_path / "passes", progress=False).out
    a, b = (
        load_file(whole / "model-00001-of-00001.safetensors"),
        load_file(passes / "model-00001-of-00001.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_experts_whose_split_is_not_8_aligned_are_padded_so_bf16_runs(tiny_carved, calib_file):
    """96 / 8 = 12 neurons would give down-projection rows of 24 bytes in bf16, which transformers'
    grouped_mm experts refuse ("strides should be multiple of 16 bytes"): they are padded to 16."""
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_carved / "config.json").read_text())
    assert config["moe_intermediate_size"] == 16
    record = json.loads((tiny_carved / "carve.json").read_text())["resolved"]
    assert (record["neurons_per_expert"], record["padding_neurons"]) == (16, 32)
    moe = AutoModelForCausalLM.from_pretrained(tiny_carved, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.isfinite(moe(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_padding_neurons_are_spread_over_the_experts(tiny_carved):
    """96 neurons padded to 8 x 16: no routed expert is more than half zeros (k-means put 16 into
    each of two, which then computed nothing and which no training could revive)."""
    import re

    from safetensors.torch import load_file

    tensors = {}
    for shard in tiny_carved.glob("*.safetensors"):
        tensors.update(load_file(shard))
    zeros = {}  # layer -> zero neurons per routed expert
    for name, weight in tensors.items():
        found = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", name)
        if found:
            up = tensors[name.replace("gate_proj", "up_proj")]
            dead = (weight.abs().sum(1) == 0) & (up.abs().sum(1) == 0)  # [m]
            zeros.setdefault(int(found[1]), {})[int(found[2])] = int(dead.sum())
    assert zeros
    for layer, per_expert in zeros.items():
        assert len(per_expert) == 7 and sum(per_expert.values()) == 32, layer
        assert max(per_expert.values()) <= 8, (layer, per_expert)
