"""Which MoE blocks `enable` takes, and what it leaves as is: a block must compute the same with it."""

import pytest
import torch

import moecarve.kernels as K
from tests.kernels.test_integration import logits, tiny_glm4_moe


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def test_a_block_with_parts_the_fused_forward_would_skip_is_left_as_is(interp_device, monkeypatch):
    """Qwen2-MoE's shared expert is `shared_expert`, scaled by a sigmoid `shared_expert_gate`:
    swapping its block would drop both."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from moecarve.kernels import _env

    monkeypatch.setattr(_env, "_WARNED", set())
    cfg = Qwen2MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[],
    )  # fmt: skip
    model = _randomised(Qwen2MoeForCausalLM(cfg))
    skipped = r"no MoE block taken .*\(shared_expert, shared_expert_gate\)"
    with (
        pytest.warns(K.KernelWarning, match="parts the fused forward would skip"),
        pytest.raises(ValueError, match=skipped),
    ):
        K.enable(model)
    assert "forward" not in model.model.layers[0].mlp.__dict__


def test_blocks_whose_hooks_would_be_bypassed_are_left_as_is(interp_device, monkeypatch):
    """A hook of its own kind, or accelerate's offloading (weights loaded at each call), runs in the
    modules' forwards, which the fused forward bypasses."""
    from accelerate import cpu_offload
    from accelerate.hooks import ModelHook, add_hook_to_module

    from moecarve.kernels import _env

    monkeypatch.setattr(_env, "_WARNED", set())
    model = tiny_glm4_moe()
    add_hook_to_module(model.model.layers[0].mlp, ModelHook())
    with pytest.warns(
        K.KernelWarning, match="the block: a ModelHook hook, which the fused forward would bypass"
    ):
        assert K.enable(model) == 1  # the other layer's block
    assert K.disable(model) == 1 and "_hf_hook" in model.model.layers[0].mlp.__dict__
    offloaded = cpu_offload(tiny_glm4_moe(), execution_device=torch.device("cpu"))
    ids = torch.randint(0, 96, (1, 4))
    eager = logits(offloaded, ids)
    with pytest.warns(K.KernelWarning, match="accelerate's offloading hook"), pytest.raises(ValueError):
        K.enable(offloaded)
    torch.testing.assert_close(logits(offloaded, ids), eager)


def test_a_model_dispatched_across_devices_is_taken(interp_device, monkeypatch):
    """device_map over several GPUs puts accelerate's hooks on every module; those that only move
    inputs to where the weights are keep running (the block's hook wraps the fused forward)."""
    from accelerate import dispatch_model

    names = (
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    )
    model = dispatch_model(tiny_glm4_moe(), device_map=dict.fromkeys(names, "cpu"), force_hooks=True)
    ids = torch.randint(0, 96, (1, 4))
    eager = logits(model, ids)
    assert K.enable(model) == 2 and K.enable(model) == 2  # twice: harmless
    from moecarve.kernels.ops import router

    fused, calls = router.sigmoid_topk, []
    monkeypatch.setattr(router, "sigmoid_topk", lambda *args: calls.append(1) or fused(*args))
    assert rel(logits(model, ids), eager) < 1e-4
    assert len(calls) == 2  # the fused router ran in both layers, past the gates' own hooks
    assert K.disable(model) == 2
    torch.testing.assert_close(logits(model, ids), eager)


def test_adapters_on_the_shared_expert_are_kept_and_trained(interp_device):
    """LoRA on the shared expert's parameters (as `tune` adds it to FFN weights): the shared expert
    then runs as its own module, so the adapter computes and gets its gradient."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_parameters=["shared_experts.gate_proj.weight"],
                      init_lora_weights=False)  # fmt: skip
    model = get_peft_model(tiny_glm4_moe(), lora).eval()
    ids = torch.randint(0, 96, (1, 4))
    with model.disable_adapter():
        base = logits(model, ids)
    adapted = logits(model, ids)
    assert rel(adapted, base) > 0.01
    assert K.enable(model) == 2
    assert rel(logits(model, ids), adapted) < 1e-4
    model(input_ids=ids).logits.square().mean().backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora" in name]
    assert grads and all(g is not None and g.norm() > 0 for g in grads)


def test_a_block_whose_experts_get_adapters_after_enable_runs_its_own_forward(interp_device):
    from peft import LoraConfig, get_peft_model

    model = tiny_glm4_moe()
    K.enable(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora).eval()
    ids = torch.randint(0, 96, (1, 4))
    with_kernels_enabled = logits(model, ids)
    assert K.disable(model) == 2
    torch.testing.assert_close(with_kernels_enabled, logits(model, ids))


def test_every_routed_expert_active_routes_as_the_module(interp_device):
    """K == E: the router's logits [T, E] have the weights' shape; the weights are the ones taken."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=0, partial_rotary_factor=1.0,
        routed_scaling_factor=2.0,
    )  # fmt: skip
    model = _randomised(Glm4MoeForCausalLM(cfg))
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 96, (1, 4))
    eager = logits(model, ids)
    for fused_router in (True, False):
        K.enable(model, fused_router=fused_router)
        assert rel(logits(model, ids), eager) < 1e-4
        K.disable(model)


