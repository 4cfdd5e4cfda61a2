"""Time fastconv's CUDA methods on the shape suite (DESIGN.md section 4) against PyTorch cuDNN.

    python benchmarks/measure_cuda.py --gpu --json gpu.json        # on a machine with a GPU
    python benchmarks/measure_cuda.py --cpu --json cpu.json        # best CPU method, this machine
    python benchmarks/measure_cuda.py --report gpu.json cpu.json   # the markdown tables

GPU rows come in two variants: ``device`` (arrays already on the GPU, results left there) and
``host`` (NumPy in and out: the transfers are timed too). cuDNN runs in float32 with TF32 off.
Every timed call ends with a device synchronize inside the timed region; the median of the
repetitions is reported. Each fastconv result is checked against PyTorch (relative L2 error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastconv as fc  # noqa: E402
from fastconv.bench import CONV_SHAPES as SUITE  # noqa: E402

# name: (N, C, H=W, K, R=S, stride, pad, groups), the suite fastconv.bench defines
CONV_SUITE = {
    s.name: (s.n, s.c, s.hw, s.k, s.r, s.stride, s.pad, s.groups)
    for s in SUITE if not s.hidden
}
# name: (x shape, kernel, stride)
POOL_SUITE = {
    "pool-2x2-a": ((64, 30, 24, 24), 2, 2),
    "pool-2x2-b": ((64, 64, 26, 26), 2, 2),
    "pool-2x2-c": ((8, 64, 112, 112), 2, 2),
    "pool-2x2-d": ((8, 256, 56, 56), 2, 2),
    "pool-3x3s2": ((8, 96, 55, 55), 3, 2),
}
GPU_METHODS = ("cuda-naive", "cuda-im2col", "cuda-direct")


def conv_flops(name):
    n, c, hw, k, r, s, p, g = CONV_SUITE[name]
    o = (hw + 2 * p - r) // s + 1
    return 2 * n * k * (c // g) * r * r * o * o


def median_time(fn, sync, min_time=0.25, max_reps=50, min_reps=3, warmup=2):
    """Median seconds of fn(); sync() runs inside the timed region."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def arrays(name, seed=0):
    n, c, hw, k, r, s, p, g = CONV_SUITE[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, hw, hw), dtype=np.float32)
    w = rng.standard_normal((k, c // g, r, r), dtype=np.float32) * np.float32(
        1 / np.sqrt(c // g * r * r))
    b = rng.standard_normal(k, dtype=np.float32)
    o = (hw + 2 * p - r) // s + 1
    gy = rng.standard_normal((n, k, o, o), dtype=np.float32)
    return x, w, b, gy, dict(stride=s, padding=p, groups=g)


# ---------------------------------------------------------------------------------------------
# GPU


def gpu_info():
    import numba
    import torch
    from numba import cuda

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    try:
        import numba_cuda

        ncuda = numba_cuda.__version__
    except Exception:
        ncuda = "built-in"
    return dict(device=name, torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                numba=numba.__version__, numba_cuda=ncuda, python=platform.python_version(),
                cuda_implementation=getattr(cuda, "implementation", "?"))


def measure_gpu(shapes, pools, quick):
    import torch
    import torch.nn.functional as F
    from numba import cuda

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    sync = cuda.synchronize
    tsync = torch.cuda.synchronize
    kw = dict(min_time=0.05, max_reps=10) if quick else {}
    rows = []

    def add(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in shapes:
        x, w, b, gy, conf = arrays(name)
        flops = conv_flops(name)
        # PyTorch cuDNN, float32, TF32 off
        xt, wt, bt, gt = (torch.from_numpy(a).cuda() for a in (x, w, b, gy))
        xt.requires_grad_(True)
        wt.requires_grad_(True)
        bt.requires_grad_(True)
        yt = F.conv2d(xt, wt, bt, **conf)
        y_ref = yt.detach().cpu().numpy()
        g_ref = [a.cpu().numpy() for a in torch.autograd.grad(yt, (xt, wt, bt), gt,
                                                              retain_graph=True)]

        def t_fwd():
            with torch.no_grad():
                F.conv2d(xt, wt, bt, **conf)

        def t_bwd():
            torch.autograd.grad(yt, (xt, wt, bt), gt, retain_graph=True)

        def t_fwd_host():
            with torch.no_grad():
                F.conv2d(torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda(),
                         torch.from_numpy(b).cuda(), **conf).cpu()

        for direction, fn in (("fwd", t_fwd), ("bwd", t_bwd)):
            add(shape=name, op="conv2d", dir=direction, method="torch-cudnn", variant="device",
                seconds=median_time(fn, tsync, **kw), flops=flops * (1 if direction == "fwd"
                                                                     else 2), err=0.0)
        add(shape=name, op="conv2d", dir="fwd", method="torch-cudnn", variant="host",
            seconds=median_time(t_fwd_host, tsync, **kw), flops=flops, err=0.0)
        # fastconv
        xd, wd, bd, gd = (cuda.to_device(a) for a in (x, w, b, gy))
        for m in GPU_METHODS:
            y = fc.conv2d(xd, wd, bd, **conf, method=m).copy_to_host()
            grads = [a.copy_to_host() for a in fc.conv2d_backward(gd, xd, wd, **conf, method=m)]
            e_f = rel_err(y, y_ref)
            e_b = max(rel_err(a, r) for a, r in zip(grads, g_ref))
            heavy = m == "cuda-naive"
            kw2 = dict(min_time=0.05, max_reps=5, warmup=1) if heavy or quick else {}
            add(shape=name, op="conv2d", dir="fwd", method=m, variant="device", flops=flops,
                err=e_f, seconds=median_time(
                    lambda: fc.conv2d(xd, wd, bd, **conf, method=m), sync, **kw2))
            add(shape=name, op="conv2d", dir="bwd", method=m, variant="device", flops=2 * flops,
                err=e_b, seconds=median_time(
                    lambda: fc.conv2d_backward(gd, xd, wd, **conf, method=m), sync, **kw2))
            add(shape=name, op="conv2d", dir="fwd", method=m, variant="host", flops=flops,
                err=e_f, seconds=median_time(
                    lambda: fc.conv2d(x, w, b, **conf, method=m), sync, **kw2))
            add(shape=name, op="conv2d", dir="bwd", method=m, variant="host", flops=2 * flops,
                err=e_b, seconds=median_time(
                    lambda: fc.conv2d_backward(gy, x, w, **conf, method=m), sync, **kw2))
        del xt, wt, bt, gt, yt
    for name in pools:
        shape, k, s = POOL_SUITE[name]
        rng = np.random.default_rng(1)
        x = rng.standard_normal(shape, dtype=np.float32)
        xt = torch.from_numpy(x).cuda().requires_grad_(True)
        yt, it = F.max_pool2d(xt, k, s, return_indices=True)
        gt = torch.randn_like(yt)
        gy = gt.cpu().numpy()
        dx_ref = torch.autograd.grad(yt, xt, gt, retain_graph=True)[0].cpu().numpy()

        def p_fwd():
            with torch.no_grad():
                F.max_pool2d(xt, k, s, return_indices=True)

        add(shape=name, op="max_pool2d", dir="fwd", method="torch-cudnn", variant="device",
            seconds=median_time(p_fwd, tsync, **kw), flops=0, err=0.0)
        add(shape=name, op="max_pool2d", dir="bwd", method="torch-cudnn", variant="device",
            seconds=median_time(lambda: torch.autograd.grad(yt, xt, gt, retain_graph=True),
                                tsync, **kw), flops=0, err=0.0)
        xd, gd = cuda.to_device(x), cuda.to_device(gy)
        for m in ("cuda-naive", "cuda-direct"):
            out, idx = fc.max_pool2d(xd, k, s, return_indices=True, method=m)
            e_f = rel_err(out.copy_to_host(), yt.detach().cpu().numpy())
            e_i = float(np.mean(idx.copy_to_host() != it.cpu().numpy()))
            dx = fc.max_pool2d_backward(gd, idx, shape, k, s, method=m).copy_to_host()
            add(shape=name, op="max_pool2d", dir="fwd", method=m, variant="device", flops=0,
                err=max(e_f, e_i), seconds=median_time(
                    lambda: fc.max_pool2d(xd, k, s, return_indices=True, method=m), sync, **kw))
            add(shape=name, op="max_pool2d", dir="bwd", method=m, variant="device", flops=0,
                err=rel_err(dx, dx_ref), seconds=median_time(
                    lambda: fc.max_pool2d_backward(gd, idx, shape, k, s, method=m), sync, **kw))
            add(shape=name, op="max_pool2d", dir="fwd", method=m, variant="host", flops=0,
                err=max(e_f, e_i), seconds=median_time(
                    lambda: fc.max_pool2d(x, k, s, return_indices=True, method=m), sync, **kw))
    return rows


def sweep_gpu(name="vgg-256"):
    """vgg-256 forward with every tile configuration, and the im2col / GEMM split."""
    from numba import cuda

    from fastconv.kernels.cuda import _common
    from fastconv.kernels.cuda import direct as KD
    from fastconv.kernels.cuda import im2col as KI

    x, w, b, gy, conf = arrays(name)
    xd, wd, bd, gd = (cuda.to_device(a) for a in (x, w, b, gy))
    flops = conv_flops(name)
    rows = []
    gemm_choice, direct_choice = KI._gemm_config, KD._direct_config
    try:
        for cfg_name, cfg in KI.GEMM_CONFIGS.items():
            KI._gemm_config = lambda m, n, cfg=cfg: cfg
            t = median_time(lambda: fc.conv2d(xd, wd, bd, **conf, method="cuda-im2col"),
                            cuda.synchronize)
            tb = median_time(lambda: fc.conv2d_backward(gd, xd, wd, **conf,
                                                        method="cuda-im2col"), cuda.synchronize)
            rows.append(dict(sweep="gemm", config=cfg_name, cfg=cfg, fwd=t, bwd=tb,
                             fwd_tflops=flops / t / 1e12, bwd_tflops=2 * flops / tb / 1e12))
            print(json.dumps(rows[-1]), flush=True)
        KI._gemm_config = gemm_choice
        for cfg_name, cfg in KD.DIRECT_CONFIGS.items():
            if cfg_name in ("sim", "depthwise"):
                continue
            KD._direct_config = lambda hw, kg, cg, forward=False, cfg=cfg: cfg
            t = median_time(lambda: fc.conv2d(xd, wd, bd, **conf, method="cuda-direct"),
                            cuda.synchronize)
            tb = median_time(lambda: fc.conv2d_backward(gd, xd, wd, **conf, need_weight=False,
                                                        need_bias=False, method="cuda-direct"),
                             cuda.synchronize)
            rows.append(dict(sweep="direct", config=cfg_name, cfg=cfg, fwd=t, bwd_input=tb,
                             fwd_tflops=flops / t / 1e12, bwd_input_tflops=flops / tb / 1e12))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        KI._gemm_config, KD._direct_config = gemm_choice, direct_choice
    # the two halves of cuda-im2col forward
    n, c, hw, k, r, s, p, g = CONV_SUITE[name]
    spec = fc._validate.conv2d(xd, wd, bd, s, p, 1, g)[3]
    col = cuda.device_array((n, c * r * r, hw * hw), np.float32)
    out = cuda.device_array(spec.out_shape, np.float32)
    t_unfold = median_time(lambda: _common._launch_flat(KI._unfold().im2col, col.size, xd, col,
                                                        0, *KI._unfold_args(spec), hw),
                           cuda.synchronize)
    t_gemm = median_time(lambda: KI._gemm(wd.reshape(1, k, c * r * r), col,
                                         out.reshape(n, k, hw * hw), False, False),
                         cuda.synchronize)
    rows.append(dict(sweep="im2col-split", im2col=t_unfold, gemm=t_gemm,
                     gemm_tflops=flops / t_gemm / 1e12))
    print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# CPU


def measure_cpu(shapes, quick):
    methods = [m for m in fc.methods("conv2d") if not m.startswith("cuda") and m != "naive"]
    kw = dict(min_time=0.0, max_reps=3, min_reps=3, warmup=1) if quick else dict(
        min_time=1.0, max_reps=10, min_reps=3, warmup=1)
    rows = []
    for name in shapes:
        x, w, b, gy, conf = arrays(name)
        for m in methods:
            for direction, fn in (
                ("fwd", lambda: fc.conv2d(x, w, b, **conf, method=m)),
                ("bwd", lambda: fc.conv2d_backward(gy, x, w, **conf, method=m)),
            ):
                t = median_time(fn, lambda: None, **kw)
                rows.append(dict(shape=name, op="conv2d", dir=direction, method=m,
                                 variant="cpu", seconds=t,
                                 flops=conv_flops(name) * (1 if direction == "fwd" else 2)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_info():
    import numba

    return dict(machine=platform.machine(), cores=os.cpu_count(), numba=numba.__version__,
                threads=fc.get_num_threads(), python=platform.python_version())


# ---------------------------------------------------------------------------------------------
# report


def report(gpu, cpu=None):
    """Markdown tables from a --gpu JSON file (and a --cpu one)."""
    rows = gpu["rows"]
    best_cpu = {}
    if cpu:
        for r in cpu["rows"]:
            key = (r["shape"], r["dir"])
            if key not in best_cpu or r["seconds"] < best_cpu[key][0]:
                best_cpu[key] = (r["seconds"], r["method"])

    def get(shape, op, d, m, v):
        for r in rows:
            if (r["shape"], r["op"], r["dir"], r["method"], r["variant"]) == (shape, op, d, m, v):
                return r
        return None

    out = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == "conv2d"))
    for d in ("fwd", "bwd"):
        out.append(f"\n### conv2d {'forward' if d == 'fwd' else 'backward (dx + dw + db)'}, "
                   "float32, data on the device (ms; GFLOP/s in brackets)\n")
        head = "| shape | cuDNN | " + " | ".join(GPU_METHODS) + " | best / cuDNN |"
        if cpu:
            head += " best CPU (dev box) | best GPU / CPU |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for s in shapes:
            ref = get(s, "conv2d", d, "torch-cudnn", "device")
            cells, best = [], None
            for m in GPU_METHODS:
                r = get(s, "conv2d", d, m, "device")
                if r is None:
                    cells.append("-")
                    continue
                cells.append(f"{r['seconds'] * 1e3:.3f} ({r['flops'] / r['seconds'] / 1e9:.0f})"
                             + (" **ERR**" if r["err"] > 1e-4 else ""))
                if m != "cuda-naive" and (best is None or r["seconds"] < best[0]):
                    best = (r["seconds"], m)
            rate = ref["flops"] / ref["seconds"] / 1e9
            line = (f"| {s} | {ref['seconds'] * 1e3:.3f} ({rate:.0f}) | " + " | ".join(cells)
                    + f" | {ref['seconds'] / best[0]:.2f}x ({best[1]}) |")
            if cpu:
                c = best_cpu.get((s, d))
                line += (f" {c[0] * 1e3:.1f} ({c[1]}) | {c[0] / best[0]:.0f}x |" if c
                         else " - | - |")
            out.append(line)
    out.append("\n### conv2d with host transfers (NumPy in, NumPy out), ms\n")
    head = "| shape | cuDNN fwd | " + " | ".join(f"{m} fwd | {m} bwd" for m in GPU_METHODS) + " |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for s in shapes:
        ref = get(s, "conv2d", "fwd", "torch-cudnn", "host")
        cells = []
        for m in GPU_METHODS:
            for d in ("fwd", "bwd"):
                r = get(s, "conv2d", d, m, "host")
                cells.append("-" if r is None else f"{r['seconds'] * 1e3:.2f}")
        out.append(f"| {s} | {ref['seconds'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    pools = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == "max_pool2d"))
    if pools:
        out.append("\n### max-pool, float32, data on the device (ms; forward returns indices)\n")
        out += ["| shape | x | cuDNN fwd | cuda-naive fwd | cuda-direct fwd | cuDNN bwd | "
                "cuda-naive bwd | cuda-direct bwd |", "|---|---|---|---|---|---|---|---|"]
        for s in pools:
            shape, k, st = POOL_SUITE[s]
            cells = []
            for d in ("fwd", "bwd"):
                for m in ("torch-cudnn", "cuda-naive", "cuda-direct"):
                    r = get(s, "max_pool2d", d, m, "device")
                    cells.append("-" if r is None else f"{r['seconds'] * 1e3:.3f}"
                                 + (" **ERR**" if r["err"] > 1e-6 else ""))
            out.append(f"| {k}x{k}/{st} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="time the CUDA methods and cuDNN")
    ap.add_argument("--cpu", action="store_true", help="time the CPU methods (this machine)")
    ap.add_argument("--sweep", action="store_true", help="tile configurations on vgg-256")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--shapes", default=",".join(CONV_SUITE), help="comma-separated conv shapes")
    ap.add_argument("--pools", default=",".join(POOL_SUITE), help="comma-separated pool shapes")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print tables: GPU [CPU] file")
    a = ap.parse_args(argv)
    if a.report:
        data = [json.load(open(p)) for p in a.report]
        print(report(*data))
        return 0
    shapes = [s for s in a.shapes.split(",") if s]
    pools = [s for s in a.pools.split(",") if s]
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  command=" ".join([os.path.basename(sys.executable), *sys.argv]))
    if a.gpu or a.sweep:
        result["info"] = gpu_info()
        result["info"]["methods"] = fc.methods()
        print(json.dumps(result["info"]), flush=True)
    if a.sweep:
        result["sweep"] = sweep_gpu()
    if a.gpu:
        result["rows"] = measure_gpu(shapes, pools, a.quick)
    if a.cpu:
        result["info"] = cpu_info()
        result["rows"] = measure_cpu(shapes, a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.gpu:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
