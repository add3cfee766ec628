"""The carve on a GPU (`--device cuda`): refused before any work where the machine has none; on CUDA
(`-m gpu`) exact with every expert active, deterministic, and the CPU's carve up to rounding."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moecarve import CarveConfig, carve

TINY = {"calib_tokens": 512, "calib_length": 64}
REFUSED = [
    ("tpu", "--device 'tpu': expected cpu, cuda or cuda:N"),
    ("mps", "--device mps: carve runs on cpu or cuda"),
] + (
    []
    if torch.cuda.is_available()
    else [("cuda", "--device cuda: CUDA is not available on this machine; use cpu")]
)


@pytest.mark.parametrize(("device", "message"), REFUSED, ids=[device for device, _ in REFUSED])
def test_a_device_the_carve_cannot_use_is_refused_before_work(
    device, message, tiny_models, calib_file, tmp_path
):
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        carve(
            tiny_models["llama"],
            CarveConfig(**TINY),
            calib_file,
            tmp_path / "out",
            progress=False,
            device=device,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_a_torch_device_is_taken_and_recorded_as_its_name(tiny_models, calib_file, tmp_path):
    config = CarveConfig(experts=8, active=7, **TINY)
    result = carve(
        tiny_models["llama"], config, calib_file, tmp_path / "out", progress=False, device=torch.device("cpu")
    )
    assert result.record["resolved"]["device"] == "cpu"


def test_the_cli_refuses_a_device_in_one_line(tiny_models, tmp_path):
    cmd = [sys.executable, "-m", "moecarve.cli", str(tiny_models["llama"]), "--device", "mps"]
    result = subprocess.run([*cmd, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device mps: carve runs on cpu or cuda"]
    assert result.stdout == ""  # refused before the configuration is announced
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cuda(monkeypatch):
    """The CUDA device, with every FFN the carve fits checked to be on it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from moecarve.carve import pipeline

    fit = pipeline.carve_ffn

    def on_cuda(x, *args, **kwargs):
        assert x.device.type == "cuda" and all(w.device.type == "cuda" for w in args[:3])
        return fit(x, *args, **kwargs)

    monkeypatch.setattr(pipeline, "carve_ffn", on_cuda)
    return "cuda"


def _logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.gpu
def test_every_expert_active_on_cuda_reproduces_dense(cuda, tiny_models, calib_file, tmp_path):
    src = tiny_models["llama"]
    config = CarveConfig(experts=8, active=7, dense_layers=1, **TINY)  # bf16 calibration there
    result = carve(src, config, calib_file, tmp_path / "out", progress=False, device=cuda)
    assert (
        result.record["resolved"] | {"device": cuda, "calib_dtype": "bfloat16"} == result.record["resolved"]
    )
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(result.out, ids), _logits(src, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "settings",
    [
        {"calib_dtype": "float32", **TINY},
        # fewer tokens than the 96 neurons: the refit's [T, T] equations; the dense stream; the bias
        {"calib_tokens": 64, "calib_length": 32, "refit_target": "stream", "balance": 0.5},
    ],
    ids=["neuron_space", "token_space_stream_balanced"],
)
def test_a_sparse_cuda_carve_is_deterministic_and_the_cpu_carve_up_to_rounding(
    cuda, settings, tiny_models, calib_file, tmp_path
):
    src, config = tiny_models["qwen3"], CarveConfig(experts=8, active=2, **settings)
    runs = {
        name: carve(src, config, calib_file, tmp_path / name, progress=False, device=device)
        for name, device in (("a", cuda), ("b", cuda), ("cpu", "cpu"))
    }
    shards = sorted(p.name for p in runs["a"].out.glob("*.safetensors"))
    for name in shards:
        a, b = load_file(runs["a"].out / name), load_file(runs["b"].out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The partition is discrete, so rounding may move a neuron; each layer's error stays the CPU's.
    for on_cuda, on_cpu in zip(runs["a"].record["layers"], runs["cpu"].record["layers"], strict=True):
        assert on_cuda["relative_error"] == pytest.approx(on_cpu["relative_error"], rel=0.1, abs=0.01)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    dense, gpu, cpu = (_logits(path, ids) for path in (src, runs["a"].out, runs["cpu"].out))
    assert (gpu - cpu).norm() <= 0.5 * (cpu - dense).norm()


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-carve-check.sh"


def _steps() -> list[list[str]]:
    """argv of every `step LIMIT CMD...` line of the GPU script, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [shlex.split(line) for line in re.findall(r"^step \d+ (.+)$", text, flags=re.M)]


class _Parsed(Exception):
    """Raised in place of running a benchmark once its arguments have parsed."""


def test_the_gpu_script_parses_before_a_rare_device_session_is_spent_on_it(monkeypatch):
    """Bash accepts it, each benchmark step's flags parse, and its pytest step selects the GPU tests."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    steps = _steps()
    assert [argv[1] for argv in steps] == [
        "-m",
        "benchmarks/carve_streaming.py",
        "benchmarks/carve_streaming.py",
    ]
    monkeypatch.syspath_prepend(str(SCRIPT.parents[1] / "benchmarks"))
    import carve_streaming

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for argv in steps[1:]:
        with pytest.raises(_Parsed):  # argparse exits (SystemExit) on an unknown flag or a bad value
            carve_streaming.main(argv[2:])
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", *(a for a in steps[0][3:] if a != "-q"), "--collect-only"],
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
    )
    selected = re.search(r"(\d+)(?:/\d+)? tests? collected", collected.stdout)
    assert selected and int(selected.group(1)) > 0, collected.stdout[-2000:]


@pytest.mark.gpu
def test_the_refines_per_expert_sums_on_cuda_are_the_same_every_time(cuda):
    """CUDA's index_add adds in no fixed order; the sums the refine ranks experts by must not."""
    from moecarve.carve.partition import _expert_sums

    generator = torch.Generator().manual_seed(0)
    score = torch.randn(16384, 1344, generator=generator).to(cuda)
    labels = (torch.arange(1344) % 7)[torch.randperm(1344, generator=generator)].to(cuda)
    first = _expert_sums(score, labels, 7)
    assert all(torch.equal(first, _expert_sums(score, labels, 7)) for _ in range(5))
    expected = torch.zeros(16384, 7, dtype=torch.float64).index_add_(1, labels.cpu(), score.cpu().double())
    torch.testing.assert_close(first.cpu().double(), expected, rtol=1e-5, atol=1e-3)
