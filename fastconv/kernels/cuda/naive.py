"""cuda-naive conv2d: one thread per output element (a grid-stride loop), straight loops,
float64 accumulation.

Backward: dx gathers per input pixel, dw has one thread per weight element. cuda-direct falls
back to these kernels where its shared-memory tiles do not fit.
"""

from __future__ import annotations

import functools

from ._common import _bias_grad, _cuda, _launch_flat, _ns
from ._memory import _dummy, _Io

cuda = None  # numba.cuda, bound by _cuda(globals()) on first use


@functools.cache
def _naive():
    _cuda(globals())

    @cuda.jit
    def forward(x, w, b, out, sh, sw, pt, pl, dh, dw, groups, has_bias):
        _, _, h, wd = x.shape
        k_out, cg, kh, kw = w.shape
        oh, ow = out.shape[2], out.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            o = r % k_out
            n = r // k_out
            c0 = (o // kg) * cg
            acc = 0.0
            for c in range(cg):
                for p in range(kh):
                    row = i * sh - pt + p * dh
                    if row < 0 or row >= h:
                        continue
                    for q in range(kw):
                        col = j * sw - pl + q * dw
                        if 0 <= col < wd:
                            acc += x[n, c0 + c, row, col] * w[o, c, p, q]
            if has_bias:
                acc += b[o]
            out[n, o, i, j] = acc

    @cuda.jit
    def backward_input(g, w, dx, sh, sw, pt, pl, dh, dw, groups):
        """dx gathers, per input pixel, every (output, tap) pair that read it."""
        _, c_in, h, wd = dx.shape
        k_out, cg, kh, kw = w.shape
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
            col = t % wd
            r = t // wd
            row = r % h
            r //= h
            c = r % c_in
            n = r // c_in
            grp = c // cg
            cl = c - grp * cg
            acc = 0.0
            for ol in range(kg):
                o = grp * kg + ol
                for p in range(kh):
                    ti = row + pt - p * dh
                    if ti < 0 or ti % sh != 0 or ti // sh >= oh:
                        continue
                    i = ti // sh
                    for q in range(kw):
                        tj = col + pl - q * dw
                        if tj < 0 or tj % sw != 0 or tj // sw >= ow:
                            continue
                        acc += g[n, o, i, tj // sw] * w[o, cl, p, q]
            dx[n, c, row, col] = acc

    @cuda.jit
    def backward_weight(g, x, dwt, sh, sw, pt, pl, dh, dw, groups):
        n_batch, _, h, wd = x.shape
        k_out, cg, kh, kw = dwt.shape
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), dwt.size, cuda.gridsize(1)):
            q = t % kw
            r = t // kw
            p = r % kh
            r //= kh
            c = r % cg
            o = r // cg
            c0 = (o // kg) * cg
            acc = 0.0
            for n in range(n_batch):
                for i in range(oh):
                    row = i * sh - pt + p * dh
                    if row < 0 or row >= h:
                        continue
                    for j in range(ow):
                        col = j * sw - pl + q * dw
                        if 0 <= col < wd:
                            acc += g[n, o, i, j] * x[n, c0 + c, row, col]
            dwt[o, c, p, q] = acc

    return _ns(forward=forward, backward_input=backward_input, backward_weight=backward_weight)


def conv2d_forward_naive(x, w, b, spec):
    io = _Io(spec)
    xd, wd, bd = io.inputs(x, w, b)
    out = io.empty(spec.out_shape)
    _launch_flat(_naive().forward, out.size, xd, wd, _dummy(spec.dtype) if bd is None else bd,
                 out, *spec.loop_args, bd is not None)
    return io.output(out)


def conv2d_backward_naive(g, x, w, spec, need_input, need_weight, need_bias):
    io = _Io(spec)
    gd, xd, wd = io.inputs(g, x if need_weight else None, w if need_input else None)
    dx = dw = db = None
    if need_input:
        dx = io.empty(spec.x_shape)
        _launch_flat(_naive().backward_input, dx.size, gd, wd, dx, *spec.loop_args)
        dx = io.output(dx)
    if need_weight:
        dw = io.empty(spec.w_shape)
        _launch_flat(_naive().backward_weight, dw.size, gd, xd, dw, *spec.loop_args)
        dw = io.output(dw)
    if need_bias:
        db = io.output(_bias_grad(gd, spec, io))
    return dx, dw, db
