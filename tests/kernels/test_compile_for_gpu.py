"""The kernels compile for the GPUs they are written for, on a machine without one.

The interpreter (the other CPU tests) runs the kernels' arithmetic but not the NVIDIA compiler, so
a kernel can pass there and still fail to compile, or ask for more shared memory than the chip
has. Here Triton compiles every path for sm_90 (H100/H200) and sm_89 (L4/L40S/RTX 40xx, 99 KiB of
shared memory per block) through benchmarks/kernels_compile.py's stand-in driver, in a subprocess
so that nothing in this process is left patched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import kernels_compile as kc
kc.install_target(CAPABILITY)
from moecarve.kernels.ops import moe_ffn as ops
from moecarve.kernels.ops.router import sigmoid_topk
H, m, E, S, K = 576, 96, 7, 1, 2  # a small layer: hidden not a power of two
for dtype in (torch.bfloat16, torch.float32):
    w13, w2 = torch.empty(E, 2 * m, H, dtype=dtype), torch.empty(E, H, m, dtype=dtype)
    shared = (torch.empty(S * m, H, dtype=dtype), torch.empty(S * m, H, dtype=dtype), torch.empty(H, S * m, dtype=dtype))
    for T in (1, 5, 16, 64):
        x, idx, wts = torch.empty(T, H, dtype=dtype), torch.zeros(T, K, dtype=torch.int64), torch.ones(T, K)
        ops.moe_ffn_decode(x, idx, wts, w13, w2, shared)
        ops.moe_ffn_dense(x, idx, wts, w13, w2, shared)
        ops.moe_ffn_grouped(x, idx, wts, w13, w2, None)
        sigmoid_topk(x, torch.empty(E, H, dtype=dtype), torch.zeros(E), K, True, 1.0)
print(json.dumps(kc.compiled_kernels()))
"""


@pytest.mark.parametrize("capability", [90, 89])
def test_every_path_compiles_within_the_chips_shared_memory(capability):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("CAPABILITY", str(capability))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    names = {k["kernel"] for k in kernels}
    assert names == {
        "_decode_up_kernel", "_decode_down_kernel", "_grouped_up_kernel", "_grouped_down_kernel",
        "_dense_down_kernel", "_router_logits_kernel", "_sigmoid_topk_kernel",
    }  # fmt: skip
    assert {k["activations"] for k in kernels} == {"*bf16", "*fp32", None}
    for kernel in kernels:
        assert 0 <= kernel["shared_bytes"] <= {90: 227, 89: 99}[capability] * 1024, kernel
        assert kernel["registers"] > 0, kernel
        if not kernel["kernel"].startswith(("_router", "_sigmoid")):  # the FFN kernels pipeline through it
            assert kernel["shared_bytes"] > 0, kernel


ALIGN_SCRIPT = """
import collections, json, sys, torch
sys.path.insert(0, "benchmarks")
import kernels_compile as kc
kc.install_target(90)
from moecarve.kernels.ops import moe_ffn as ops
H, E, S, K, dt = 256, 5, 1, 2, torch.bfloat16
found = collections.defaultdict(dict)
for m in (48, 40):
    w13, w2 = torch.empty(E, 2 * m, H, dtype=dt), torch.empty(E, H, m, dtype=dt)
    shared = (torch.empty(S * m, H, dtype=dt), torch.empty(S * m, H, dtype=dt), torch.empty(H, S * m, dtype=dt))
    seen = {id(c) for c in kc._all_compiled()}
    # decode without a shared expert too: h's rows are then E * I wide (200 at 40, a multiple of 8 only)
    for T, run, sh in ((1, ops.moe_ffn_decode, None), (16, ops.moe_ffn_dense, shared), (64, ops.moe_ffn_grouped, None)):
        run(torch.empty(T, H, dtype=dt), torch.zeros(T, K, dtype=torch.int64), torch.ones(T, K), w13, w2, sh)
    for name, kernel in kc._kernels():
        for cache in kernel.device_caches.values():
            for c in cache[0].values():
                if id(c) not in seen and not name.startswith(("_router", "_sigmoid")):
                    found[name][m] = kc.memory_ops(c.asm["ptx"])
print(json.dumps(found))
"""


def test_experts_of_any_multiple_of_8_rows_load_as_multiples_of_16_do():
    """An expert of 344 rows (11008 / 32) is 8-aligned, not 16: Triton assumes alignment only of
    integers divisible by 16, so unless told (I_ALIGN), it loaded such experts' down rows in 2-byte
    scalars, unpipelined (sm_90 PTX of every FFN kernel at I = 40 against I = 48, bf16). Neither
    size is a multiple of the K tile, so the loops over I's last columns run too: Triton 3.6 (the
    GPU machine's) loaded those in 2-byte scalars while their start was written as I - I % B."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", ALIGN_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) == {
        "_decode_up_kernel", "_decode_down_kernel", "_grouped_up_kernel", "_grouped_down_kernel", "_dense_down_kernel",
    }  # fmt: skip
    for name, by_rows in found.items():
        assert by_rows["40"] == by_rows["48"], name  # the same loads and stores, instruction for instruction
        assert "ld.global.b16" not in by_rows["40"], (name, by_rows["40"])  # no 2-byte scalar loads
        assert any(op.startswith("cp.async") for op in by_rows["40"]), (
            name
        )  # weights pipelined through shared memory


def test_pipelines_are_sized_to_the_chips_shared_memory(monkeypatch):
    """The H100's tuned 160 KiB of tiles where the chip has room, 8 KiB under a smaller chip's
    limit, and at least one stage."""
    from moecarve.kernels.ops import moe_ffn as ops

    assert ops.shared_memory_budget(None) == ops.shared_memory_budget(227 * 1024) == 160 * 1024
    assert ops.shared_memory_budget(99 * 1024) == 91 * 1024
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "_shared_memory_limit", lambda device: 99 * 1024)
    assert ops._stages(4, 40 * 1024, cuda) == 2  # 160 KiB would allow 4
    assert ops._stages(4, 200 * 1024, cuda) == 1  # never fewer than one
    monkeypatch.setattr(ops, "_shared_memory_limit", lambda device: 227 * 1024)
    assert ops._stages(3, 40 * 1024, cuda) == 3  # never more than asked
