"""The GPU benchmarks run end to end on CPU (Triton interpreter, tiny shapes), so that a device
session, rare and short, is not spent on a benchmark that crashes. Timings here mean nothing; the
rows' fields and correctness columns are what is checked."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ffn_benchmark_grid_runs(interp_device, tmp_path):
    import ffn_kernels

    ffn_kernels.main(["--device", "cpu", "--hidden", "64", "--intermediate", "256", "--configs", "S2A2E16",
                      "--batches", "1", "16", "--reps", "3", "--flush-bytes", "1e3", "--out", str(tmp_path)])  # fmt: skip
    got = rows(tmp_path / "ffn_kernels.jsonl")
    assert (tmp_path / "ffn_kernels.csv").is_file()
    impls = {(r["batch"], r["impl"]) for r in got}
    for impl in ("dense", "moecarve", "moecarve_decode", "moecarve_block", "hf_eager_block"):
        assert {(1, impl), (16, impl)} <= impls
    assert {(16, "moecarve_dense"), (16, "moecarve_grouped"), (1, "moecarve_decode_shared_after")} <= impls
    for r in got:
        assert r["median_us"] > 0 and r["ideal_speedup"] >= 1 and r["hit_experts"] <= r["routed"]
        if r["rel_err"] is not None:  # every kernel path against the float32 reference
            assert r["rel_err"] < 0.02, r


def test_ffn_benchmark_router_runs(interp_device, tmp_path):
    import ffn_kernels

    ffn_kernels.main(["--router", "--device", "cpu", "--hidden", "600", "--configs", "S2A4E32", "--batches", "1",
                      "--reps", "3", "--flush-bytes", "1e4", "--out", str(tmp_path)])  # fmt: skip
    got = rows(tmp_path / "router.jsonl")
    assert {(r["router_weight_dtype"], r["impl"]) for r in got} == {
        (dtype, impl)
        for dtype in ("float32", "bfloat16")
        for impl in ("moecarve_router", "moecarve_router_one_per_token", "hf_router")
    }
    for r in got:
        assert r["topk_match_frac"] == 1.0 and r["calls_per_graph"] >= 2, r
    programs = {r["impl"]: r["programs_per_token"] for r in got}
    assert programs == {"moecarve_router": 5, "moecarve_router_one_per_token": 1, "hf_router": None}


def test_ffn_benchmark_profile_runs(interp_device, tmp_path):
    """The per-kernel split of the block's time (gpu-check's step 7); on CPU the top-level ops stand
    in for the GPU's kernels."""
    import ffn_kernels

    ffn_kernels.main(["--profile", "--device", "cpu", "--hidden", "64", "--intermediate", "256", "--configs",
                      "S2A2E16", "--batches", "1", "--reps", "3", "--flush-bytes", "1e3", "--out", str(tmp_path)])  # fmt: skip
    got = rows(tmp_path / "profile.jsonl")
    assert {r["impl"] for r in got} == {"moecarve_block", "dense"}
    dense = {r["kernel"]: r["launches_per_call"] for r in got if r["impl"] == "dense"}
    assert dense["aten::linear"] == 3  # gate, up, down: per call, over the rotated weight sets
    for r in got:
        assert r["batch"] == 1 and r["hit_experts"] == 2 and r["call_median_us"] > 0, r
        assert 0 <= r["device_us"] <= r["kernels_total_us"] + 1e-6, r


def test_profile_reads_are_named_after_the_kernels():
    """The rows' bytes and GB/s are keyed by Triton kernel name; a renamed kernel would silently lose them."""
    pytest.importorskip("triton")
    import ffn_kernels

    from moecarve.kernels.ops import moe_ffn, router

    jit = {f.fn.__name__ for f in (moe_ffn._decode_up_kernel, moe_ffn._decode_down_kernel,
                                   moe_ffn._dense_down_kernel, router._router_logits_kernel)}  # fmt: skip
    assert set(ffn_kernels.KERNEL_READS) == jit


