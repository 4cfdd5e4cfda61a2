"""Measure fastconv's ``method="im2col"`` against its peers on the shape suite (DESIGN.md 4).

Usage::

    python benchmarks/measure_im2col.py                  # float32, 2 threads, 3 rounds
    python benchmarks/measure_im2col.py --rounds 1 --shapes vgg-256 keras-c2

Prints markdown tables: conv forward / backward times and GFLOP/s of

* ``im2col``      fastconv's method (fused tiles: im2col + one BLAS GEMM per tile and group);
* ``torch``       PyTorch CPU ``F.conv2d`` and its autograd backward (dx and dw);
* ``dlfs``        the NumPy layers of "Deep Learning from Scratch" (``np.pad`` + strided copy +
                  ``np.dot``, columns cached by forward for backward), written here;
* ``cs231n``      the CS231n approach, a serial Cython im2col + ``np.dot``: fastconv's own
                  ``_im2col.im2col`` / ``col2im`` with OpenMP held at 1 thread stand in for
                  CS231n's serial ``im2col_cython`` (BLAS keeps its threads);
* ``whole``       the same whole-matrix pipeline with OpenMP at full thread count: what
                  ``im2col`` would be without tiles (one GEMM per group over the whole batch);

against numpy's float32 GEMM roof (a 2048^3 matmul) measured in the same run, then the time
split of ``im2col`` (unfold vs GEMM vs col2im), then max-pool against the NumPy im2col pooling of
the book and PyTorch.

Timing on a shared machine: every number is a median over repetitions and rounds, libraries are
timed one block at a time after a 1 s pause (idle OpenMP / BLAS worker threads of the previous
library spin for a while and would slow the next one), and ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

import fastconv as fc
from fastconv.bench import CONV_SHAPES as SUITE
from fastconv import _validate
from fastconv.kernels import _im2col
from fastconv.kernels import im2col as kim2col

# name: (N, C, H=W, K, R=S, stride, pad, groups), the suite fastconv.bench defines
CONV_SHAPES = {
    s.name: (s.n, s.c, s.hw, s.k, s.r, s.stride, s.pad, s.groups)
    for s in SUITE if not s.hidden
}
POOL_SHAPES = {  # name: x shape, kernel, stride
    "2x2 (64,30,24,24)": ((64, 30, 24, 24), 2, 2),
    "2x2 (64,64,26,26)": ((64, 64, 26, 26), 2, 2),
    "2x2 (8,64,112,112)": ((8, 64, 112, 112), 2, 2),
    "2x2 (8,256,56,56)": ((8, 256, 56, 56), 2, 2),
    "3x3s2 (8,96,55,55)": ((8, 96, 55, 55), 3, 2),
}
PAUSE = 1.0  # seconds between libraries (--pause)
BUDGET = 0.5  # seconds of repetitions per timed block (--budget)


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn, budget=None, min_reps=5, max_reps=30):
    """(median, min) seconds of fn() over repetitions filling about ``budget`` seconds (after a
    warm-up call), preceded by a pause that lets the previous library's idle threads sleep."""
    budget = BUDGET if budget is None else budget
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def gemm_roof(size=2048):
    """numpy float32 GEMM GFLOP/s: (median, best) over repetitions."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    c = np.empty_like(a)
    med, best = timed(lambda: np.matmul(a, a, out=c), budget=1.0, min_reps=5)
    return 2 * size ** 3 / med / 1e9, 2 * size ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# "Deep Learning from Scratch": NumPy im2col layers (np.pad + strided copy + np.dot)


def dlfs_im2col(x, fh, fw, stride, pad, fill=0.0):
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    img = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=fill)
    col = np.zeros((n, c, fh, fw, oh, ow), dtype=x.dtype)
    for y in range(fh):
        for xx in range(fw):
            col[:, :, y, xx] = img[:, :, y:y + stride * oh:stride, xx:xx + stride * ow:stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, -1)


def dlfs_col2im(col, shape, fh, fw, stride, pad):
    n, c, h, w = shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    col = col.reshape(n, oh, ow, c, fh, fw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * pad + stride - 1, w + 2 * pad + stride - 1), dtype=col.dtype)
    for y in range(fh):
        for xx in range(fw):
            img[:, :, y:y + stride * oh:stride, xx:xx + stride * ow:stride] += col[:, :, y, xx]
    return img[:, :, pad:h + pad, pad:w + pad]


class DlfsConv:
    """The book's Convolution layer; groups as one im2col and a dot per group of columns."""

    def __init__(self, w, b, stride, pad, groups):
        self.w, self.b, self.stride, self.pad, self.groups = w, b, stride, pad, groups

    def forward(self, x):
        k, cg, fh, fw = self.w.shape
        n, _, h, wd = x.shape
        oh = (h + 2 * self.pad - fh) // self.stride + 1
        ow = (wd + 2 * self.pad - fw) // self.stride + 1
        self.x_shape = x.shape
        self.col = dlfs_im2col(x, fh, fw, self.stride, self.pad)
        if self.groups == 1:
            out = np.dot(self.col, self.w.reshape(k, -1).T) + self.b
        else:
            kg, width = k // self.groups, cg * fh * fw
            out = np.empty((self.col.shape[0], k), x.dtype)
            for g in range(self.groups):
                out[:, g * kg:(g + 1) * kg] = np.dot(
                    self.col[:, g * width:(g + 1) * width],
                    self.w[g * kg:(g + 1) * kg].reshape(kg, -1).T)
            out += self.b
        return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)

    def backward(self, dout):
        k, cg, fh, fw = self.w.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, k)
        db = np.sum(dout, axis=0)
        if self.groups == 1:
            dw = np.dot(self.col.T, dout).T.reshape(self.w.shape)
            dcol = np.dot(dout, self.w.reshape(k, -1))
        else:
            kg, width = k // self.groups, cg * fh * fw
            dw = np.empty(self.w.shape, self.w.dtype)
            dcol = np.empty(self.col.shape, self.col.dtype)
            for g in range(self.groups):
                dg = dout[:, g * kg:(g + 1) * kg]
                cols = self.col[:, g * width:(g + 1) * width]
                dw[g * kg:(g + 1) * kg] = np.dot(cols.T, dg).T.reshape(kg, cg, fh, fw)
                dcol[:, g * width:(g + 1) * width] = np.dot(dg, self.w[g * kg:(g + 1) * kg]
                                                            .reshape(kg, -1))
        dx = dlfs_col2im(dcol, self.x_shape, fh, fw, self.stride, self.pad)
        return dx, dw, db


