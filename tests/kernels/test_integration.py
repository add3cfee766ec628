"""enable()/experts_implementation on a tiny random Glm4Moe model, fallbacks and bad inputs."""

import subprocess
import sys
import warnings

import pytest
import torch

import moecarve.kernels as K
from moecarve.kernels import functional


def tiny_glm4_moe(dtype=torch.float32, device="cpu"):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=5, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, num_mtp_layers=0,
        partial_rotary_factor=1.0, norm_topk_prob=True, routed_scaling_factor=2.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.set_experts_implementation("eager")
    return model


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def assert_same_logits(model, device, tol):
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    eager = logits(model, ids)
    assert K.enable(model) == 2  # both decoder layers are MoE (first_k_dense_replace=0)
    fused = logits(model, ids)
    assert K.disable(model) == 2
    assert torch.equal(logits(model, ids), eager)  # disable restores the eager forward
    assert ((fused - eager).norm() / eager.norm()).item() < tol
    K.register_experts_implementation()
    model.set_experts_implementation("moecarve")  # routed experts only, through the interface
    via_interface = logits(model, ids)
    assert ((via_interface - eager).norm() / eager.norm()).item() < tol


def test_tiny_model_same_logits_interpreted(interp_device):
    assert_same_logits(tiny_glm4_moe(), interp_device, 1e-4)


