"""Kernel tests run the Triton kernels on CPU through the interpreter, or on CUDA with `-m gpu`.

TRITON_INTERPRET must be set before triton is imported (kernels are bound to the interpreter when
defined), and test modules of other stages import it at collection through transformers' Trainer:
tests/conftest.py sets it, before any of them, whenever no CUDA device is present.
"""

import pytest
import torch

from moecarve.kernels._env import triton_available, triton_interpreting


@pytest.fixture
def interp_device() -> str:
    """The CPU device with the Triton interpreter on; skips where that is not the case."""
    if not triton_available():
        pytest.skip("triton is not installed (pip install 'moecarve[kernels]')")
    if not triton_interpreting():
        pytest.skip("TRITON_INTERPRET is off because CUDA is present; the same cases run with -m gpu")
    return "cpu"


@pytest.fixture
def cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not triton_available():
        pytest.skip("triton is not installed")
    return "cuda"


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch: tests compile the same model code with other models, which
    would otherwise add up to torch.compile's recompile limit within one process."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
