"""Side-by-side timings of method="direct" against PyTorch's CPU kernels (issue #4).

    python benchmarks/measure_direct.py [--threads 2] [--reps 7] [--quick] [--no-torch]
    python benchmarks/measure_direct.py --threads 1 --clock cpu   # CPU time, for busy machines

Prints markdown tables: conv2d forward and backward on the DESIGN.md section 4 shape suite,
max-pool forward (with indices) and backward, the peak extra memory of a forward (tracemalloc),
and the cold-start cost (compile with an empty Numba cache, load with a warm one).

PyTorch runs in a worker process, so its OpenMP pool and ours never share a process; each
measurement is the median of ``--reps`` calls after a warm-up, and the script sleeps between the
two libraries so that neither's spinning threads slow the other. Ratios are PyTorch time over
fastconv time (> 1: fastconv is faster). On a machine shared with other work, ``--threads 1
--clock cpu`` times each library's thread CPU time (time.thread_time), which is insensitive to
being descheduled; with two threads and an oversubscribed machine, parallel regions wait for
descheduled threads and wall-clock ratios become noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc

import numpy as np

# name: (N, C, H=W, K, R=S, stride, pad, groups), DESIGN.md section 4
SHAPES = {
    "lenet-c1": (64, 1, 28, 30, 5, 1, 0, 1),
    "keras-c1": (64, 1, 28, 64, 3, 1, 0, 1),
    "keras-c2": (64, 64, 13, 64, 3, 1, 0, 1),
    "cifar-c1": (128, 3, 32, 32, 3, 1, 1, 1),
    "vgg-64": (8, 64, 56, 64, 3, 1, 1, 1),
    "vgg-256": (8, 256, 28, 256, 3, 1, 1, 1),
    "resnet-1x1": (8, 256, 28, 64, 1, 1, 0, 1),
    "alexnet-c1": (8, 3, 224, 96, 11, 4, 2, 1),
    "mobilenet-dw": (8, 128, 56, 128, 3, 1, 1, 128),
}
POOLS = [  # (x shape, kernel, stride)
    ((64, 30, 24, 24), 2, 2),
    ((64, 64, 26, 26), 2, 2),
    ((8, 64, 112, 112), 2, 2),
    ((8, 256, 56, 56), 2, 2),
    ((8, 96, 55, 55), 3, 2),
]
SMALL_CHANNEL = ("lenet-c1", "keras-c1", "cifar-c1", "alexnet-c1")

# the targets, as (kind, value): ratio over PyTorch, or GFLOP/s
CONV_TARGETS = {
    **{name: {"fwd": ("ratio", 1.5), "bwd": ("ratio", 1.5)} for name in SMALL_CHANNEL},
    "vgg-64": {"fwd": ("gflops", 100)},
    "vgg-256": {"fwd": ("gflops", 100)},
    "mobilenet-dw": {"fwd": ("ratio", 1.0), "bwd": ("ratio", 1.0)},
}
POOL_TARGETS = {"fwd": ("ratio", 10.0), "bwd": ("ratio", 1.0)}

_TORCH_WORKER = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(int(sys.argv[1]))
    reps = int(sys.argv[2])
    clock = time.thread_time if sys.argv[3] == "cpu" else time.perf_counter

    def median_ms(fn):
        fn(); fn()
        ts = []
        for _ in range(reps):
            t0 = clock(); fn(); ts.append(clock() - t0)
        return (1e3 * statistics.median(ts), 1e3 * min(ts))

    for line in sys.stdin:
        job = json.loads(line)
        g = torch.Generator().manual_seed(0)
        if job["kind"] == "conv":
            n, c, h, k, r, s, p, groups = job["shape"]
            x = torch.randn(n, c, h, h, generator=g)
            w = torch.randn(k, c // groups, r, r, generator=g)
            b = torch.randn(k, generator=g)
            y = F.conv2d(x, w, b, s, p, 1, groups)
            gy = torch.randn(y.shape, generator=g)
            with torch.no_grad():
                fwd = median_ms(lambda: F.conv2d(x, w, b, s, p, 1, groups))
            bwd = median_ms(lambda: torch.ops.aten.convolution_backward(
                gy, x, w, [k], [s, s], [p, p], [1, 1], False, [0, 0], groups,
                [True, True, True]))
        else:
            shape, ks, st = job["shape"], job["kernel"], job["stride"]
            x = torch.randn(*shape, generator=g)
            y, idx = F.max_pool2d(x, ks, st, return_indices=True)
            gy = torch.randn(y.shape, generator=g)
            with torch.no_grad():
                fwd = median_ms(lambda: F.max_pool2d(x, ks, st, return_indices=True))
            bwd = median_ms(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                gy, x, [ks, ks], [st, st], [0, 0], [1, 1], False, idx))
        print(json.dumps({"fwd": fwd, "bwd": bwd}), flush=True)
    """
)


