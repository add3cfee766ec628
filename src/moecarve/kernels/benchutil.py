"""Timing and bookkeeping shared by benchmarks/ffn_kernels.py and benchmarks/decode_e2e.py.

Times with CUDA events (CUDA graphs where the code allows it, to take launch gaps out), and
writes rows with the machine and versions to JSON lines and CSV, so docs quote files.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moecarve.carve.writer import atomic_file
from moecarve.eval.common import source_commit

from .tuning import table_files

# Datasheet HBM bandwidth in GB/s by device-name fragment (first match wins).
_SPEC_HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100": 2039.0}


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def env_info() -> dict:
    """Machine and package versions for every row."""
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    spec = next((v for k, v in _SPEC_HBM_GBPS.items() if k in name), None)
    return {
        "gpu": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "spec_hbm_gbps": spec,
        "tuned_tables": table_files(name if cuda else "cpu"),  # what moe_ffn(path="auto") follows
        "commit": source_commit(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def copy_bandwidth_gbps(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written (median of 10)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), graph=False, reps=10, warmup=3)
    return 2 * n_bytes / (times["median_us"] * 1e-6) / 1e9


def _quantiles(samples_us: list[float]) -> dict:
    t = torch.tensor(samples_us, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return {"median_us": q[0], "p10_us": q[1], "p90_us": q[2]}


def time_fn(
    fn: Callable[[], object], *, graph: bool = True, reps: int = 30, warmup: int = 3, inner: int = 10
) -> dict:
    """Latency quantiles of fn() in microseconds.

    graph=True captures `inner` calls in one CUDA graph and times `reps` replays (per-call time =
    replay / inner); if capture fails the result says graph=False and eager timing is used.
    """
    if not torch.cuda.is_available():  # CPU smoke runs: wall clock, meaningless as figures
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(max(3, reps // 10)):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return {**_quantiles(samples), "graph": False}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = None
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            g.replay()
            torch.cuda.synchronize()
        except Exception:  # data-dependent host syncs (e.g. transformers' eager experts) cannot be captured
            g = None
            torch.cuda.synchronize()
    run, per = (g.replay, inner) if g is not None else (fn, 1)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 / per for s, e in zip(starts, ends, strict=True)]
    return {**_quantiles(samples), "graph": g is not None}


def kernel_times(fn: Callable[[], object], calls: int, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches per call, device microseconds per call)} over `calls` eager calls of fn,
    from torch.profiler's device activity (CUPTI): each kernel's own time on the GPU, which launch
    gaps and host work do not inflate. Without a GPU the top-level CPU ops stand in (smoke runs).
    Raises RuntimeError where a GPU ran fn but the profiler saw no kernel (CUPTI missing)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    # CUDA graphs captured between profiler sessions can crash a CUPTI torn down and set up again
    # (pytorch#75504); keep it set up
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    times = per_call_times(prof.events(), calls, device=cuda)
    if cuda and not times:
        raise RuntimeError("torch.profiler recorded no GPU kernel (is CUPTI available?)")
    return times


def per_call_times(events, calls: int, device: bool) -> dict[str, tuple[float, float]]:
    """kernel_times' sums: device events (kernels, copies, memsets; not user annotations) when
    `device`, else top-level CPU ops, as {name: (count, microseconds)} per call."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}
    for event in events:
        if device:
            if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
        elif event.device_type != DeviceType.CPU or event.cpu_parent is not None:
            continue
        count_us = totals.setdefault(event.name, [0, 0.0])
        count_us[0] += 1
        count_us[1] += event.time_range.elapsed_us()
    return {name: (count / calls, us / calls) for name, (count, us) in totals.items()}


def write_rows(rows: list[dict], stem: Path) -> None:
    """Append rows to stem.jsonl and rewrite stem.csv from all rows in the .jsonl."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    jl = stem.with_suffix(".jsonl")
    with jl.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    all_rows = [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    keys = list(dict.fromkeys(k for r in all_rows for k in r))
    with atomic_file(stem.with_suffix(".csv")) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(all_rows)
