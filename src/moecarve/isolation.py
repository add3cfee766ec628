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
    python, numpy and torch generators are put back afterwards, so the caller's next draws are the
    ones it would have made. CUDA's: its states where CUDA was in use; where it was not, the seeds
    torch queues for its start (the caller's come back, the stage's go), replayed where the stage
    started it. A caller that never seeded CUDA then finds it as the stage seeded it."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    queued = getattr(torch.cuda, "_lazy_seed_tracker", None)  # seeds torch.manual_seed left for CUDA's start
    queued_calls = dict(vars(queued)) if queued is not None and cuda is None else None
    with torch.random.fork_rng(devices=[]):  # the CPU generator; CUDA's below
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            elif queued_calls is not None and not torch.cuda.is_initialized():
                vars(queued).update(queued_calls)
            elif queued_calls is not None:  # started inside: seeded as the caller had asked
                for call in queued_calls["call_order"]:
                    if call is not None:
                        call[0]()


@contextlib.contextmanager
def released_accelerate_state():
    """accelerate keeps its settings (mixed precision, device) in a process-wide singleton that a
    later `Accelerator` with other settings refuses to change. Training here sets it (and the
    gradient state, which holds the last dataloader); each of them the caller did not have is cleared
    afterwards, as if the training had run in a process of its own."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    singletons = (AcceleratorState, GradientState, PartialState)
    unset = [state for state in singletons if not state._shared_state]
    try:
        yield
    finally:
        for state in unset:
            state._shared_state.clear()


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