class DlfsPool:
    """The book's Pooling layer (im2col + max / argmax), padding with -inf as max-pool does."""

    def __init__(self, k, stride):
        self.k, self.stride = k, stride

    def forward(self, x):
        n, c, h, w = x.shape
        oh, ow = (h - self.k) // self.stride + 1, (w - self.k) // self.stride + 1
        col = dlfs_im2col(x, self.k, self.k, self.stride, 0).reshape(-1, self.k * self.k)
        self.x_shape, self.arg = x.shape, np.argmax(col, axis=1)
        return np.max(col, axis=1).reshape(n, oh, ow, c).transpose(0, 3, 1, 2)

    def backward(self, dout):
        dout = dout.transpose(0, 2, 3, 1)
        dmax = np.zeros((dout.size, self.k * self.k), dout.dtype)
        dmax[np.arange(self.arg.size), self.arg.ravel()] = dout.ravel()
        dcol = dmax.reshape(dout.shape[0] * dout.shape[1] * dout.shape[2], -1)
        return dlfs_col2im(dcol, self.x_shape, self.k, self.k, self.stride, 0)


# ---------------------------------------------------------------------------------------------
# the whole-matrix pipeline: fastconv's im2col / col2im + np.dot (CS231n's fast_layers order)


class WholeConv:
    """Columns of the whole batch, then one np.dot per group; col2im for dx.

    With ``omp_threads=1`` this is the CS231n approach (serial Cython im2col + np.dot)."""

    def __init__(self, w, b, stride, pad, groups, omp_threads):
        self.w, self.b, self.stride, self.pad, self.groups = w, b, stride, pad, groups
        self.omp_threads = omp_threads

    def _geo(self, x_shape):
        k, cg, fh, fw = self.w.shape
        oh = (x_shape[2] + 2 * self.pad - fh) // self.stride + 1
        ow = (x_shape[3] + 2 * self.pad - fw) // self.stride + 1
        return (fh, fw, self.stride, self.stride, self.pad, self.pad, 1, 1, oh, ow)

    def _with_threads(self, fn):
        saved = _im2col.get_max_threads()
        _im2col.set_num_threads(self.omp_threads)
        try:
            return fn()
        finally:
            _im2col.set_num_threads(saved)

    def forward(self, x):
        return self._with_threads(lambda: self._forward(x))

    def _forward(self, x):
        k, cg, fh, fw = self.w.shape
        geo = self._geo(x.shape)
        oh, ow = geo[-2:]
        kg, n = k // self.groups, x.shape[0]
        self.x, self.cols = x, []
        res = np.empty((k, n * oh * ow), x.dtype)
        for g in range(self.groups):
            cols = np.empty((cg * fh * fw, n * oh * ow), x.dtype)
            _im2col.im2col(x, cols, *geo, g * cg, (g + 1) * cg)
            np.dot(self.w[g * kg:(g + 1) * kg].reshape(kg, -1), cols, out=res[g * kg:(g + 1) * kg])
            self.cols.append(cols)
        res += self.b.reshape(-1, 1)
        return res.reshape(k, n, oh, ow).transpose(1, 0, 2, 3)

    def backward(self, dout):
        return self._with_threads(lambda: self._backward(dout))

    def _backward(self, dout):
        k, cg, fh, fw = self.w.shape
        kg = k // self.groups
        geo = self._geo(self.x.shape)
        d2 = dout.transpose(1, 0, 2, 3).reshape(k, -1)
        db = d2.sum(axis=1)
        dw = np.empty(self.w.shape, self.w.dtype)
        dx = np.empty(self.x.shape, self.x.dtype)
        for g in range(self.groups):
            dg, wg = d2[g * kg:(g + 1) * kg], self.w[g * kg:(g + 1) * kg].reshape(kg, -1)
            dw[g * kg:(g + 1) * kg] = (dg @ self.cols[g].T).reshape(kg, cg, fh, fw)
            _im2col.col2im(wg.T @ dg, dx, *geo, g * cg, (g + 1) * cg)
        return dx, dw, db


