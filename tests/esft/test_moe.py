"""The MoE adapter registry on every family: layers, routers, fused experts, routing log."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moecarve import moe
from tests.esft.conftest import NATIVE


def test_registry_covers_the_contract_table():
    assert set(NATIVE) == set(moe.FAMILIES)


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_layers_experts_and_routing(native_models, family):
    model = AutoModelForCausalLM.from_pretrained(native_models[family]).eval()
    config = model.config
    layers = moe.moe_layers(model)
    dense_first = getattr(config, "first_k_dense_replace", 0)
    assert [layer.index for layer in layers] == list(range(dense_first, config.num_hidden_layers))
    for layer in layers:
        params = layer.expert_parameters()
        assert params and all(p.shape[moe.EXPERT_DIM] == layer.num_experts == 8 for p in params.values())
        named = dict(model.named_parameters())
        assert all(named[name] is p for name, p in params.items())  # full names resolve in the model
        assert bool(layer.shared_parameters()) == bool(moe.FAMILIES[family].shared)
    ids = torch.randint(0, config.vocab_size, (2, 5))
    with moe.record_routing(model) as log:
        model(ids)
    assert sorted(log.layers) == [layer.index for layer in layers]
    for calls in log.layers.values():
        (routing,) = calls
        assert routing.indices.shape == routing.weights.shape == (10, config.num_experts_per_tok)
        assert routing.indices.min() >= 0 and routing.indices.max() < 8
        assert (routing.weights > 0).all()
    handles = sum(len(layer.router._forward_hooks) for layer in layers)
    assert handles == 0  # hooks removed on exit


def test_carved_model(tiny_carved):
    model = AutoModelForCausalLM.from_pretrained(tiny_carved)
    layers = moe.moe_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert set(layers[0].shared_parameters()) == {
        f"model.layers.0.mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    }


def test_dense_model_refused(tiny_models):
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    with pytest.raises(ValueError, match="dense model with no experts: carve it first"):
        moe.family_of(config)


def test_unknown_moe_family_refused():
    config = AutoConfig.for_model("olmoe")
    with pytest.raises(ValueError, match="unsupported MoE family 'olmoe'"):
        moe.family_of(config)
