"""This checkout's kernels against an older commit's, interleaved call by call in one process:

    python tools/ab_kernels.py 49772ed conv keras-c2,vgg-64 bwd-weight
    python tools/ab_kernels.py HEAD conv vgg-256 fwd
    python tools/ab_kernels.py 56af79b conv keras-c1,cifar-c1 bwd float32 im2col NHWC
    python tools/ab_kernels.py 49772ed nets simpleconvnet,digits-quick
    python tools/ab_kernels.py HEAD pool pool3-8x96x55,50x30x12x12 bwd float64

On a shared VM the load drifts by 2x over minutes (benchmarks/RESULTS.md, session 6), so runs
in separate processes compare the load as much as the code. Here the old commit's
``fastconv/`` is copied under the package name ``fcold`` (its compiled Cython modules taken
from this checkout, so only commits with the same .pyx files compare; see
``git diff --stat REV -- fastconv``) and both are called in
turns. Prints medians and old/new (above 1: this checkout is faster).
"""
import importlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIRECTIONS = ("fwd", "bwd", "bwd-weight", "bwd-input")


def load_old(rev):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fcold-"))
    pkg = tmp / "fcold"
    shutil.copytree(ROOT / "fastconv", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "fastconv"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if not name.endswith((".pyx", ".pxd", ".c")):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            # the registry names kernel modules by absolute path
            dest = pkg / name[len("fastconv/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text.replace('"fastconv.', '"fcold.'))
    sys.path.insert(0, str(tmp))
    import fcold
    return fcold


def interleave(fa, fb, reps):
    """Medians (ms) of fa and fb called in turns, who goes first alternating so that neither
    always follows the other. A commit against itself reads 0.97x-1.04x on the shared VM:
    differences inside that are noise."""
    fa(), fb()
    times = {fa: [], fb: []}
    for i in range(reps):
        for f in (fa, fb) if i % 2 == 0 else (fb, fa):
            t = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - t)
    return np.median(times[fa]) * 1e3, np.median(times[fb]) * 1e3


def compare(label, calls, reps):
    """Interleave the (new, old) calls and print their medians and old/new."""
    ms_new, ms_old = interleave(*calls, reps)
    print(f"{label} new {ms_new:8.3f} ms  old {ms_old:8.3f} ms  old/new {ms_old / ms_new:5.2f}x",
          flush=True)


def conv(new, old, names, direction="fwd", dtype="float32", method="direct", layout="NCHW",
         reps=21):
    """Conv2d of the suite's shapes by name; channels-last arrays (HWIO filters) with
    ``layout="NHWC"``."""
    from fastconv.bench import suite

    if direction not in DIRECTIONS:
        raise SystemExit(f"direction must be one of {DIRECTIONS}")
    rng = np.random.default_rng(0)
    opts = dict(method=method, layout=layout)
    for sh in suite.CONV_SHAPES:
        if sh.name not in names:
            continue
        x, w = (rng.standard_normal(s).astype(dtype) for s in (sh.x_shape, sh.w_shape))
        g = rng.standard_normal(new.conv2d(x, w, **sh.conf).shape).astype(dtype)
        if layout == "NHWC":
            x, g = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, g))
            w = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        if direction == "fwd":
            calls = [lambda m=m: m.conv2d(x, w, **opts, **sh.conf) for m in (new, old)]
        else:
            need = {"bwd-weight": dict(need_input=False, need_bias=False),
                    "bwd-input": dict(need_weight=False, need_bias=False)}.get(direction, {})
            calls = [lambda m=m: m.conv2d_backward(g, x, w, **opts, **need, **sh.conf)
                     for m in (new, old)]
        compare(f"{sh.name:14s} {direction} {dtype} {method} {layout}", calls, reps)


def pool(new, old, names, direction="fwd", dtype="float32", reps=41):
    """Max-pool with indices (method "direct"): shapes of the suite by name, or NxCxHxW for a
    2x2 stride-2 pool of that input (the nets' pools: 50x30x12x12 is digits-quick's); the
    suite's global average pools (gap-resnet, gap-mobilenet) by name."""
    from fastconv.bench import suite

    if direction not in ("fwd", "bwd"):
        raise SystemExit("direction must be fwd or bwd")
    known = {sh.name: (sh.x_shape, sh.kernel, sh.stride) for sh in suite.POOL_SHAPES}
    boxes = {sh.name: sh for sh in suite.BOX_SHAPES}
    rng = np.random.default_rng(0)
    for name in names:
        if name in boxes:
            box(new, old, boxes[name], direction, dtype, reps)
            continue
        shape, k, s = known.get(name) or (tuple(int(n) for n in name.split("x")), 2, 2)
        x = rng.standard_normal(shape).astype(dtype)
        y, idx = new.max_pool2d(x, k, s, return_indices=True)
        g = rng.standard_normal(y.shape).astype(dtype)
        if direction == "fwd":
            calls = [lambda m=m: m.max_pool2d(x, k, s, return_indices=True, method="direct")
                     for m in (new, old)]
        else:
            calls = [lambda m=m: m.max_pool2d_backward(g, idx, shape, k, s, method="direct")
                     for m in (new, old)]
        compare(f"{name:14s} {direction} {dtype}", calls, reps)


def box(new, old, sh, direction, dtype, reps):
    """Global average pooling (a BoxShape of the suite), method "direct"."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(sh.x_shape).astype(dtype)
    g = rng.standard_normal(new.adaptive_avg_pool2d(x, sh.output_size).shape).astype(dtype)
    if direction == "fwd":
        calls = [lambda m=m: m.adaptive_avg_pool2d(x, sh.output_size, method="direct")
                 for m in (new, old)]
    else:
        calls = [lambda m=m: m.adaptive_avg_pool2d_backward(g, sh.x_shape, sh.output_size,
                                                            method="direct")
                 for m in (new, old)]
    compare(f"{sh.name:14s} {direction} {dtype}", calls, reps)


def nets(new, old, names, steps=30):
    import fastconv.bench.nets as net_new

    net_old = importlib.import_module(old.__name__ + ".bench.nets")
    for name in names:
        a, b = net_new.build(name, "fastconv"), net_old.build(name, "fastconv")
        for _ in range(3):
            a.step(), b.step()
        compare(f"{name:14s} step", (a.step, b.step), steps)


def main(rev, what, names, direction="fwd", dtype="float32", *conv_options):
    sys.path.insert(0, str(ROOT))
    import fastconv

    old = load_old(rev)
    if what == "nets":
        nets(fastconv, old, names.split(","))
    elif what == "pool":
        pool(fastconv, old, names.split(","), direction, dtype)
    else:
        conv(fastconv, old, names.split(","), direction, dtype, *conv_options)


if __name__ == "__main__":
    main(*sys.argv[1:])
