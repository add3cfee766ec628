"""Process-wide state that a stage sets for its own work and gives back: a library call from a
notebook leaves the caller's random generators, accelerate settings and environment as it found them."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


@contextlib.contextmanager
def kept_random_state():
    """Seed freely inside (carve, training, lm-eval do, for runs that repeat bit for bit); the
    python, numpy and torch generators (CUDA's too, where in use) are put back afterwards, so the
    caller's next draws are the ones it would have made."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    with torch.random.fork_rng(devices=[]):  # the CPU generator; CUDA's below, only where in use
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def released_accelerate_state():
    """accelerate keeps its settings (mixed precision, device) in a process-wide singleton that a
    later `Accelerator` with other settings refuses to change. Training here sets it; where the caller
    had none, it is cleared afterwards, as if the training had run in a process of its own."""
    from accelerate.state import AcceleratorState, PartialState

    had = bool(AcceleratorState._shared_state) or bool(PartialState._shared_state)
    try:
        yield
    finally:
        if not had:
            AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def kept_environ(*names: str):
    """Environment variables that a dependency sets as a side effect (transformers' compiled
    `generate`, lm-eval's import) are put back as they were."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
