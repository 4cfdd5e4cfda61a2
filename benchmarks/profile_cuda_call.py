"""Where a small fastconv GPU call spends its time (needs a CUDA GPU and PyTorch).

    python benchmarks/profile_cuda_call.py

Prints the cost of a bare synchronize, an empty kernel launch and a device allocation, then for
a few suite problems: the time of a call with its synchronize, of the call alone (launches are
asynchronous), per call when calls run back to back, and the GPU time of its kernels as
PyTorch's profiler (CUPTI) sees them; last, a cProfile of max-pool forward calls. Numbers from
it are quoted in benchmarks/RESULTS.md ("The device-memory pool").
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import numpy as np


def median_us(f, n=200):
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main():
    import torch
    from numba import cuda

    import fastconv as fc

    rng = np.random.default_rng(0)

    def dev(shape):
        return cuda.to_device(rng.standard_normal(shape, dtype=np.float32))

    xs, ws = dev((64, 1, 28, 28)), dev((30, 1, 5, 5))  # lenet-c1
    xv, wv = dev((8, 256, 28, 28)), dev((256, 256, 3, 3))  # vgg-256
    xp = dev((8, 64, 112, 112))  # pool2-8x64x112
    _, idx = fc.max_pool2d(xp, 2, return_indices=True, method="cuda-direct")
    gp, gl = dev(idx.shape), dev((64, 30, 24, 24))
    cases = {
        "lenet fwd direct": lambda: fc.conv2d(xs, ws, method="cuda-direct"),
        "lenet fwd im2col": lambda: fc.conv2d(xs, ws, method="cuda-im2col"),
        "vgg256 fwd direct": lambda: fc.conv2d(xv, wv, padding=1, method="cuda-direct"),
        "pool fwd direct": lambda: fc.max_pool2d(xp, 2, return_indices=True,
                                                 method="cuda-direct"),
        "pool bwd direct": lambda: fc.max_pool2d_backward(gp, idx, xp.shape, 2,
                                                          method="cuda-direct"),
        "lenet bwd direct": lambda: fc.conv2d_backward(gl, xs, ws, method="cuda-direct"),
    }

    @cuda.jit
    def nop(a):
        pass

    one = cuda.device_array(1, np.float32)
    nop[1, 32](one)
    cuda.synchronize()
    print(f"sync alone {median_us(cuda.synchronize):.1f} us; "
          f"empty kernel launch {median_us(lambda: nop[1, 32](one)):.1f} us; "
          f"device_array 1 MB {median_us(lambda: cuda.device_array(2**18, np.float32)):.1f} us; "
          f"device_array 16 MB {median_us(lambda: cuda.device_array(2**22, np.float32)):.1f} us")

    for name, f in cases.items():
        for _ in range(5):
            f()
        cuda.synchronize()
        wall = median_us(lambda: (f(), cuda.synchronize()))
        host = median_us(f)
        cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        cuda.synchronize()
        back_to_back = (time.perf_counter() - t0) / 200 * 1e6
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                f()
            cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        gpu = sum(e.device_time_total for e in events) / 20
        print(f"\n== {name}: wall+sync {wall:.1f} us; host call (async) {host:.1f} us; "
              f"back-to-back {back_to_back:.1f} us/call; GPU busy {gpu:.1f} us/call")
        print("   kernels per call:",
              [(e.key[:60], round(e.device_time_total / 20, 1), e.count // 20) for e in events])

    profiler = cProfile.Profile()
    f = cases["pool fwd direct"]
    profiler.enable()
    for _ in range(300):
        f()
    cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue())


if __name__ == "__main__":
    main()
