"""Timing: one call repeated (`measure`), or several calls in turns (`measure_together`)."""

from __future__ import annotations

import contextlib
import gc
import math
import time

import numpy as np

__all__ = ["measure", "measure_together", "SLOW_CALL"]

SLOW_CALL = 2.0  # seconds: an estimating (second) call slower than this is the only sample


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection pauses inside timed loops."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _repeats(budget, estimate, min_repeat, max_repeat):
    """Calls that fill ``budget`` seconds at ``estimate`` seconds each, within the bounds."""
    return int(min(max(math.ceil(budget / max(estimate, 1e-9)), min_repeat), max_repeat))


def measure(call, *, repeat=None, budget=1.0, min_repeat=3, max_repeat=100, slow=SLOW_CALL):
    """Time ``call()``: (median seconds, all samples, the first call's result).

    The first call compiles and warms up and is never counted. Unless ``repeat`` is given, a
    second call estimates the duration: over ``slow`` seconds it is the only sample,
    otherwise ``ceil(budget / estimate)`` calls (within [min_repeat, max_repeat]) follow."""
    with _gc_paused():
        result = call()
        samples = []
        if repeat is None:
            t0 = time.perf_counter()
            call()
            est = time.perf_counter() - t0
            if est > slow:
                samples, repeat = [est], 0
            else:
                repeat = _repeats(budget, est, min_repeat, max_repeat)
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
    return float(np.median(samples)), samples, result


def measure_together(calls, *, rounds=None, budget=1.0, estimates=None, min_repeat=3,
                     max_repeat=100, slow=SLOW_CALL):
    """Time warm ``calls`` round-robin: each round calls every one once, starting one place
    further along each time, so that drifting load on a shared machine (and whatever one call
    leaves behind for the next) falls on all of them alike. The median of each call's samples.

    ``rounds`` defaults to what ``budget`` seconds per call buys at the ``estimates``."""
    n = len(calls)
    if rounds is None:
        per_round = sum(estimates) if estimates else 0.0
        # a round per call's worth of budget: budget*n seconds at per_round seconds a round
        rounds = 1 if per_round > slow * n else _repeats(budget * n, per_round, min_repeat,
                                                           max_repeat)
    samples = [[] for _ in calls]
    with _gc_paused():
        for k in range(rounds):
            for j in range(n):
                i = (j + k) % n
                t0 = time.perf_counter()
                calls[i]()
                samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples], samples