class Torch:
    """A PyTorch worker process answering timing jobs, or None where torch is missing."""

    def __init__(self, threads, reps, clock):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TORCH_WORKER, str(threads), str(reps), clock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )

    def time(self, **job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch worker died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


CLOCK = time.perf_counter


def median_ms(fn, reps):
    """(median, min) in ms of reps calls after two warm-ups."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return 1e3 * statistics.median(ts), 1e3 * min(ts)


def conv_arrays(name, dtype=np.float32):
    n, c, h, k, r, s, p, g = SHAPES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h), dtype=np.float32).astype(dtype)
    w = rng.standard_normal((k, c // g, r, r), dtype=np.float32).astype(dtype)
    b = rng.standard_normal(k, dtype=np.float32).astype(dtype)
    return x, w, b, dict(stride=s, padding=p, groups=g)


def verdict(target, ratio, gflops):
    if target is None:
        return ""
    kind, value = target
    got = ratio if kind == "ratio" else gflops
    if got is None:
        return "n/a"
    mark = "met" if got >= value else f"missed ({got / value:.2f} of target)"
    unit = "x" if kind == "ratio" else " GF/s"
    return f">= {value:g}{unit}: {mark}"


def bench_conv(names, torch, reps, pause):
    import fastconv as fc

    rows = []
    for name in names:
        x, w, b, conf = conv_arrays(name)
        y = fc.conv2d(x, w, b, **conf, method="direct")
        gy = np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32)
        n, k, oh, ow = y.shape
        flops = 2 * n * k * w.shape[1] * w.shape[2] * w.shape[3] * oh * ow
        fwd = median_ms(lambda: fc.conv2d(x, w, b, **conf, method="direct"), reps)
        bwd = median_ms(lambda: fc.conv2d_backward(gy, x, w, **conf, method="direct"), reps)
        ref = None
        if torch is not None:
            time.sleep(pause)
            ref = torch.time(kind="conv", shape=SHAPES[name])
            time.sleep(pause)
        for op, (ms, ms_min), fl in (("fwd", fwd, flops), ("bwd", bwd, 2 * flops)):
            t_ms, t_min = ref[op] if ref else (None, None)
            ratio = t_ms / ms if t_ms else None
            ratio_min = t_min / ms_min if t_min else None
            gf = fl / ms / 1e6
            target = CONV_TARGETS.get(name, {}).get(op)
            rows.append((name, op, ms, t_ms, ratio, ratio_min, gf, fl / ms_min / 1e6,
                         verdict(target, ratio, gf)))
            print(f"  {name} {op}: {ms:.2f} ms, torch {t_ms if t_ms else float('nan'):.2f} ms",
                  file=sys.stderr, flush=True)
    return rows


def bench_pool(torch, reps, pause):
    import fastconv as fc

    rows = []
    for shape, ks, st in POOLS:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        y, idx = fc.max_pool2d(x, ks, st, return_indices=True, method="direct")
        gy = np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32)
        fwd = median_ms(lambda: fc.max_pool2d(x, ks, st, return_indices=True, method="direct"),
                        reps)
        bwd = median_ms(lambda: fc.max_pool2d_backward(gy, idx, x.shape, ks, st,
                                                       method="direct"), reps)
        ref = None
        if torch is not None:
            time.sleep(pause)
            ref = torch.time(kind="pool", shape=list(shape), kernel=ks, stride=st)
            time.sleep(pause)
        label = f"{ks}x{ks}/{st} {shape}"
        gbytes = (x.nbytes + y.nbytes + idx.nbytes) / 1e9
        for op, (ms, ms_min) in (("fwd+idx", fwd), ("bwd", bwd)):
            t_ms, t_min = ref["fwd" if op == "fwd+idx" else "bwd"] if ref else (None, None)
            ratio = t_ms / ms if t_ms else None
            ratio_min = t_min / ms_min if t_min else None
            target = POOL_TARGETS["fwd" if op == "fwd+idx" else "bwd"]
            rows.append((label, op, ms, t_ms, ratio, ratio_min, gbytes / ms * 1e3,
                         verdict(target, ratio, None)))
            print(f"  pool {label} {op}: {ms:.2f} ms", file=sys.stderr, flush=True)
    return rows


def forward_memory(names):
    """Peak memory a forward allocates beyond its output, against one padded input copy."""
    import fastconv as fc

    rows = []
    for name in names:
        x, w, b, conf = conv_arrays(name)
        fc.conv2d(x, w, b, **conf, method="direct")
        tracemalloc.start()
        y = fc.conv2d(x, w, b, **conf, method="direct")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        n, c, h, _ = x.shape
        p, s = conf["padding"], conf["stride"]
        padded = n * c * (h + 2 * p) ** 2 * x.itemsize
        rows.append((name, (peak - y.nbytes) / 1e6, padded / 1e6, x.nbytes / 1e6))
    return rows


_COLD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    import fastconv as fc
    fc.set_num_threads(int(sys.argv[1]))
    t1 = time.perf_counter()
    out = {"import_s": t1 - t0}
    for dt in sys.argv[2].split(","):
        x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(dt)
        w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(dt)
        t = time.perf_counter()
        y = fc.conv2d(x, w, padding=1, method="direct")
        fc.conv2d_backward(y, x, w, padding=1, method="direct")
        p, i = fc.max_pool2d(y, 2, return_indices=True, method="direct")
        fc.max_pool2d_backward(p, i, y.shape, 2, method="direct")
        out[dt] = time.perf_counter() - t
    print(json.dumps(out))
    """
)


