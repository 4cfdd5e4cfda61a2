"""The thread pool that runs every parallel CPU kernel (see fastconv._threads for the design).

A parallel kernel is a compiled, GIL-free *part* function that claims work items ``0 ..
n_items-1`` from a shared counter (an int64 array of one element, advanced atomically) until
none are left. `run` calls it on the calling thread and on up to ``count - 1`` pool threads,
which sleep on a lock between calls. The count itself is set only through
`fastconv.set_num_threads` (fastconv._threads).
"""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["run", "team_size", "conv_work_ns", "pool_work_ns", "box_work_ns", "MIN_PARALLEL_NS"]

#: Work (estimated single-thread nanoseconds) below which a kernel runs on the calling thread:
#: a few hand-offs' worth (measured: benchmarks/RESULTS.md, "Threads").
MIN_PARALLEL_NS = 200_000

count = 1  # set by fastconv._threads at import and by set_num_threads


def conv_work_ns(spec, share=1.0):
    """Single-thread time estimate of ``share`` of a conv pass (about 25 GFLOP/s a core)."""
    return int(share * spec.flops / 25)


def box_work_ns(spec):
    """Single-thread time estimate of an average pool, as the hand-off sees it: memory-bound,
    an eighth of a nanosecond per input element (global pooling of 8x64x28x28 runs in ~25 us
    on one thread and loses to the hand-off on two)."""
    n, c, h, w = spec.x_shape
    return n * c * h * w // 8


def pool_work_ns(spec, backward=False):
    """Single-thread time estimate of a max-pool, as the hand-off sees it: memory-bound pools
    gain from a second thread only when large (measured: tools/thread_sweep.py), so forward
    this is an eighth of a nanosecond per window tap. Backward is dearer per element than it
    looks: a quarter of a nanosecond per input (zeroing or writing it) and one per output
    (its scatter); measured on the 2-core AMD EPYC, 8x96x55x55 3x3 stride 2 takes 1.9 ms on
    one thread and 0.8 ms on two."""
    n, c = spec.x_shape[:2]
    outputs = n * c * spec.out_hw[0] * spec.out_hw[1]
    if backward:
        return n * c * spec.x_shape[2] * spec.x_shape[3] // 4 + outputs
    return outputs * (spec.kernel[0] * spec.kernel[1] + 2) // 8


class _Worker:
    """A daemon thread that runs one part per hand-off; it sleeps on a lock in between."""

    def __init__(self):
        self.go = threading.Lock()
        self.go.acquire()
        self.done = threading.Lock()
        self.done.acquire()
        self.job = None
        self.error = None
        threading.Thread(target=self._loop, name="fastconv-worker", daemon=True).start()

    def _loop(self):
        while True:
            self.go.acquire()
            fn, args = self.job
            try:
                fn(*args)
            except BaseException as e:  # handed to the caller, raised there
                self.error = e
            self.job = None
            self.done.release()


class _Pool:
    def __init__(self):
        self.busy = threading.Lock()
        self.workers: list[_Worker] = []

    def team(self, k):
        while len(self.workers) < k:
            self.workers.append(_Worker())
        return self.workers[:k]


_pool = _Pool()


def _forget_pool():
    global _pool
    _pool = _Pool()  # the parent's threads do not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def team_size(n_items, work_ns) -> int:
    """How many threads `run` would use for ``n_items`` items of ``work_ns`` total work."""
    if work_ns < MIN_PARALLEL_NS:
        return 1
    return max(1, min(count, int(n_items), int(work_ns // (MIN_PARALLEL_NS // 2))))


def run(part, args, n_items, work_ns) -> int:
    """Run ``part(*args, counter)`` on up to `count` threads; the number of threads used.

    ``part`` is a compiled function that releases the GIL and claims items ``0 .. n_items-1``
    from ``counter`` (an int64 array of one element, advanced atomically) until none are left;
    ``work_ns`` estimates the single-thread time of all of them.
    """
    counter = np.zeros(1, dtype=np.int64)
    args = (*args, counter)
    k = team_size(n_items, work_ns)
    pool = _pool
    if k == 1 or not pool.busy.acquire(blocking=False):
        part(*args)
        return 1
    try:
        team = pool.team(k - 1)
        for w in team:
            w.job = (part, args)
            w.go.release()
        error = None
        try:
            part(*args)
        except BaseException as e:
            error = e
        pending = list(team)
        try:
            while pending:
                w = pending[0]
                w.done.acquire()
                pending.pop(0)
                if w.error is not None:
                    error, w.error = error or w.error, None
        finally:
            if pending:  # interrupted (KeyboardInterrupt): leave these workers to finish alone
                _forget_pool()
        if error is not None:
            raise error
    finally:
        pool.busy.release()
    return k
