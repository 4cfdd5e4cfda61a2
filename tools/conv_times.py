"""Median time of one fastconv method on named shapes of the bench suite, in this process:

    python tools/conv_times.py vgg-64,keras-c2 direct          # forward, float32
    python tools/conv_times.py vgg-64 direct bwd               # conv2d_backward
    python tools/conv_times.py vgg-64 direct fwd float64

Prints ms, GFLOP/s and, forward, the largest error relative to im2col (benchmarks/RESULTS.md,
session 5). No pause between calls: consecutive calls, as a training loop makes them.
"""
import sys
import time

import numpy as np

import fastconv as fc
from fastconv.bench import suite


def median_s(f, budget=1.5, least=5):
    f()
    times, end = [], time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < least:
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(names, method, direction="fwd", dtype="float32"):
    rng = np.random.default_rng(0)
    for sh in suite.CONV_SHAPES:
        if sh.name not in names.split(","):
            continue
        x, w = (rng.standard_normal(s).astype(dtype) for s in (sh.x_shape, sh.w_shape))
        b = rng.standard_normal(sh.w_shape[0]).astype(dtype)
        y = fc.conv2d(x, w, b, method=method, **sh.conf)
        ref = fc.conv2d(x, w, b, method="im2col", **sh.conf)
        err = np.abs(y - ref).max() / np.abs(ref).max()
        g = rng.standard_normal(y.shape).astype(dtype)
        if direction == "bwd":
            secs = median_s(lambda: fc.conv2d_backward(g, x, w, method=method, **sh.conf))
        else:
            secs = median_s(lambda: fc.conv2d(x, w, b, method=method, **sh.conf))
        k, c, r, s = sh.w_shape
        flops = 2 * y.size * c * r * s * (3 if direction == "bwd" else 1)
        print(f"{sh.name:14s} {method:8s} {direction} {secs * 1e3:8.2f} ms "
              f"{flops / secs / 1e9:7.1f} GFLOP/s  fwd err {err:.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