def cold_start(threads):
    """conv forward + backward + pool forward + backward in fresh processes: with an empty Numba
    cache (compiles), then again with that cache warm (loads); float32, then float64 too."""
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label, dts in (("compile, empty cache", "float32,float64"),
                           ("load, warm cache", "float32,float64")):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _COLD, str(threads), dts], env=env,
                                 capture_output=True, text=True, check=True)
            total = time.perf_counter() - t0
            res[label] = {**json.loads(out.stdout), "process_s": total}
    return res


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between libraries")
    ap.add_argument("--quick", action="store_true", help="three shapes, three reps")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: thread CPU time (use with --threads 1)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu measures one thread: use it with --threads 1")
        CLOCK = time.thread_time

    import numba

    import fastconv as fc

    fc.set_num_threads(args.threads)
    names = args.shapes or list(SHAPES)
    reps = args.reps
    if args.quick:
        names, reps = args.shapes or ["keras-c1", "vgg-64", "mobilenet-dw"], 3

    torch = None
    if not args.no_torch:
        try:
            import torch as _t  # noqa: F401  (only to know it is there)
            torch = Torch(args.threads, reps, args.clock)
        except ImportError:
            print("PyTorch not installed: fastconv timings only", file=sys.stderr)

    print(f"# fastconv method='direct' vs PyTorch {'(not installed)' if torch is None else ''}")
    print()
    print(f"threads: {args.threads} (Numba layer {numba.config.THREADING_LAYER}), float32, "
          f"{'thread CPU time' if args.clock == 'cpu' else 'wall clock'}, median (and min) of "
          f"{reps} calls "
          f"after 2 warm-ups, {args.pause:g} s pause between libraries; "
          f"ratio = PyTorch ms / fastconv ms; load average before: {os.getloadavg()[0]:.1f}.")
    print()
    conv = bench_conv(names, torch, reps, args.pause)
    print("## conv2d\n")
    print("| shape | op | ms ours | ms torch | ratio | ratio of mins | GFLOP/s ours | "
          "GFLOP/s ours (min) | target (on medians) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, op, ms, t_ms, ratio, ratio_min, gf, gf_min, verdict_ in conv:
        print(f"| {name} | {op} | {ms:.2f} | {fmt(t_ms)} | {fmt(ratio)} | {fmt(ratio_min)} | "
              f"{gf:.1f} | {gf_min:.1f} | {verdict_} |")
    print()
    if not args.quick:
        pool = bench_pool(torch, reps, args.pause)
        print("## max-pool (fwd with indices)\n")
        print("| shape | op | ms ours | ms torch | ratio | ratio of mins | "
              "GB/s ours (x + out + idx) | target (on medians) |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for label, op, ms, t_ms, ratio, ratio_min, gbs, verdict_ in pool:
            print(f"| {label} | {op} | {ms:.2f} | {fmt(t_ms)} | {fmt(ratio)} | {fmt(ratio_min)} "
                  f"| {gbs:.1f} | {verdict_} |")
        print()
    if torch is not None:
        torch.close()

    print("## peak extra memory of a forward (tracemalloc, beyond the output)\n")
    print("| shape | extra MB | one padded input copy MB | input MB |")
    print("|---|---:|---:|---:|")
    for name, extra, padded, inp in forward_memory(names):
        print(f"| {name} | {extra:.2f} | {padded:.2f} | {inp:.2f} |")
    print()
    if not args.skip_cold:
        print("## cold start: conv fwd + bwd + pool fwd + bwd in a fresh process\n")
        print("| Numba cache | import s | float32 s | float64 s | whole process s |")
        print("|---|---:|---:|---:|---:|")
        for label, r in cold_start(args.threads).items():
            print(f"| {label} | {r['import_s']:.2f} | {r['float32']:.2f} | {r['float64']:.2f} | "
                  f"{r['process_s']:.2f} |")
        print()


if __name__ == "__main__":
    main()