def test_from_pretrained_experts_implementation(interp_device, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_glm4_moe()
    model.save_pretrained(tmp_path)
    K.register_experts_implementation()
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="moecarve", dtype=torch.float32
    )
    assert loaded.config._experts_implementation == "moecarve"
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    assert ((logits(loaded, ids) - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_tiny_model_same_logits_cuda(cuda_device, dtype, tol):
    assert_same_logits(tiny_glm4_moe(dtype, cuda_device), cuda_device, tol)


def test_enable_without_moe_block_raises():
    with pytest.raises(ValueError, match="no MoE block"):
        K.enable(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _inputs():
    """Seeded: unscaled weights make sums near 0 whose fp32 rounding passes atol on a few draws."""
    g = torch.Generator().manual_seed(0)
    x, wts = torch.randn(3, 16, generator=g), torch.rand(3, 2, generator=g)
    w13, w2 = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 8, generator=g)
    return x, torch.tensor([[0, 1], [1, 2], [2, 0]]), wts, w13, w2


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(functional, "triton_interpreting", lambda: False)
    x, idx, wts, w13, w2 = _inputs()
    from moecarve.kernels import _env

    monkeypatch.setattr(_env, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        out = K.moe_ffn(x, idx, wts, w13, w2)
    torch.testing.assert_close(out, K.moe_ffn_reference(x, idx, wts, w13, w2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same fallback again: silent
        torch.testing.assert_close(K.moe_ffn(x, idx, wts, w13, w2), out)
    with pytest.raises(RuntimeError, match="cannot run"):
        K.moe_ffn(x, idx, wts, w13, w2, path="decode")


def test_no_tokens_still_refuse_an_explicit_path_that_cannot_run(interp_device):
    x, idx, wts, w13, w2 = _inputs()
    with pytest.raises(RuntimeError, match="path 'decode' cannot run: unsupported weight dtype"):
        K.moe_ffn(x[:0].double(), idx[:0], wts[:0], w13.double(), w2.double(), path="decode")


def test_tiles_are_checked_and_never_ignored(interp_device):
    from moecarve.kernels.ops.configs import DecodeConfig, DenseConfig

    with pytest.raises(ValueError, match="decode tile block_i=24 is not a power of two"):
        DecodeConfig(block_i=24)
    with pytest.raises(ValueError, match="dense tile block_k=0 is not a power of two"):
        DenseConfig(block_k=0)
    x, idx, wts, w13, w2 = _inputs()
    with pytest.raises(ValueError, match="decode_config is given, but path 'dense' does not use it"):
        K.moe_ffn(x, idx, wts, w13, w2, path="dense", decode_config=DecodeConfig())
    with pytest.raises(ValueError, match="dense_config must be a DenseConfig, got DecodeConfig"):
        K.moe_ffn(x, idx, wts, w13, w2, dense_config=DecodeConfig())


@pytest.mark.parametrize("path", ["reference", "decode", "grouped", "dense"])
def test_each_pick_counts_for_its_own_token(interp_device, path):
    """A nan gate spoils its own token alone; a pick of weight 0 is still computed (so an expert
    that overflows makes its token non-finite on every path, as in transformers)."""
    x, idx, wts, w13, w2 = _inputs()
    nan = wts.clone()
    nan[0, 1] = float("nan")  # token 0's pick of expert 1; token 1 picks expert 1 too
    out = K.moe_ffn(x, idx, nan, w13, w2, path=path)
    clean = K.moe_ffn_reference(x, idx, wts, w13, w2)
    assert out[0].isnan().all() and torch.allclose(out[1:], clean[1:], rtol=1e-4, atol=1e-5)
    zero, inf = wts.clone(), w2.clone()
    zero[2, 1], inf[0] = 0.0, float("inf")  # token 2 picks expert 0 with weight 0
    out = K.moe_ffn(x, idx, zero, w13, inf, path=path)
    assert not out[2].isfinite().all() and not out[0].isfinite().all()
    # The dense path computes a picked expert for every token of its tile (0 x inf is nan there)
    assert out[1].isfinite().all() == (path != "dense")


@pytest.mark.parametrize("bad", [-1, 6])
def test_expert_ids_of_another_model_are_refused(interp_device, bad):
    """E is transformers' sentinel (no expert); an id below 0 or above E is routing of another model,
    which transformers' experts refuse too: every path dropped its pick with no error."""
    torch.manual_seed(0)
    x, w13, w2 = torch.randn(3, 16), torch.randn(5, 24, 16), torch.randn(5, 16, 12)
    idx, wts = torch.tensor([[0, 1], [2, 5], [3, 4]]), torch.rand(3, 2)
    kept = K.moe_ffn(x, idx, wts, w13, w2, path="reference")  # id 5 == E: no expert for that pick
    masked = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(kept, K.moe_ffn(x, idx.clamp(max=4), wts * masked, w13, w2, path="reference"))
    for path in ("reference", "decode", "grouped", "dense", "auto"):
        with pytest.raises(ValueError, match=rf"expert ids must lie in \[0, 5\].*got {bad}"):
            K.moe_ffn(x, torch.tensor([[0, 1], [2, bad], [3, 4]]), wts, w13, w2, path=path)


def test_routing_on_another_device_is_refused():
    x, idx, wts, w13, w2 = _inputs()
    with pytest.raises(ValueError, match=r"topk_indices \(meta\) and topk_weights \(cpu\) must be on"):
        K.moe_ffn(x, idx.to("meta"), wts, w13, w2)


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda x, w13, w2: (x.double(), w13.double(), w2.double()), "unsupported weight dtype"),
        (lambda x, w13, w2: (x, w13.bfloat16(), w2.bfloat16()), "hidden_states dtype torch.float32 differs"),
        (
            lambda x, w13, w2: (x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2),
            "expert weights are not contiguous",
        ),
    ],
    ids=["fp64", "mixed_dtypes", "non_contiguous"],
)
def test_inputs_the_kernels_cannot_take_fall_back_or_raise(interp_device, monkeypatch, change, reason):
    """Where the Triton kernels cannot run, `auto` warns (naming why) and returns the reference's
    result; an explicit Triton path raises with the same reason instead of a wrong answer."""
    from moecarve.kernels import _env

    monkeypatch.setattr(_env, "_WARNED", set())
    x, idx, wts, w13, w2 = _inputs()
    x, w13, w2 = change(x, w13, w2)
    with pytest.warns(RuntimeWarning, match=f"{reason}.*falling back to the PyTorch reference"):
        out = K.moe_ffn(x, idx, wts, w13, w2)
    torch.testing.assert_close(out, K.moe_ffn_reference(x, idx, wts, w13, w2))
    for path in ("decode", "grouped", "dense"):
        with pytest.raises(RuntimeError, match=f"path '{path}' cannot run: {reason}"):
            K.moe_ffn(x, idx, wts, w13, w2, path=path)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "hidden_states": a["hidden_states"][:, :8]}, "shape mismatch"),
        (lambda a: {**a, "down_proj": a["down_proj"][:, :, :4]}, "shape mismatch"),
        (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, r"\[T, K\]"),
        (lambda a: {**a, "topk_indices": a["topk_indices"].float()}, "integer"),
        (
            lambda a: {
                **a,
                "topk_indices": a["topk_indices"][:, :0],
                "topk_weights": a["topk_weights"][:, :0],
            },
            "K >= 1",
        ),
        (lambda a: {**a, "shared_gate_proj": torch.randn(8, 16)}, "all three"),
        (lambda a: {**a, "path": "fast"}, "unknown path 'fast'"),
        (
            lambda a: {**a, "gate_up_proj": a["gate_up_proj"][:0], "down_proj": a["down_proj"][:0]},
            "no expert",
        ),
    ],
    ids=["hidden", "inter", "topk_shape", "idx_dtype", "no_picks", "partial_shared", "path", "no_experts"],
)
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "traced"])
def test_bad_inputs_raise(mutate, match, fake):
    """Eager calls, and the op's fake implementation that torch.compile traces with (no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, idx, wts, w13, w2 = _inputs()
    a = mutate(
        {"hidden_states": x, "topk_indices": idx, "topk_weights": wts, "gate_up_proj": w13, "down_proj": w2}
    )
    if not fake:
        with pytest.raises(ValueError, match=match):
            K.moe_ffn(**a)
        return
    names = ("hidden_states", "topk_indices", "topk_weights", "gate_up_proj", "down_proj")
    shared = [a.get(f"shared_{p}_proj") for p in ("gate", "up", "down")]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        args = [mode.from_tensor(a[n]) for n in names] + [
            None if t is None else mode.from_tensor(t) for t in shared
        ]
        torch.ops.moecarve.moe_ffn(*args, a.get("path", "auto"))


@pytest.mark.parametrize(
    "change,match",
    [({"weight": torch.randn(4, 12)}, "router shapes"), ({"bias": torch.randn(5)}, "router shapes"),
     ({"top_k": 5}, "top_k must be between 1 and the 4")],
    ids=["hidden", "bias", "top_k"],
)  # fmt: skip
def test_router_op_bad_shapes_fail_at_trace_time(change, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = {"x": torch.randn(3, 16), "weight": torch.randn(4, 16), "bias": torch.randn(4), "top_k": 2, **change}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        torch.ops.moecarve.sigmoid_topk(fake["x"], fake["weight"], fake["bias"], fake["top_k"], True, 1.0)


@pytest.mark.parametrize("trainable", ["embeddings", "router"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradients_reach_what_is_trained(interp_device, trainable, compiled):
    """The kernels are forward-only: where autograd needs the MoE block (the input requires grad, or
    only the router trains, so only the gates do), it runs in PyTorch, eager and compiled, and the
    gradients are the stock model's."""
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    grads = []
    for use_kernels in (False, True):
        model = tiny_glm4_moe()
        for name, p in model.named_parameters():
            p.requires_grad_(
                ("embed_tokens" in name) if trainable == "embeddings" else name.endswith("mlp.gate.weight")
            )
        if use_kernels:
            K.enable(model)
        forward = torch.compile(model, backend="aot_eager") if compiled and use_kernels else model
        forward(input_ids=ids).logits.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _recording_backend(seen: set[str]):
    """A torch.compile backend: AOT autograd (which runs the ops' fake implementations), recording
    the graph's moecarve ops in `seen`."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs, **_options):
        seen.update(str(n.target) for n in gm.graph.nodes if "moecarve" in str(n.target))
        return aot_eager(gm, example_inputs)

    return backend


def _compile_recording_ops(model: torch.nn.Module, seen: set[str]):
    return torch.compile(model, fullgraph=True, backend=_recording_backend(seen), dynamic=True)


@pytest.mark.parametrize("route", ["enable", "experts_implementation"])
def test_compiles_as_one_graph_with_the_kernels_as_ops(interp_device, route):
    """torch.compile(fullgraph=True) of a model through the kernels: no graph break (the kernels are
    opaque ops, not traced), the eager logits, and the eager greedy tokens from a compiled forward."""
    model = tiny_glm4_moe()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = logits(model, ids)
        eager_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
    if route == "enable":
        K.enable(model)
    else:
        K.register_experts_implementation()
        model.set_experts_implementation("moecarve")
    seen: set[str] = set()
    compiled = _compile_recording_ops(model, seen)
    with torch.no_grad():
        got = compiled(input_ids=ids).logits.float()
        model.forward = _compile_recording_ops(model.forward, seen)
        tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert ((got - eager).norm() / eager.norm()).item() < 1e-4
    assert torch.equal(tokens, eager_tokens)
    want = {"moecarve.moe_ffn"} | ({"moecarve.sigmoid_topk"} if route == "enable" else set())
    assert seen == want


def test_static_cache_generate_compiles_through_the_ops(interp_device):
    """generate(cache_implementation="static") compiles the forward itself (transformers' auto-compile,
    on every device here): one graph with the kernels' ops in it, the eager tokens."""
    from transformers import CompileConfig

    model = tiny_glm4_moe()
    prompt = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        eager_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
    K.enable(model)
    seen: set[str] = set()
    config = CompileConfig(fullgraph=True, backend=_recording_backend(seen), dynamic=False)
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only otherwise
    with torch.no_grad():
        tokens = model.generate(
            prompt, max_new_tokens=5, do_sample=False, cache_implementation="static", compile_config=config
        )
    assert torch.equal(tokens, eager_tokens)
    assert seen == {"moecarve.moe_ffn", "moecarve.sigmoid_topk"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_compiled_with_cuda_graphs_same_logits_cuda(cuda_device, dtype, tol):
    """torch.compile(mode="reduce-overhead"): inductor's CUDA graphs replay the kernels' launches."""
    model = tiny_glm4_moe(dtype, cuda_device)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0)).to(cuda_device)
    eager = logits(model, ids)
    K.enable(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got = logits(compiled, ids)
    assert ((got - eager).norm() / eager.norm()).item() < tol


def test_router_op_falls_back_to_pytorch(monkeypatch):
    """Where Triton cannot run, the compiled router computes the same routing in PyTorch."""
    from moecarve.kernels import integration
    from moecarve.kernels.ops.reference import sigmoid_topk_reference

    monkeypatch.setattr(integration, "triton_unsupported_reason", lambda *args: "no triton here")
    x, w, bias = torch.randn(5, 16), torch.randn(4, 16), torch.randn(4)
    idx, wts = torch.ops.moecarve.sigmoid_topk(x, w, bias, 2, True, 2.0)
    ref_idx, ref_wts = sigmoid_topk_reference(x, w, bias, 2, True, 2.0)
    assert idx.dtype == torch.int32 and wts.dtype == torch.float32
    assert torch.equal(idx, ref_idx.int())
    torch.testing.assert_close(wts, ref_wts)


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
def test_ops_pass_opcheck(interp_device, shared):
    """The ops' schemas and fake implementations agree with what they compute (torch.library.opcheck)."""
    x, idx, wts, w13, w2 = _inputs()
    parts = (torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8)) if shared else (None, None, None)
    torch.library.opcheck(torch.ops.moecarve.moe_ffn.default, (x, idx, wts, w13, w2, *parts, "auto"))
    bias = torch.randn(3)
    torch.library.opcheck(
        torch.ops.moecarve.sigmoid_topk.default, (x, torch.randn(3, 16), bias, 2, shared, 2.0)
    )


