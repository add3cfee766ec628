"""Benchmarks run each measurement in a spawned child: its peak memory must be its own, and its
failure must end the benchmark."""

import multiprocessing as mp

import pytest
import torch

from moecarve.eval.common import child_result, peak_rss_gib


def _child_peak(queue) -> None:
    queue.put(peak_rss_gib())


def _child_fails(queue) -> None:
    raise ValueError("a carve that failed")


def _child_puts_nothing(queue) -> None:
    pass


def test_a_spawned_child_does_not_report_its_parents_memory():
    held = torch.ones(1024**3 // 4)  # 1 GiB, every page written, held while the child runs
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_peak, args=(queue,))
    child.start()
    peak = queue.get(timeout=120)
    child.join()
    assert peak_rss_gib() > 1.0
    assert peak < peak_rss_gib() - 0.9  # getrusage's ru_maxrss would include the parent's 1 GiB
    del held


def test_a_benchmark_whose_child_failed_stops_instead_of_waiting():
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_fails, args=(queue,))
    child.start()
    with pytest.raises(RuntimeError, match="the child process failed \\(exit code 1\\)"):
        child_result(child, queue)
    child = context.Process(target=_child_puts_nothing, args=(queue,))
    child.start()
    with pytest.raises(RuntimeError, match="the child process ended without a result"):
        child_result(child, queue)
    child = context.Process(target=_child_peak, args=(queue,))
    child.start()
    child.join()  # ended before its result is read: the result still counts
    assert child_result(child, queue) > 0
