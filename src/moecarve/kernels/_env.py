"""Environment probes for the kernels: is Triton importable, is it interpreting, one-time warnings.

Nothing here imports triton, so `import moecarve.kernels` stays cheap on CPU-only installs.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

from moecarve import MoecarveWarning

_WARNED: set[str] = set()


def triton_available() -> bool:
    """True when the `triton` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class KernelWarning(MoecarveWarning, RuntimeWarning):
    """A fallback or a block left as is: a RuntimeWarning, and moecarve's own (its CLIs print one line)."""


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a KernelWarning the first time `key` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, KernelWarning, stacklevel=3)
