"""Independent pieces of work run side by side on a CPU.

A ~1M-parameter model leaves a CPU core idle much of the time: most of its kernels are too small to split across
threads, and between them the other core waits on Python. Two independent models (PPO's policy and critic) keep
both cores busy when each runs in a thread of its own on half the intra-op threads, for the same results up to
the rounding that a change of thread count gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

Runner = Callable[..., tuple[Any, ...]]


def one_after_another(*calls: Callable[[], Any]) -> tuple[Any, ...]:
    """``calls`` in order, in this thread: their results."""
    return tuple(call() for call in calls)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """This thread's torch on ``threads`` intra-op threads (None: as it is), restored on exit. Per thread: a Prefect
    task runs in a worker thread of its own, which does not see a count set in another."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def side_by_side(enabled: bool = True) -> Iterator[Runner]:
    """A runner for independent calls: ``run(f, g)`` returns ``(f(), g())``. Enabled, the calls run in threads of
    their own (under the caller's grad and inference modes) while the process's intra-op threads are split between
    them, restored on exit; else :func:`one_after_another`. Only for work that takes no turns with other processes:
    two threads issuing collectives could order them differently on different ranks."""
    threads = torch.get_num_threads()
    if not enabled or threads < 2:
        yield one_after_another
        return

    def run(*calls: Callable[[], Any]) -> tuple[Any, ...]:
        # thread-local: a worker starts with gradients on, outside inference mode
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def in_callers_mode(call: Callable[[], Any]) -> Any:  # inference_mode(False) would turn gradients on
            with torch.set_grad_enabled(grad), torch.inference_mode() if inference else nullcontext():
                return call()

        return tuple(future.result() for future in [pool.submit(in_callers_mode, call) for call in calls])

    torch.set_num_threads(max(1, threads // 2))
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="side-by-side") as pool:
            yield run
    finally:
        torch.set_num_threads(threads)