def test_import_is_cheap_and_needs_no_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import moecarve.kernels as K, torch, warnings\n"
        "assert K.triton_unsupported_reason(torch.zeros(1, 2), [torch.zeros(1, 2)]) == 'triton is not installed'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("entry", ["moe_ffn", "moe_ffn_reference", "moe_ffn_torch"])
def test_every_public_entry_refuses_what_does_not_fit(entry):
    """The reference and the grouped_mm path are public too: mismatched routing, integer tensors or
    half a shared expert are refused there as in `moe_ffn`, never computed into a wrong answer."""
    x, idx, wts, w13, w2 = _inputs()
    shared = (torch.randn(4, 16), torch.randn(4, 16), torch.randn(16, 4))

    def call(*args, shared_parts=(None, None, None)):
        if entry == "moe_ffn_torch":
            return K.moe_ffn_torch(*args, None if shared_parts[0] is None else shared_parts)
        return getattr(K, entry)(*args, *shared_parts)

    with pytest.raises(ValueError, match=r"must both be \[T, K\] with T = 3"):
        call(x, idx[:2], wts[:2], w13, w2)  # routing of 2 tokens for 3
    with pytest.raises(ValueError, match=r"must both be \[T, K\]"):
        call(x, idx, torch.rand(3, 3), w13, w2)  # a weight more than picks
    with pytest.raises(ValueError, match="must be floating point, got .*torch.int32"):
        call((x * 4).int(), idx, wts, w13, w2)
    with pytest.raises(ValueError, match="must be floating point"):
        call(x, idx, wts, (w13 * 10).int(), (w2 * 10).int())
    if entry != "moe_ffn_torch":  # its shared expert is one argument: all three or None
        with pytest.raises(ValueError, match="all three shared expert weights"):
            call(x, idx, wts, w13, w2, shared_parts=(shared[0], None, shared[2]))
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 3\]"):
        call(x, torch.tensor([[0, 1], [1, 4], [2, 0]]), wts, w13, w2)  # on a CPU ids are checked
    torch.testing.assert_close(call(x, idx, wts, w13, w2, shared_parts=shared),
                               K.moe_ffn(x, idx, wts, w13, w2, *shared, path="reference"))  # fmt: skip