def test_few_tokens_take_the_decode_kernels_in_a_model(interp_device, monkeypatch):
    """A model's forward over 3 tokens (E=5, K=2) goes to the decode kernels, and matches eager."""
    from moecarve.kernels.ops import moe_ffn as ops

    model = tiny_glm4_moe()
    ids = torch.randint(0, 96, (1, 3))
    eager = logits(model, ids)
    calls = []
    decode = ops.moe_ffn_decode
    monkeypatch.setattr(ops, "moe_ffn_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    K.enable(model)
    assert rel(logits(model, ids), eager) < 1e-4
    assert len(calls) == 2  # both layers


def test_hooks_on_the_router_run(interp_device):
    """A forward hook on `gate` (routing logged, or changed) runs with the fused router as without it."""
    model = tiny_glm4_moe()
    calls = []

    def first_expert_only(module, args, out):
        calls.append(module)
        logits_, weights, indices = out
        return logits_, weights, torch.zeros_like(indices)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(first_expert_only)
    ids = torch.randint(0, 96, (1, 5))
    eager = logits(model, ids)
    assert len(calls) == 2
    assert K.enable(model, fused_router=True) == 2
    assert rel(logits(model, ids), eager) < 1e-4 and len(calls) == 4
    K.disable(model)


@pytest.mark.parametrize("wrap", ["forward hook", "pre-hook", "forward replaced", "hook after enable"])
def test_routed_experts_that_compute_more_than_their_weights_run_as_their_own_module(interp_device, wrap):
    """The fused forward reads the experts' weights; hooks on the experts, or a forward another
    library replaced, were skipped with no warning (relative logit error 0.3-0.6)."""
    model = tiny_glm4_moe()
    ids = torch.randint(0, 96, (1, 6))
    experts = model.model.layers[0].mlp.experts

    def apply():
        if wrap in ("forward hook", "hook after enable"):
            experts.register_forward_hook(lambda module, args, out: out * 0.5)
        elif wrap == "pre-hook":
            experts.register_forward_pre_hook(lambda module, args: (args[0] * 0.5, *args[1:]))
        else:
            stock = experts.forward
            experts.forward = lambda *args: stock(*args) * 0.5

    if wrap != "hook after enable":
        apply()
    else:
        K.enable(model)
        apply()
    eager = logits(model, ids)
    if wrap == "hook after enable":
        K.disable(model)
        eager = logits(model, ids)
        K.enable(model)
    else:
        K.enable(model)
    assert rel(logits(model, ids), eager) < 1e-4
    K.disable(model)


def test_an_idle_output_capture_keeps_the_fused_router(interp_device, monkeypatch):
    """transformers installs its output-capturing hook on the router at the first call that asks for
    router logits (or hidden states), and keeps it: after that call, the fused router stayed off."""
    from moecarve.kernels.ops import router

    model = tiny_glm4_moe()
    ids = torch.randint(0, 96, (1, 5))
    calls = []
    fused = router.sigmoid_topk
    monkeypatch.setattr(router, "sigmoid_topk", lambda *a: calls.append(1) or fused(*a))
    eager = model(input_ids=ids, output_router_logits=True).router_logits
    K.enable(model)
    with torch.no_grad():
        captured = model(input_ids=ids, output_router_logits=True).router_logits
    assert not calls and len(captured) == len(eager) == 2  # captured from the router modules
    for got, want in zip(captured, eager, strict=True):  # layer 1's input is the kernels' output
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    logits(model, ids)
    assert len(calls) == 2  # both layers' routers fused again once nothing is captured
    K.disable(model)


def test_jitter_noise_while_training_is_kept(interp_device):
    """Mixtral's block scales its inputs by noise while training; the fused forward would skip it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5,
    )  # fmt: skip
    model = _randomised(MixtralForCausalLM(cfg)).train()
    ids = torch.randint(0, 96, (1, 5))

    def noisy_logits():
        torch.manual_seed(1)
        return model(input_ids=ids).logits.detach()

    eager = noisy_logits()
    assert K.enable(model) == 1
    assert rel(noisy_logits(), eager) < 1e-5
    K.disable(model)
