"""moecarve: carve dense Hugging Face decoders into native Mixture-of-Experts checkpoints.

Imports are lazy, so `import moecarve.kernels` does not pull in transformers and pydantic.
"""

from __future__ import annotations


class MoecarveWarning(UserWarning):
    """moecarve's own warnings (a setting adjusted to what the data or model allows); its CLIs print
    them as one `warning: ...` line. Defined before the subpackages, which import it."""


from moecarve import carve  # noqa: E402  (the subpackage, callable as the carve itself)

__all__ = ["CarveConfig", "MoecarveWarning", "carve"]


def __getattr__(name: str):
    if name == "CarveConfig":
        from moecarve.carve.config import CarveConfig

        return CarveConfig
    raise AttributeError(f"module 'moecarve' has no attribute {name!r}")
