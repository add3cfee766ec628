"""eval load (hooks on the routers) and eval speed (side-by-side timing harness) on tiny models."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecarve.eval.load import count_tokens, evaluate_load, imbalance, routers
from moecarve.eval.speed import cache_kwarg, evaluate_speed, time_generation


def test_imbalance_definition():
    assert imbalance(torch.tensor([2, 2, 2, 2])) == {
        "max_over_mean": 1.0,
        "min_over_mean": 1.0,
        "idle_experts": 0,
    }
    assert imbalance(torch.tensor([8, 0, 0, 0])) == {
        "max_over_mean": 4.0,
        "min_over_mean": 0.0,
        "idle_experts": 3,
    }


def test_counts_follow_the_router(tiny_carved):
    model = AutoModelForCausalLM.from_pretrained(tiny_carved, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    gate = routers(model)[0]
    with torch.no_grad():  # a huge correction bias makes expert 3 of layer 0 everyone's pick
        gate.e_score_correction_bias[3] = 100.0
    counts = count_tokens(model, windows, progress=False)
    assert set(counts) == set(range(model.config.num_hidden_layers))
    assert counts[0][3] == 32
    for layer_counts in counts.values():
        assert layer_counts.sum() == 32 * gate.top_k  # every token goes to exactly top_k routed experts
    assert not any(hook for g in routers(model).values() for hook in g._forward_hooks.values())


def test_evaluate_load_record(tiny_carved, calib_file, tmp_path, unchanged):
    unchanged(tiny_carved)
    out = tmp_path / "load.json"
    record = evaluate_load(tiny_carved, calib_file, windows=2, length=32, out=out, progress=False)
    assert json.loads(out.read_text()) == record
    assert record["tokens"] == 64 and record["top_k"] == 2 and record["routed_experts"] == 7
    for row in record["layers"]:
        assert sum(row["tokens_per_expert"]) == 64 * 2
        assert row["max_over_mean"] == pytest.approx(max(row["tokens_per_expert"]) / (128 / 7))
    assert record["summary"]["worst_max_over_mean"] == max(r["max_over_mean"] for r in record["layers"])


def test_load_refuses_dense_before_loading_it(tiny_models, calib_file, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="has no routed experts"):
        evaluate_load(tiny_models["llama"], calib_file, windows=1, length=16, progress=False)
    # the bundled model, named as such (not by the path of its dequantized copy in the cache)
    with pytest.raises(ValueError, match="eval load: `bundled` is the dense SmolLM2-135M; carve it first"):
        evaluate_load("bundled", calib_file, windows=1, length=16, progress=False)


def test_decode_is_incremental(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    lengths = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: lengths.append(kwargs.get("input_ids", args and args[0]).shape),
        with_kwargs=True,
    )
    with warnings.catch_warnings():  # the cache goes by the forward's own keyword (no deprecation)
        warnings.simplefilter("error", FutureWarning)
        timing = time_generation(model, torch.ones(3, 10, dtype=torch.long), decode_tokens=4)
    assert lengths == [(3, 10)] + [(3, 1)] * 4  # one prefill, then one token per sequence per step
    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0


def test_cache_keyword_is_the_models_under_wrappers(tiny_models):
    """torch.compile and peft wrap forward(*args, **kwargs); the keyword is read from the model inside."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    name = cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    assert cache_kwarg(torch.compile(model)) == name
    assert cache_kwarg(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))) == name


def test_speed_side_by_side(tiny_models, tiny_carved, calib_file, tmp_path, unchanged):
    unchanged(tiny_models["llama"], tiny_carved)
    out = tmp_path / "speed.json"
    record = evaluate_speed(
        tiny_carved, tiny_models["llama"], (1, 2), prompt_length=8, decode_tokens=2, repeats=1,
        device="cpu", data=calib_file, out=out, progress=False,
    )  # fmt: skip
    assert json.loads(out.read_text()) == record
    assert record["cpu_figures"] is True and record["machine"]["device"] == "cpu"
    assert [(r["role"], r["batch"]) for r in record["rows"]] == [
        ("model", 1), ("baseline", 1), ("model", 2), ("baseline", 2),
    ]  # fmt: skip
    assert record["models"]["model"]["name"] == "S1A2E8" and record["models"]["baseline"]["name"] == "dense"
    rows = {(r["role"], r["batch"]): r for r in record["rows"]}
    for ratio in record["ratios"]:
        model, base = rows[("model", ratio["batch"])], rows[("baseline", ratio["batch"])]
        assert ratio["decode"] == pytest.approx(model["decode_tokens_per_s"] / base["decode_tokens_per_s"])
        assert ratio["prefill"] == pytest.approx(model["prefill_tokens_per_s"] / base["prefill_tokens_per_s"])


