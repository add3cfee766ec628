"""Tables of the fastest path and tiles per batch size, timed on the user's own GPU.

The built-in choices were timed on one H100 at 7B shapes (`DECODE_TABLE`, `GroupedConfig`, and
the decode-against-dense-FFN crossovers behind `auto_path`'s thresholds) or never (`DenseConfig`,
the dense path itself). `moecarve kernels tune MODEL` times the paths and tile candidates for MODEL's
MoE shape on the GPU at hand, over batch sizes, and writes the fastest per batch to
`<dir>/<GPU name>/<shape>.json`; `moe_ffn(path="auto")` then follows that table on that GPU and
shape (the entry of the smallest tuned batch >= T; above the largest, the built-in dispatch). Files, not
`triton.autotune`, for the reasons vLLM's fused_moe keeps config files: a fair timing needs
weights that are not in L2, and none may run at a first call inside a CUDA graph capture.

Directories searched, in order: `$MOECARVE_KERNEL_CONFIGS` (os.pathsep-separated; set it empty
to use the built-in choices only), else `$XDG_CACHE_HOME/moecarve/kernels` (~/.cache/...).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ._env import warn_once
from .ops.configs import DecodeConfig, DenseConfig, GroupedConfig

FORMAT = 1
CONFIG_CLASSES = {"decode": DecodeConfig, "dense": DenseConfig, "grouped": GroupedConfig}
FIX = "remake it with `moecarve kernels tune` or delete it"


@dataclass(frozen=True)
class MoeShape:
    """What a tuned table is keyed by, besides the GPU: the MoE block's shapes and weight dtype."""

    experts: int  # routed experts E
    intermediate: int  # I of one expert
    shared_intermediate: int  # SI of the shared expert(s), 0 without
    hidden: int
    top_k: int
    dtype: str  # "bfloat16", "float16" or "float32"

    @property
    def file_name(self) -> str:
        s = self
        return (
            f"E{s.experts}-I{s.intermediate}-SI{s.shared_intermediate}-H{s.hidden}-K{s.top_k}-{s.dtype}.json"
        )

    @classmethod
    def of_tensors(cls, gate_up_proj, shared_gate_proj, top_k: int) -> MoeShape:
        E, two_i, H = gate_up_proj.shape
        si = 0 if shared_gate_proj is None else shared_gate_proj.shape[0]
        return cls(E, two_i // 2, si, H, top_k, str(gate_up_proj.dtype).removeprefix("torch."))


def config_dirs() -> list[Path]:
    """Where tuned tables are looked up, first match wins."""
    env = os.environ.get("MOECARVE_KERNEL_CONFIGS")
    if env is not None:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [default_dir()]


def default_dir() -> Path:
    """Where `moecarve kernels tune` writes unless told otherwise."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moecarve" / "kernels"


def device_dir_name(device_name: str) -> str:
    """A GPU name as a directory name ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_")


@functools.cache
def device_name(device: torch.device) -> str:
    """The name tables are filed under: the CUDA device's name, or "cpu" (Triton's interpreter)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _config_from_json(path_name: str, raw: object, where: str):
    cls = CONFIG_CLASSES[path_name]
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict) or not set(raw) <= fields:
        unknown = sorted(set(raw) - fields) if isinstance(raw, dict) else raw
        raise ValueError(
            f"{where}: {path_name} tiles must be an object with keys from {sorted(fields)}, got {unknown}; {FIX}"
        )
    try:
        return cls(**raw)
    except ValueError as err:  # the tiles' own check
        raise ValueError(f"{where}: {err}; {FIX}") from None


def parse_table(data: object, shape: MoeShape, source: str) -> dict[int, tuple[str, object]]:
    """{batch: (path, tiles)} from a table file's JSON, checked; ValueError naming `source` otherwise."""
    if not isinstance(data, dict) or type(data.get("format")) is not int or data["format"] != FORMAT:
        raise ValueError(f"{source}: not a moecarve tuned table of format {FORMAT}; {FIX}")
    if data.get("shape") != dataclasses.asdict(shape):
        raise ValueError(f"{source}: its shape {data.get('shape')} is not {dataclasses.asdict(shape)}; {FIX}")
    batches = data.get("batches")
    if not isinstance(batches, dict) or not batches:
        raise ValueError(f"{source}: no batches; {FIX}")
    table = {}
    for key, entry in batches.items():
        where = f"{source}: batch {key}"
        if not (key.isascii() and key.isdigit()) or int(key) < 1 or not isinstance(entry, dict):
            raise ValueError(f"{where}: batches must map positive integers to entries; {FIX}")
        if entry.get("path") not in CONFIG_CLASSES:
            raise ValueError(
                f"{where}: path {entry.get('path')!r} is not one of {sorted(CONFIG_CLASSES)}; {FIX}"
            )
        table[int(key)] = (entry["path"], _config_from_json(entry["path"], entry.get("config", {}), where))
    return dict(sorted(table.items()))


def load_table(device_name: str, shape: MoeShape) -> dict[int, tuple[str, object]] | None:
    """The tuned table for this GPU and shape from the first directory that has one, or None.
    Reads the file on each call; `tuned_choice` keeps what it returns."""
    for d in config_dirs():
        path = d / device_dir_name(device_name) / shape.file_name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: cannot be read as JSON ({exc}); {FIX}") from None
            table = parse_table(data, shape, str(path))
            _warn_if_stale(data, path)
            return table
    return None


def _installed(*names: str) -> str | None:
    """The installed version of the first distribution found (Triton ships under two names), or None."""
    import importlib.metadata

    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def runtime_versions() -> dict[str, str | None]:
    """What a table records it was tuned under, and what `_warn_if_stale` compares with."""
    return {
        "torch": torch.__version__,
        "triton": _installed("triton", "pytorch-triton"),
        "cuda": torch.version.cuda,
    }


def _warn_if_stale(data: dict, path: Path) -> None:
    """Timings made under another Triton or torch may no longer pick the fastest tiles: say so once."""
    made = data.get("versions") or {}
    now = {k: v for k, v in runtime_versions().items() if k in ("torch", "triton")}
    changed = [
        f"{k} {made.get(k)} -> {v}" for k, v in now.items() if None not in (made.get(k), v) and made[k] != v
    ]
    if changed:
        warn_once(f"stale-{path}", f"moecarve.kernels: {path} was tuned under {', '.join(changed)}; "
                  "rerun `moecarve kernels tune` for the fastest tiles")  # fmt: skip


def clear_cache() -> None:
    """Reread the table files at the next lookup (after `moecarve kernels tune` wrote one)."""
    _BY_TENSORS.clear()


def table_files(device_name: str) -> list[str]:
    """Every tuned table `auto` could follow on this GPU (benchmark rows record them)."""
    return [str(f) for d in config_dirs() for f in sorted((d / device_dir_name(device_name)).glob("*.json"))]


_BY_TENSORS: dict[tuple, dict[int, tuple[str, object]] | None] = {}


def tuned_choice(
    device: torch.device,
    gate_up_proj: torch.Tensor,
    shared_gate_proj: torch.Tensor | None,
    top_k: int,
    tokens: int,
) -> tuple[str, object] | None:
    """(path, tiles) of the smallest tuned batch >= `tokens` in this GPU's table for these weights'
    shape; None without a table or above its largest batch. Called on every `moe_ffn`: after the
    first call per shape it is a dict lookup."""
    si = None if shared_gate_proj is None else shared_gate_proj.shape[0]
    env = os.environ
    dirs = (env.get("MOECARVE_KERNEL_CONFIGS"), env.get("XDG_CACHE_HOME"), env.get("HOME"))
    key = (device, gate_up_proj.shape, gate_up_proj.dtype, si, top_k, dirs)
    if key not in _BY_TENSORS:  # kept only once parsed: a broken file raises at every call
        shape = MoeShape.of_tensors(gate_up_proj, shared_gate_proj, top_k)
        _BY_TENSORS[key] = load_table(device_name(device), shape)
    table = _BY_TENSORS[key]
    largest = max(table) if table else 0
    if tokens > largest:  # never timed at this size: the built-in dispatch decides
        return None
    return table[next(b for b in table if b >= tokens)]
