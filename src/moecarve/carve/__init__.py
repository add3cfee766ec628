"""Carve (the CMoE method): dense FFN -> shared + balanced routed experts + a linear router."""

from moecarve.carve.config import CarveConfig
from moecarve.carve.pipeline import CarveResult, carve

__all__ = ["CarveConfig", "CarveResult", "carve"]
