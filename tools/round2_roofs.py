"""Round 2's side measurements (benchmarks/RESULTS.md): the parallel copy roof (2 threads) and
conv_transpose2d forward against the conv2d grad-input it is, on the decoder shape.

    python tools/round2_roofs.py
"""
import itertools
import threading
import time

import numpy as np

import fastconv as fc


def copy_gbps(nbytes=256 << 20, threads=2, reps=7):
    """Bytes read and written per second by ``threads`` threads copying halves of an array."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    cuts = np.linspace(0, a.size, threads + 1).astype(int)

    def work(lo, hi):
        np.copyto(b[lo:hi], a[lo:hi])  # releases the GIL

    times = []
    for _ in range(reps):
        team = [threading.Thread(target=work, args=(lo, hi)) for lo, hi in itertools.pairwise(cuts)]
        t = time.perf_counter()
        for th in team:
            th.start()
        for th in team:
            th.join()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / np.median(times) / 1e9


print(f"parallel copy (2 threads, 256 MiB, read + write): {copy_gbps():.1f} GB/s")
print(f"parallel copy (2 threads, 8 MiB): {copy_gbps(8 << 20, reps=31):.1f} GB/s")

rng = np.random.default_rng(0)
x = rng.standard_normal((8, 64, 28, 28), dtype=np.float32)
w = rng.standard_normal((64, 32, 2, 2), dtype=np.float32)
xo = rng.standard_normal((8, 32, 56, 56), dtype=np.float32)  # the conv whose grad-input it is
res: dict = {}
for rnd in range(5):
    for m in ("im2col", "direct"):
        calls = (("convT-fwd", lambda m=m: fc.conv_transpose2d(x, w, stride=2, method=m)),
                 ("conv2d grad-input", lambda m=m: fc.conv2d_backward(
                     x, xo, w, stride=2, method=m, need_weight=False, need_bias=False)))
        for what, f in calls:
            f()
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            res.setdefault((m, what), []).append(np.median(ts))
            time.sleep(0.2)
for m in ("im2col", "direct"):
    a, b = np.median(res[(m, "convT-fwd")]), np.median(res[(m, "conv2d grad-input")])
    print(f"{m}: convT-fwd {a*1e3:.2f} ms, conv2d grad-input {b*1e3:.2f} ms, ratio {b/a:.2f}")
