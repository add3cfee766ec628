"""Tile sizes of the kernels' paths, and the built-in decode tiles by token count.

Plain dataclasses, no Triton: tuned tables (`moecarve.kernels.tuning`) are read and checked
without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class Tiles:
    """Checks a path's tile sizes when made, in a table or by hand: Triton's blocks and warps are
    powers of two, stages a positive integer, use_dot True, False or None."""

    def __post_init__(self):
        for field in fields(self):
            key, value = field.name, getattr(self, field.name)
            if key == "use_dot":
                ok, want = value is None or isinstance(value, bool), "True, False or None (null in a table)"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                ok = ok and (key == "stages" or value & (value - 1) == 0)
                want = "a positive integer" if key == "stages" else "a power of two"
            if not ok:
                raise ValueError(f"{self.path} tile {key}={value!r} is not {want}")


@dataclass(frozen=True)
class DecodeConfig(Tiles):
    """Tile sizes of the decode path (the benchmark's sweep picked the defaults)."""

    path = "decode"

    block_i: int = 16  # up kernel: rows of gate (and of up) per program
    block_h: int = 256  # up kernel: reduction chunk over H
    block_n: int = 16  # down kernel: outputs (rows of H) per program
    block_k: int = 128  # down kernel: reduction chunk over I
    warps_up: int = 4
    warps_down: int = 4
    stages: int = 4
    max_block_t: int = 64  # tokens per tile: more tokens run as several tiles (grid axis 1)
    use_dot: bool | None = True  # tensor-core dot (False: FMA reductions; None: dot when T > 4)


@dataclass(frozen=True)
class DenseConfig(Tiles):
    """Tile sizes of the dense-equivalent down kernel (not yet swept on a GPU). 8 warps: compiled for
    sm_90 they spill no registers in bf16/fp16 under Triton 3.6 or 3.9 where 4 warps did
    (results/kernels/compile_sm90_triton36.json, compile_sm90.json)."""

    path = "dense"

    block_m: int = 64  # tokens per program (at most; fewer tokens take the next power of two >= 16)
    block_n: int = 64
    block_k: int = 64
    warps: int = 8
    stages: int = 3


# Decode tiles by token count: the entry with the smallest key >= T (H100 sweep, results/kernels/tune.jsonl).
DECODE_TABLE: dict[int, DecodeConfig] = {
    1: DecodeConfig(block_i=32, block_h=256, block_n=16, block_k=128, warps_up=8, warps_down=4),
    8: DecodeConfig(block_i=64, block_h=128, block_n=16, block_k=128, warps_up=8, warps_down=4),
    1 << 30: DecodeConfig(block_i=64, block_h=128, block_n=32, block_k=128, warps_up=8, warps_down=4),
}


def decode_config(T: int) -> DecodeConfig:
    """The decode tiles for T tokens."""
    return DECODE_TABLE[min(k for k in DECODE_TABLE if k >= T)]


@dataclass(frozen=True)
class GroupedConfig(Tiles):
    """Tile sizes of the grouped (sorted, padded per expert) path."""

    path = "grouped"

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    warps: int = 4
    stages: int = 3
