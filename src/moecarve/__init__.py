"""moecarve: carve dense Hugging Face decoders into native Mixture-of-Experts checkpoints.

Imports are lazy, so `import moecarve.kernels` does not pull in transformers and pydantic.
"""

from __future__ import annotations


class MoecarveWarning(UserWarning):
    """moecarve's own warnings (a setting adjusted to what the data or model allows); its CLIs print
    them as one `warning: ...` line. Defined before the subpackages, which import it."""


import moecarve.carve  # noqa: F401, E402  (registers the subpackage before `carve` below takes its name)

__all__ = ["CarveConfig", "MoecarveWarning", "carve"]


def carve(model, config=None, calib=None, out=None, **options):
    """Carve `model` into a glm4_moe checkpoint: see moecarve.carve.pipeline.carve."""
    from moecarve.carve.pipeline import carve as run

    return run(model, config, calib, out, **options)


def __getattr__(name: str):
    if name == "CarveConfig":
        from moecarve.carve.config import CarveConfig

        return CarveConfig
    raise AttributeError(f"module 'moecarve' has no attribute {name!r}")
