r"""Compile every Triton kernel the FFN benchmark launches for a GPU target, on a machine without one.

A stand-in CUDA driver reports the target (sm_90 by default: the H100/H200), and each kernel launch
of the host functions becomes a compile (`JITFunction.warmup`) on CPU tensors of the benchmark's
shapes (benchmarks/ffn_kernels.py: hidden 4096, intermediate 11008 and 14336, its four
configurations and batch sizes, the paths it times at each batch; bf16 as it runs, fp16 and fp32
as the GPU tests also run). For each compiled kernel
it records the shared memory, registers and stack frame (register spills; Triton's metadata and its bundled
cuobjdump) and its global memory instructions by kind and width (from the PTX: 16-byte `cp.async` copies
into shared memory, or 2-byte scalar loads, ...), and flags what the chip would refuse at launch (shared
memory over the per-block limit) or run slowly (spills), before a GPU session finds it by failing.

    python benchmarks/kernels_compile.py                   # -> results/kernels/compile_sm90.json
    python benchmarks/kernels_compile.py --capability 89   # L4 / L40S / RTX 40xx (99 KiB per block)
    python benchmarks/kernels_compile.py --capability 89 --budget 163840 --dtypes bfloat16 \
        --out results/kernels/compile_sm89_h100_budget.json  # tiles sized as for the H100, as before
    python benchmarks/kernels_compile.py --no-vector-align --dtypes bfloat16 \
        --out results/kernels/compile_sm90_no_vector_align.json  # the kernels not told I's alignment
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ffn_kernels import BATCHES, CONFIGS, parse_config  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

# every Triton kernel, by module of moecarve.kernels.ops
KERNELS = {
    "moe_ffn": (
        "_decode_up_kernel",
        "_decode_down_kernel",
        "_grouped_up_kernel",
        "_grouped_down_kernel",
        "_dense_down_kernel",
    ),
    "router": ("_router_logits_kernel", "_sigmoid_topk_kernel"),
}
# opt-in shared memory per block (bytes): H100/H200, A100, and the sm_86/89 parts (A10, L4, L40S, RTX)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}


def install_target(capability: int) -> None:
    """Make Triton compile for `capability` (e.g. 90) without a CUDA device, and turn launches into
    compiles: nothing here can run a kernel. The host functions size their pipelines to that
    chip's shared memory, as they would on it. Irreversible: for a process of its own."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA runtime to open
            pass

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    from moecarve.kernels.ops import moe_ffn as ops

    ops._shared_memory_limit = lambda device: SHARED_LIMIT[capability]
    JITFunction.__getitem__ = lambda kernel, grid: (
        lambda *args, **kwargs: kernel.warmup(*args, grid=grid, **kwargs)
    )


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame per thread of a cubin, read by Triton's cuobjdump. These kernels
    call no functions and keep no local arrays, so a stack frame holds spilled registers (ptxas -v
    counts spill stores of about its size on the cubins checked by hand)."""
    from triton.backends.nvidia import compiler

    tool = Path(compiler.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes_per_thread": int(fields.get("STACK", 0)),
        "local_bytes": int(fields.get("LOCAL", 0)),
    }


MEMORY_OP = re.compile(r"\b(ld\.global\S*|st\.global\S*|cp\.async\.c[ag]\.shared\.global)\s[^;]*;")
COPY_BYTES = re.compile(r", (0x[0-9a-f]+)")  # cp.async's third operand: the bytes it copies


def memory_ops(ptx: str) -> dict[str, int]:
    """Global memory instructions of a kernel's PTX by kind and width, e.g. {"cp.async 16 B": 32,
    "ld.global.b16": 60}: whether its tiles load as 16-byte vectors into shared memory or as scalars."""
    counts: dict[str, int] = {}
    for match in MEMORY_OP.finditer(ptx):
        op = match.group(1)
        if op.startswith("cp.async"):
            op = f"cp.async {int(COPY_BYTES.search(match.group(0)).group(1), 16)} B"
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def compiled_kernels(first_shape: dict[int, dict] | None = None) -> list[dict]:
    """Every kernel compiled so far in this process, with its launch settings and resources, and
    the shape that first compiled it (`first_shape`, by id of the compiled kernel)."""
    rows = []
    for name, kernel in _kernels():
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                meta = compiled.metadata
                rows.append(
                    {
                        "kernel": name,
                        "constants": {kernel.arg_names[i[0]]: v for i, v in compiled.src.constants.items()},
                        # the model's dtype (the top-k kernel reads only float32 partial logits)
                        "activations": None
                        if name == "_sigmoid_topk_kernel"
                        else compiled.src.signature[kernel.arg_names[0]],
                        "num_warps": meta.num_warps,
                        "num_stages": meta.num_stages,
                        "shared_bytes": meta.shared,
                        **resource_usage(compiled.asm["cubin"]),
                        "memory_ops": memory_ops(compiled.asm["ptx"]),
                        "first_shape": (first_shape or {}).get(id(compiled)),
                    }
                )
    return rows


def compile_all(dtypes: list[torch.dtype]) -> tuple[list[dict], dict[int, dict]]:
    """Run the host functions the benchmark times on CPU tensors of its shapes (launches compile
    only). Returns the shapes and, by id of each compiled kernel, the shape that first compiled it."""
    from moecarve.kernels.ops import moe_ffn as ops
    from moecarve.kernels.ops.router import sigmoid_topk

    hidden, shapes, first_shape = 4096, [], {}
    run = {"decode": ops.moe_ffn_decode, "dense": ops.moe_ffn_dense, "grouped": ops.moe_ffn_grouped}
    for dtype, inter in itertools.product(dtypes, (11008, 14336)):
        for name in CONFIGS:
            s, a, n = parse_config(name)
            m, routed = inter // n, n - s
            w13, w2 = (
                torch.empty(routed, 2 * m, hidden, dtype=dtype),
                torch.empty(routed, hidden, m, dtype=dtype),
            )
            shared = (torch.empty(s * m, hidden, dtype=dtype), torch.empty(s * m, hidden, dtype=dtype),
                      torch.empty(hidden, s * m, dtype=dtype))  # fmt: skip
            for batch in BATCHES:
                x = torch.empty(batch, hidden, dtype=dtype)
                idx = torch.zeros(batch, a, dtype=torch.int64)
                wts = torch.ones(batch, a, dtype=torch.float32)
                paths = ["decode"] + (["dense"] if batch >= 4 else []) + (["grouped"] if batch >= 8 else [])
                shape = {"dtype": str(dtype), "intermediate": inter, "config": name, "batch": batch}
                # the fused router, weights in the model's dtype (transformers 5.17) and float32 (5.25)
                for router_dtype in dict.fromkeys((dtype, torch.float32)):
                    router = torch.empty(routed, hidden, dtype=router_dtype)
                    sigmoid_topk(x, router, torch.zeros(routed), a, True, 1.0)
                for compiled in _all_compiled():
                    first_shape.setdefault(id(compiled), {**shape, "path": "router"})
                for path in paths:
                    # the decode path also without the shared expert (run after), as the benchmark times it
                    for with_shared in (True, False) if path == "decode" and batch <= 32 else (True,):
                        run[path](x, idx, wts, w13, w2, shared if with_shared else None)
                        for compiled in _all_compiled():
                            first_shape.setdefault(
                                id(compiled), {**shape, "path": path, "shared": with_shared}
                            )
                shapes.append(shape)
    return shapes, first_shape


def _kernels():
    """(name, JITFunction) of every kernel in KERNELS."""
    import importlib

    for module, names in KERNELS.items():
        ops = importlib.import_module(f"moecarve.kernels.ops.{module}")
        yield from ((name, getattr(ops, name)) for name in names)


def _all_compiled():
    for _, kernel in _kernels():
        for cache in kernel.device_caches.values():
            yield from cache[0].values()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capability", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument(
        "--dtypes",
        default="bfloat16,float16,float32",
        help="the benchmark's is bfloat16; the GPU tests take all three",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="bytes of tiles per program instead of the target's own budget",
    )
    parser.add_argument(
        "--no-vector-align",
        action="store_true",
        help="tell the kernels nothing of I's alignment (I_ALIGN=1), as before they were told",
    )
    parser.add_argument("--out", default=None, help="default: results/kernels/compile_sm<capability>.json")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from moecarve.eval.common import source_commit

    install_target(args.capability)
    if args.budget is not None:
        from moecarve.kernels.ops import moe_ffn as ops

        ops.shared_memory_budget = lambda limit: args.budget
    if args.no_vector_align:
        from moecarve.kernels.ops import moe_ffn as ops

        ops.vector_align = lambda *sizes, itemsize: 1
    names = args.dtypes.split(",")
    if bad := [name for name in names if name not in ("bfloat16", "float16", "float32")]:
        parser.error(f"--dtypes {bad[0]}: give bfloat16, float16 or float32")
    shapes, first_shape = compile_all([getattr(torch, name) for name in names])
    kernels = compiled_kernels(first_shape)
    limit = SHARED_LIMIT[args.capability]
    problems = [
        f"{k['kernel']} {k['activations'][1:]} {k['constants']} (first at {k['first_shape']}): "
        + (
            "; ".join(
                p
                for p in (
                    f"shared memory {k['shared_bytes']} B over the {limit} B limit"
                    if k["shared_bytes"] > limit
                    else "",
                    f"{k['stack_bytes_per_thread']} B stack frame per thread (register spills)"
                    if k["stack_bytes_per_thread"] or k["local_bytes"]
                    else "",
                )
                if p
            )
        )  # fmt: skip
        for k in kernels
        if k["shared_bytes"] > limit or k["stack_bytes_per_thread"] or k["local_bytes"]
    ]
    record = {
        "benchmark": "kernels_compile",
        "target": f"cuda sm_{args.capability}, compiled without a GPU (nothing was run)",
        "shared_limit_bytes": limit,
        "tile_budget_bytes": args.budget,  # None: the target's own (moe_ffn.shared_memory_budget)
        "vector_align": not args.no_vector_align,
        "versions": {"triton": triton.__version__, "torch": torch.__version__},
        "commit": source_commit(),
        "shapes": len(shapes),
        "kernels": kernels,
        "problems": problems,
    }
    out = Path(args.out or RESULTS / f"kernels/compile_sm{args.capability}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(kernels)} kernels compiled for sm_{args.capability} over {len(shapes)} shapes -> {out}")
    for problem in problems:
        print("PROBLEM:", problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