def test_speed_with_kernels_records_the_tuned_tables(tiny_carved, calib_file, tmp_path, monkeypatch):
    table = tmp_path / "tables" / "cpu" / "E99-I8-SI8-H4096-K2-float32.json"
    table.parent.mkdir(parents=True)
    table.write_text("{}")  # listed, not read: no block of this shape runs here
    monkeypatch.setenv("MOECARVE_KERNEL_CONFIGS", str(tmp_path / "tables"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the tests set it where there is no GPU
    with pytest.raises(ValueError, match="would time Triton's Python interpreter"):
        evaluate_speed(tiny_carved, None, (1,), device="cpu", data=calib_file, kernels=True, progress=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # without the interpreter: the reference path
        record = evaluate_speed(tiny_carved, None, (1,), prompt_length=4, decode_tokens=1, repeats=1,
                                device="cpu", data=calib_file, kernels=True, progress=False)  # fmt: skip
    assert record["kernels"] is True and record["kernel_tables"] == [str(table)]
    assert record["rows"][0]["decode_tokens_per_s"] > 0


def test_speed_compiled_from_the_cli(tiny_models, tiny_carved, calib_file, tmp_path, monkeypatch):
    """`eval speed --compile`: both models generate through a static cache that transformers compiles."""
    from click.testing import CliRunner

    from moecarve.eval import speed
    from moecarve.eval.cli import group

    graphs = []

    def backend(gm, example_inputs, **_options):  # compiles nothing, counts what would be
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(speed, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    out = tmp_path / "speed.json"
    args = ["speed", str(tiny_carved), "--baseline", str(tiny_models["llama"]), "--batch-sizes", "1,2",
            "--prompt-length", "6", "--decode-tokens", "3", "--repeats", "1", "--device", "cpu", "--data",
            str(calib_file), "--compile", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    torch._dynamo.reset()
    assert result.exit_code == 0, result.output
    assert "float32, compiled, median of 1" in result.output
    record = json.loads(out.read_text())
    assert record["compiled"] is True and len(record["rows"]) == 4
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in record["rows"])
    assert len(graphs) == 4  # a decode graph per model and batch size, none more in the timed runs


def test_compiled_timing_counts_every_step(tiny_models, monkeypatch):
    """Every decode step is timed, compiled once: a second run on the same cache compiles nothing."""
    from moecarve.eval import speed

    graphs = []

    def backend(gm, example_inputs, **_options):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(speed, "COMPILE_BACKEND", backend)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    steps = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: steps.append(kwargs.get("input_ids", args and args[0]).shape),
        with_kwargs=True,
    )
    prompt = torch.ones(2, 5, dtype=torch.long)
    cache = speed.static_cache(model, 10)
    torch._dynamo.reset()
    first = speed.time_compiled_generation(model, prompt, 4, cache)
    compiled = len(graphs)
    second = speed.time_compiled_generation(model, prompt, 4, cache)
    torch._dynamo.reset()
    assert compiled >= 1 and len(graphs) == compiled
    assert steps == ([(2, 5)] + [(2, 1)] * 4) * 2  # the prefill, then one token per sequence per timed step
    assert all(t["prefill_s"] > 0 and t["decode_s"] > 0 for t in (first, second))


def test_speed_text_too_short(tiny_models, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the router and the expert")
    with pytest.raises(ValueError, match="needed for the largest batch"):
        evaluate_speed(tiny_models["llama"], batch_sizes=(8,), prompt_length=64, device="cpu", data=short)


def test_speed_settings_the_run_cannot_take_are_refused_before_loading(tiny_models, calib_file, monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    model = tiny_models["llama"]  # 256 positions
    with pytest.raises(ValueError, match="--prompt-length \\+ --decode-tokens 257 exceeds the 256 positions"):
        evaluate_speed(model, prompt_length=250, decode_tokens=7, device="cpu", data=calib_file)
    with pytest.raises(ValueError, match="--batch-sizes repeats a size: 1,1,2"):
        evaluate_speed(model, batch_sizes=(1, 1, 2), device="cpu", data=calib_file)


def test_speed_baseline_with_another_tokenizer_gets_its_own_prompts(
    tiny_carved, other_tokenizer_model, calib_file, monkeypatch
):
    """A baseline whose tokenizer differs is timed on the same text in its own token ids, never on
    ids of the model's tokenizer (which may lie outside its vocabulary)."""
    from transformers import AutoTokenizer

    from moecarve.eval import speed

    baseline = other_tokenizer_model
    seen = {}
    timed = speed.time_generation

    def spy(net, prompt, decode_tokens):
        seen.setdefault(net.name_or_path, []).append(prompt)
        return timed(net, prompt, decode_tokens)

    monkeypatch.setattr(speed, "time_generation", spy)
    evaluate_speed(tiny_carved, baseline, (2,), prompt_length=8, decode_tokens=1, repeats=1,
                   device="cpu", data=calib_file, progress=False)  # fmt: skip
    text = calib_file.read_text()
    for path in (tiny_carved, baseline):
        ids = AutoTokenizer.from_pretrained(path)(text[:400], add_special_tokens=False)["input_ids"]
        prompt = seen[str(path)][-1]
        assert prompt.shape == (2, 8) and prompt.flatten().tolist() == ids[:16]
    assert not torch.equal(seen[str(tiny_carved)][-1], seen[str(baseline)][-1])


def test_speed_kernels_on_a_dense_model_are_refused_before_loading(tiny_models, calib_file, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="--kernels: .* has no MoE block"):
        evaluate_speed(tiny_models["llama"], kernels=True, device="cpu", data=calib_file, progress=False)


def test_speed_kernels_on_blocks_the_kernels_do_not_take_are_refused_before_loading(
    tiny_carved, calib_file, tmp_path, monkeypatch
):
    import shutil

    gelu = shutil.copytree(tiny_carved, tmp_path / "gelu")
    config = json.loads((gelu / "config.json").read_text())
    (gelu / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="--kernels: the kernels take none of .* activation is not SiLU"):
        evaluate_speed(gelu, kernels=True, device="cpu", data=calib_file, progress=False)