# ---------------------------------------------------------------------------------------------
# runs


def conv_problem(name, dtype=np.float32):
    n, c, hw, k, r, stride, pad, groups = CONV_SHAPES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw)).astype(dtype)
    w = (rng.standard_normal((k, c // groups, r, r)) / np.sqrt(c // groups * r * r)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    spec = _validate.conv2d(x, w, b, stride, pad, 1, groups)[3]
    g = rng.standard_normal(spec.out_shape).astype(dtype)
    return x, w, b, g, stride, pad, groups, spec


def conv_libraries(x, w, b, g, stride, pad, groups, torch):
    """name -> (forward thunk, backward thunk); backward runs after forward (cached state)."""
    conf = dict(stride=stride, padding=pad, groups=groups)
    libs = {
        "im2col": (lambda: fc.conv2d(x, w, b, **conf, method="im2col"),
                   lambda: fc.conv2d_backward(g, x, w, **conf, method="im2col")),
    }
    if torch is not None:
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        tg = torch.from_numpy(g)
        F = torch.nn.functional

        def t_fwd():
            with torch.no_grad():
                return F.conv2d(tx, tw, tb, stride=stride, padding=pad, groups=groups)

        def t_bwd():  # dx and dw (and db), as torch's autograd computes them
            return torch.ops.aten.convolution_backward(
                tg, tx, tw, [tw.shape[0]], [stride] * 2, [pad] * 2, [1, 1], False, [0, 0],
                groups, [True, True, True])

        libs["torch"] = (t_fwd, t_bwd)
    dl = DlfsConv(w, b, stride, pad, groups)
    libs["dlfs"] = (lambda: dl.forward(x), lambda: dl.backward(g))
    cs = WholeConv(w, b, stride, pad, groups, omp_threads=1)
    libs["cs231n"] = (lambda: cs.forward(x), lambda: cs.backward(g))
    wh = WholeConv(w, b, stride, pad, groups, omp_threads=fc.get_num_threads())
    libs["whole"] = (lambda: wh.forward(x), lambda: wh.backward(g))
    return libs


def check_conv(libs, torch):
    """Max relative difference of every library's forward and dx/dw to fastconv's."""
    ref_y = np.asarray(libs["im2col"][0]())
    ref = libs["im2col"][1]()
    errs = {}
    for name, (fwd, bwd) in libs.items():
        y = fwd()
        grads = bwd()
        if torch is not None and name == "torch":
            y = y.numpy()
            grads = [a.numpy() for a in grads]
        e = np.abs(np.asarray(y) - ref_y).max() / np.abs(ref_y).max()
        for a, r in zip(grads[:2], ref[:2]):
            e = max(e, np.abs(np.asarray(a) - r).max() / np.abs(r).max())
        errs[name] = float(e)
    return errs


def run_conv(names, rounds, torch):
    rows = {}
    for rnd in range(rounds):
        roof, roof_best = gemm_roof()
        print(f"round {rnd + 1}/{rounds}: numpy float32 GEMM 2048^3 = {roof:.0f} GFLOP/s "
              f"(best {roof_best:.0f})", file=sys.stderr, flush=True)
        for name in names:
            x, w, b, g, stride, pad, groups, spec = conv_problem(name)
            libs = conv_libraries(x, w, b, g, stride, pad, groups, torch)
            res = rows.setdefault(name, dict(flops=spec.flops, roof=[], roof_best=[], t={},
                                             tmin={}, err={}))
            res["roof"].append(roof)
            res["roof_best"].append(roof_best)
            if rnd == 0:
                res["err"] = check_conv(libs, torch)
            for lib, (fwd, bwd) in libs.items():
                tf = timed(fwd)
                fwd()
                tb = timed(bwd)
                res["t"].setdefault(lib, []).append((tf[0], tb[0]))
                res["tmin"].setdefault(lib, []).append((tf[1], tb[1]))
            print(f"  {name}: " + ", ".join(
                f"{lib} {v[-1][0] * 1e3:.1f}/{v[-1][1] * 1e3:.1f} ms" for lib, v in
                res["t"].items()), file=sys.stderr, flush=True)
    return rows


def profile_conv(names, reps=5):
    """Seconds (summed over threads) per phase of the im2col method, medians of ``reps``."""
    out = {}
    for name in names:
        x, w, b, g, stride, pad, groups, spec = conv_problem(name)
        xs, ws, bs, gs = (np.ascontiguousarray(a) for a in (x, w, b, g))
        time.sleep(PAUSE)
        acc = {}
        for _ in range(reps):
            tf, tb = {}, {}
            kim2col.conv2d_forward(xs, ws, bs, spec, times=tf)
            kim2col.conv2d_backward(gs, xs, ws, spec, True, True, False, times=tb)
            for k, v in {**{"fwd." + k: v for k, v in tf.items()}, **tb}.items():
                acc.setdefault(k, []).append(v)
        out[name] = ({k: statistics.median(v) for k, v in acc.items()}, kim2col.plan(spec))
    return out


def run_pool(rounds, torch):
    rows = {}
    for _ in range(rounds):
        for name, (shape, k, s) in POOL_SHAPES.items():
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            out, idx = fc.max_pool2d(x, k, s, return_indices=True, method="im2col")
            g = np.ones_like(out)
            dl = DlfsPool(k, s)
            libs = {
                "im2col": (lambda: fc.max_pool2d(x, k, s, return_indices=True, method="im2col"),
                           lambda: fc.max_pool2d_backward(g, idx, x.shape, k, s,
                                                          method="im2col")),
                "dlfs": (lambda: dl.forward(x), lambda: dl.backward(g)),
            }
            if torch is not None:
                tx = torch.from_numpy(x).requires_grad_(False)
                tidx = torch.from_numpy(idx)
                tg = torch.from_numpy(g)
                F = torch.nn.functional
                libs["torch"] = (
                    lambda: F.max_pool2d(tx, k, s, return_indices=True),
                    lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                        tg, tx, [k, k], [s, s], [0, 0], [1, 1], False, tidx))
            np.testing.assert_array_equal(np.asarray(dl.forward(x)), out)
            res = rows.setdefault(name, {})
            for lib, (fwd, bwd) in libs.items():
                tf = timed(fwd)
                fwd()
                tb = timed(bwd)
                res.setdefault(lib, []).append((tf[0], tb[0]))
                res.setdefault(lib + ":min", []).append((tf[1], tb[1]))
    return rows


# ---------------------------------------------------------------------------------------------
# report


def med(pairs, i):
    return statistics.median(p[i] for p in pairs)


def ratio(pairs_a, pairs_b, i=None):
    """Median over rounds of a/b (i: 0 forward, 1 backward, None forward+backward)."""
    def one(a, b):
        return (sum(a) / sum(b)) if i is None else a[i] / b[i]
    return statistics.median(one(a, b) for a, b in zip(pairs_a, pairs_b))


def report(conv, prof, pool, threads, rounds, torch):
    roofs = [row["roof"][i] for row in conv.values() for i in range(len(row["roof"]))]
    roof = statistics.median(roofs) if roofs else float("nan")
    print(f"### conv2d, float32, {threads} threads, medians over {rounds} round(s)\n")
    print(f"numpy float32 GEMM roof (2048^3 matmul) in this run: median {roof:.0f} GFLOP/s "
          f"(min {min(roofs):.0f}, max {max(roofs):.0f}); "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else "") + "\n")
    print("Times in ms (forward / backward = dx + dw + db). `fwd/roof`, `bwd/roof`: im2col's "
          "GFLOP/s over the roof measured in the same round (backward counts 2x the forward "
          "FLOPs). `x dlfs`, `x cs231n`, `x whole`: their forward+backward time over im2col's.\n")
    libs = ["im2col", "torch", "dlfs", "cs231n", "whole"]
    print("| shape | GFLOP | " + " | ".join(f"{lib} ms" for lib in libs if any(
        lib in r["t"] for r in conv.values())) + " | im2col GF/s fwd / bwd | fwd/roof | "
          "bwd/roof | torch GF/s fwd / bwd | x dlfs | x cs231n | x whole |")
    present = [lib for lib in libs if any(lib in r["t"] for r in conv.values())]
    print("|" + "---|" * (len(present) + 9))
    for name, r in conv.items():
        t, fl = r["t"], r["flops"]
        cells = [f"{med(t[lib], 0) * 1e3:.2f} / {med(t[lib], 1) * 1e3:.2f}" for lib in present]
        ours = t["im2col"]
        fwd_frac = statistics.median(fl / p[0] / 1e9 / rf for p, rf in zip(ours, r["roof"]))
        bwd_frac = statistics.median(2 * fl / p[1] / 1e9 / rf for p, rf in zip(ours, r["roof"]))
        tg = (f"{fl / med(t['torch'], 0) / 1e9:.0f} / {2 * fl / med(t['torch'], 1) / 1e9:.0f}"
              if "torch" in t else "-")
        print(f"| {name} | {fl / 1e9:.3f} | " + " | ".join(cells)
              + f" | {fl / med(ours, 0) / 1e9:.0f} / {2 * fl / med(ours, 1) / 1e9:.0f}"
              f" | {fwd_frac:.2f} | {bwd_frac:.2f} | {tg}"
              f" | {ratio(t['dlfs'], ours):.1f} | {ratio(t['cs231n'], ours):.2f}"
              f" | {ratio(t['whole'], ours):.2f} |")
    best_roof = max(r for row in conv.values() for r in row["roof_best"])
    print(f"\nBest of repetitions (the least disturbed run of each block; an estimate of the "
          f"uncontended speed on a shared machine), against the best roof of the run, "
          f"{best_roof:.0f} GFLOP/s:\n")
    print("| shape | im2col ms | torch ms | im2col GF/s fwd / bwd | fwd/roof | bwd/roof | "
          "x dlfs | x cs231n | x whole |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in conv.items():
        t, fl = r["tmin"], r["flops"]
        best = {lib: (min(p[0] for p in v), min(p[1] for p in v)) for lib, v in t.items()}
        ours = best["im2col"]

        def x(lib):
            return sum(best[lib]) / sum(ours)

        tt = (f"{best['torch'][0] * 1e3:.2f} / {best['torch'][1] * 1e3:.2f}"
              if "torch" in best else "-")
        print(f"| {name} | {ours[0] * 1e3:.2f} / {ours[1] * 1e3:.2f} | {tt} | "
              f"{fl / ours[0] / 1e9:.0f} / {2 * fl / ours[1] / 1e9:.0f} | "
              f"{fl / ours[0] / 1e9 / best_roof:.2f} | {2 * fl / ours[1] / 1e9 / best_roof:.2f} | "
              f"{x('dlfs'):.1f} | {x('cs231n'):.2f} | {x('whole'):.2f} |")
    errs = {lib: max(r["err"].get(lib, 0) for r in conv.values()) for lib in present}
    print("\nLargest relative difference to im2col over the shapes (forward, dx, dw): "
          + ", ".join(f"{lib} {e:.1e}" for lib, e in errs.items()) + "\n")

    if prof:
        print("### where im2col's time goes (seconds summed over threads, % of the pass)\n")
        print("| shape | tile cols | dx block (ch x img) | fwd: im2col / GEMM / store | "
              "dw: im2col / GEMM / gather | dx: GEMM / col2im |")
        print("|---|---|---|---|---|---|")
        for name, (p, plan) in prof.items():
            ow = conv_problem(name)[7].out_hw[1]

            def pct(keys):
                tot = sum(p[k] for k in keys)
                return " / ".join(f"{100 * p[k] / tot:.0f}%" for k in keys)

            bw = ["dw.im2col", "dw.gemm", "dw.gather", "dx.gemm", "dx.col2im"]
            tot = sum(p[k] for k in bw)
            dw_share = sum(p[k] for k in bw[:3]) / tot
            print(f"| {name} | {plan['tile_rows'] * ow} | {plan['chan_block']} x "
                  f"{plan['img_block']} | {pct(['fwd.im2col', 'fwd.gemm', 'fwd.store'])} | "
                  f"{pct(bw[:3])} (dw {100 * dw_share:.0f}% of bwd) | {pct(bw[3:])} |")
        print()

    if pool:
        print(f"### max-pool, float32, {threads} threads\n")
        print("Times in ms (forward with indices / backward). `x dlfs`: the book's im2col "
              "pooling time over im2col's.\n")
        present = [lib for lib in ("im2col", "dlfs", "torch") if lib in next(iter(pool.values()))]
        print("| pool | " + " | ".join(f"{lib} ms" for lib in present)
              + " | x dlfs fwd | x dlfs bwd | x torch fwd | best of reps: im2col ms | "
              "x dlfs fwd | x dlfs bwd |")
        print("|" + "---|" * (len(present) + 7))
        for name, r in pool.items():
            cells = [f"{med(r[lib], 0) * 1e3:.2f} / {med(r[lib], 1) * 1e3:.2f}" for lib in present]
            xt = f"{ratio(r['torch'], r['im2col'], 0):.2f}" if "torch" in r else "-"
            b_ours = [min(p[i] for p in r["im2col:min"]) for i in (0, 1)]
            b_dl = [min(p[i] for p in r["dlfs:min"]) for i in (0, 1)]
            print(f"| {name} | " + " | ".join(cells)
                  + f" | {ratio(r['dlfs'], r['im2col'], 0):.1f}"
                  f" | {ratio(r['dlfs'], r['im2col'], 1):.1f} | {xt}"
                  f" | {b_ours[0] * 1e3:.2f} / {b_ours[1] * 1e3:.2f}"
                  f" | {b_dl[0] / b_ours[0]:.1f} | {b_dl[1] / b_ours[1]:.1f} |")
        print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="*", default=list(CONV_SHAPES), choices=list(CONV_SHAPES))
    ap.add_argument("--no-pool", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--pause", type=float, default=PAUSE,
                    help="seconds to sleep before timing each library (idle threads settle)")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help="seconds of repetitions per timed block")
    args = ap.parse_args(argv)
    globals().update(PAUSE=args.pause, BUDGET=args.budget)
    fc.set_num_threads(args.threads)
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None
    print(f"$ {' '.join([os.path.basename(sys.executable)] + sys.argv)}", file=sys.stderr)
    conv = run_conv(args.shapes, args.rounds, torch)
    prof = profile_conv(args.shapes)
    pool = None if args.no_pool else run_pool(args.rounds, torch)
    report(conv, prof, pool, args.threads, args.rounds, torch)


if __name__ == "__main__":
    main()
