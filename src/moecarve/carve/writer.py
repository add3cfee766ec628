"""Atomic output directories and a size-capped safetensors writer that streams shards to disk."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


class OutputError(ValueError):
    """The output location cannot be used."""


def check_output(out: Path, source: Path | None, overwrite: bool, marker: str = "carve.json") -> None:
    """Refuse, before any work: an output inside the source or holding it, a non-empty output
    without `overwrite`, and overwriting anything but an earlier moecarve output (it holds `marker`)."""
    out = out.expanduser().resolve()
    if source is not None:
        src = source.expanduser().resolve()
        if out == src or src in out.parents:
            raise OutputError(f"output {out} is inside the source model {src}")
        if out in src.parents:
            raise OutputError(f"output {out} contains the source model {src}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"output directory {out} is not empty (pass --overwrite to replace it)")
        if not (out / marker).exists():
            raise OutputError(f"--overwrite replaces only an earlier moecarve output; {out} has no {marker}")


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it vanishes."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ShardWriter:
    """Collects tensors and writes a shard whenever `max_bytes` would be exceeded; names shards at close."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            tensor = tensor.detach().contiguous()
            # A view would keep its whole base tensor (say, a full weight matrix) alive until the flush.
            self.pending[name] = tensor.clone() if tensor._base is not None else tensor
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, str(self.directory / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, give shards their HF names and write model.safetensors.index.json."""
        if self.pending:
            self._flush()
        count, weight_map = len(self.shards), {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{index}.tmp").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index_data = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
