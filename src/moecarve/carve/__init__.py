"""Carve (the CMoE method): dense FFN -> shared + balanced routed experts + a linear router."""

from __future__ import annotations

__all__ = ["CarveConfig", "CarveResult", "carve"]


def __getattr__(name: str):
    if name in __all__:
        from moecarve.carve import config, pipeline

        return {
            "CarveConfig": config.CarveConfig,
            "CarveResult": pipeline.CarveResult,
            "carve": pipeline.carve,
        }[name]
    raise AttributeError(f"module 'moecarve.carve' has no attribute {name!r}")