def test_per_call_times_counts_device_kernels_only():
    """On a GPU: kernels, copies and memsets, each once; not the host's launch calls or user annotations."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from moecarve.kernels.benchutil import per_call_times

    def event(i, name, start, end, device=DeviceType.CUDA, **kw):
        return FunctionEvent(i, name, thread=0, start_us=start, end_us=end, device_type=device, **kw)

    events = [
        event(0, "cudaLaunchKernel", 0, 5, DeviceType.CPU),
        event(1, "_decode_up_kernel", 10, 30),
        event(2, "_decode_up_kernel", 40, 62),
        event(3, "Memset (Device)", 70, 71),
        event(4, "block", 0, 80, is_user_annotation=True),
    ]
    assert per_call_times(events, calls=2, device=True) == {
        "_decode_up_kernel": (1.0, 21.0),
        "Memset (Device)": (0.5, 0.5),
    }
    assert per_call_times(events, calls=1, device=False) == {"cudaLaunchKernel": (1.0, 5.0)}


def test_ffn_benchmark_dense_tile_sweep_runs(interp_device, tmp_path):
    """The sweep scripts/gpu-check.sh ends with (never run on a GPU yet); a repeated batch is timed once."""
    import ffn_kernels

    ffn_kernels.main(["--tune", "--paths", "dense", "--device", "cpu", "--hidden", "64", "--intermediate", "256",
                      "--configs", "S2A2E16", "--batches", "16", "16", "--reps", "3", "--flush-bytes", "1e3", "--out",
                      str(tmp_path)])  # fmt: skip
    got = rows(tmp_path / "tune.jsonl")
    assert len(got) == 24 and {(r["path"], r["batch"]) for r in got} == {("dense", 16)}
    assert {(r["block_m"], r["block_n"], r["block_k"], r["warps"]) for r in got} == {
        (m, n, k, w) for m in (32, 64) for n in (32, 64, 128) for k in (64, 128) for w in (4, 8)
    }


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_decode_benchmark_runs(interp_device, tmp_path, compile_):
    """Eager: every experts implementation, then each step's kernels. Compiled: gpu-check's step,
    the dense model and ours only (each compile costs minutes on the GPU machine)."""
    import decode_e2e

    decode_e2e.main(["--device", "cpu", "--hidden", "128", "--intermediate", "256", "--layers", "1", "--vocab",
                     "100", "--prompt", "4", "--warmup", "1", "--tokens", "2", "--batches", "1", "--out",
                     str(tmp_path), *(["--compile", "--models", "moecarve"] if compile_ else ["--profile"])])  # fmt: skip
    got = rows(tmp_path / "decode_e2e.jsonl")
    assert all(r["tokens_per_s"] > 0 and r["setup_s"] > 0 for r in got)
    if compile_:
        assert {r["model"]: r["compiled"] for r in got} == {"dense": True, "moecarve": True}
    else:
        assert {r["model"]: r["compiled"] for r in got} == {
            "dense": False, "hf_grouped_mm": False, "hf_eager": False, "moecarve": False,
        }  # fmt: skip
        # each model's eager decode step split into its kernels (top-level ops on CPU)
        profile = rows(tmp_path / "profile.jsonl")
        linear = {r["model"]: r["launches_per_step"] for r in profile if r["kernel"] == "aten::linear"}
        assert linear["dense"] == 8  # q, k, v, o, gate, up, down, lm_head
        assert all(r["bench"] == "decode_profile" and r["step_us"] > 0 for r in profile)
        assert {r["model"] for r in profile} == {"dense", "moecarve"}


def test_decode_benchmark_refuses_a_profile_without_ours(tmp_path):
    import decode_e2e

    with pytest.raises(SystemExit):  # argparse's error, before any model is built
        decode_e2e.main(["--device", "cpu", "--profile", "--models", "hf_eager", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_ffn_benchmark_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import ffn_kernels

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        ffn_kernels.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_ffn_benchmark_quick_tune_writes_a_table(interp_device, tmp_path):
    """The path-per-batch step of scripts/gpu-check.sh: every batch size, the built-in tiles, a table."""
    import ffn_kernels

    from moecarve.kernels import tuning

    ffn_kernels.main(["--tune", "--quick", "--device", "cpu", "--hidden", "64", "--intermediate", "256",
                      "--configs", "S2A2E16", "--batches", "1", "64", "--reps", "3", "--flush-bytes", "1e3",
                      "--table-out", str(tmp_path / "tables"), "--out", str(tmp_path)])  # fmt: skip
    got = rows(tmp_path / "tune.jsonl")
    assert sorted((r["batch"], r["path"]) for r in got) == [
        (1, "decode"),
        (64, "decode"),
        (64, "dense"),
        (64, "grouped"),
    ]
    assert all(r["quick"] and r["dense_ffn_us"] > 0 for r in got)
    shape = tuning.MoeShape(14, 16, 32, 64, 2, "bfloat16")
    (path,) = (tmp_path / "tables").glob("*/*.json")
    assert path.name == shape.file_name
    table = tuning.parse_table(json.loads(path.read_text()), shape, str(path))
    assert list(table) == [1, 64] and table[1][0] == "decode"
