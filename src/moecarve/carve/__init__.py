"""Carve (the CMoE method): dense FFN -> shared + balanced routed experts + a linear router.

The subpackage is callable: `moecarve.carve(model, config, calib, out, ...)` runs
`moecarve.carve.pipeline.carve`, and `import moecarve.carve.pipeline` still finds the subpackage (a
function of the same name in `moecarve` hid it).
"""

from __future__ import annotations

import sys
import types

__all__ = ["CarveConfig", "CarveResult", "carve"]


class _CallableCarve(types.ModuleType):
    def __call__(self, model, config=None, calib=None, out=None, **options):
        from moecarve.carve.pipeline import carve

        return carve(model, config, calib, out, **options)


sys.modules[__name__].__class__ = _CallableCarve


def __getattr__(name: str):
    if name in __all__:
        from moecarve.carve import config, pipeline

        return {
            "CarveConfig": config.CarveConfig,
            "CarveResult": pipeline.CarveResult,
            "carve": pipeline.carve,
        }[name]
    raise AttributeError(f"module 'moecarve.carve' has no attribute {name!r}")
