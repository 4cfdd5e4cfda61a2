"""References, problem grids and tolerances shared by the conformance suite.

The references here are written independently of fastconv: padding, dilation and strides are
re-derived from DESIGN.md, the conv forward goes through ``scipy.signal``, gradients are central
differences in float64, and pooling is a NumPy sliding-window argmax.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from scipy import signal

from fastconv import _registry

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPES = (np.float32, np.float64)
TOL = {
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),
    np.dtype(np.float64): dict(rtol=1e-7, atol=1e-7),
}


def tol(dtype, reduction=1):
    """Per-dtype tolerance, loosened by sqrt(reduction length) for float32."""
    t = dict(TOL[np.dtype(dtype)])
    if np.dtype(dtype) == np.float32:
        scale = max(1.0, float(np.sqrt(reduction)))
        t = {k: v * scale for k, v in t.items()}
    return t


def method_params(op, problem=None):
    """Every registered method of ``op`` (that takes ``problem`` = (x shape, w shape, options)
    when given); CUDA methods carry the ``cuda`` mark."""
    return [
        pytest.param(m, marks=pytest.mark.cuda, id=m) if m.startswith("cuda") else
        pytest.param(m, id=m)
        for m in _registry.known(op)
        if problem is None or takes(op, m, *problem)
    ]


def is_cuda(method):
    return method.startswith("cuda")


def to_host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def checked(fn, *args, **kwargs):
    """Call fn and assert that no array argument was modified."""
    before = [(a, a.copy()) for a in args if isinstance(a, np.ndarray)]
    out = fn(*args, **kwargs)
    for a, copy in before:
        np.testing.assert_array_equal(a, copy, err_msg="an input array was modified")
    return out


# ---------------------------------------------------------------------------------------------
# conv reference


def _pair(v):
    return (v, v) if np.ndim(v) == 0 else tuple(v)


def ref_padding(padding, hw, kernel_hw, stride, dilation):
    """((top, bottom), (left, right)) from DESIGN.md section 1, written independently."""
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel_hw, dilation)]
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "full":
        return tuple((k - 1, k - 1) for k in k_eff)
    if padding == "same":
        res = []
        for n, k, s in zip(hw, k_eff, stride):
            out = int(np.ceil(n / s))
            total = max((out - 1) * s + k - n, 0)
            res.append((total // 2, total - total // 2))
        return tuple(res)
    if np.ndim(padding) == 2:
        return tuple(tuple(p) for p in padding)
    ph, pw = _pair(padding)
    return ((ph, ph), (pw, pw))


def _prep(x, w, stride, padding, dilation):
    stride, dilation = _pair(stride), _pair(dilation)
    pad = ref_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), *pad))
    kh, kw = w.shape[2:]
    wd = np.zeros((*w.shape[:2], dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1))
    wd[:, :, :: dilation[0], :: dilation[1]] = w
    return xp, wd, stride


def scipy_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, flip=False):
    """conv2d through scipy.signal.correlate2d (or convolve2d of the flipped kernel), in float64.

    Dilation becomes zeros inserted in the kernel and stride a subsampling of the stride-1 result.
    """
    xp, wd, (sh, sw) = _prep(x, w, stride, padding, dilation)
    n, _, _, _ = xp.shape
    k, cg = w.shape[:2]
    kg = k // groups
    out = []
    for i in range(n):
        planes = []
        for o in range(k):
            c0 = (o // kg) * cg
            acc = 0
            for c in range(cg):
                if flip:
                    acc = acc + signal.convolve2d(xp[i, c0 + c], wd[o, c, ::-1, ::-1], "valid")
                else:
                    acc = acc + signal.correlate2d(xp[i, c0 + c], wd[o, c], "valid")
            planes.append(acc[::sh, ::sw])
        out.append(planes)
    out = np.array(out)
    if b is not None:
        out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def einsum_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """A vectorized float64 reference (sliding windows + einsum), fast enough for numgrads."""
    xp, wd, (sh, sw) = _prep(x, w, stride, padding, dilation)
    n, c, _, _ = xp.shape
    k, cg, kh, kw = wd.shape
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    win = win.reshape(n, groups, cg, *win.shape[2:])
    wg = wd.reshape(groups, k // groups, cg, kh, kw)
    out = np.einsum("ngcijpq,gkcpq->ngkij", win, wg).reshape(n, k, *win.shape[3:5])
    if b is not None:
        out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def numerical_grads(x, w, g, conf, eps=1e-6):
    """Central differences of L = sum(conv2d(x, w) * g) in float64: (dx, dw, db)."""
    x, w, g = (np.array(a, np.float64) for a in (x, w, g))

    def loss(xx, ww):
        return float(np.sum(einsum_conv2d(xx, ww, **conf) * g))

    def grad(a, f):
        out = np.empty_like(a)
        flat, of = a.reshape(-1), out.reshape(-1)
        for i in range(flat.size):
            v = flat[i]
            flat[i] = v + eps
            hi = f()
            flat[i] = v - eps
            lo = f()
            flat[i] = v
            of[i] = (hi - lo) / (2 * eps)
        return out

    dx = grad(x, lambda: loss(x, w))
    dw = grad(w, lambda: loss(x, w))
    db = g.sum(axis=(0, 2, 3))  # L is b[k] times sum(g[:, k]) plus terms free of b
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# the problem grid: (N, C, H, W), (K, C // groups, R, S) and the options


class Case:
    def __init__(self, name, x_shape, w_shape, *, tiny=False, **conf):
        self.name, self.x_shape, self.w_shape, self.conf, self.tiny = (
            name, x_shape, w_shape, conf, tiny)

    def __repr__(self):
        return self.name

    @property
    def reduction(self):
        return int(np.prod(self.w_shape[1:]))

    def arrays(self, dtype, seed=0, bias=True, n=None):
        rng = np.random.default_rng(seed)
        xs = (n or self.x_shape[0], *self.x_shape[1:])
        x = rng.standard_normal(xs).astype(dtype)
        w = rng.standard_normal(self.w_shape).astype(dtype)
        b = rng.standard_normal(self.w_shape[0]).astype(dtype) if bias else None
        return x, w, b


CONV_CASES = [
    Case("plain", (2, 3, 7, 6), (4, 3, 3, 3), tiny=True),
    Case("stride2-pad1", (2, 3, 8, 7), (4, 3, 3, 3), stride=2, padding=1, tiny=True),
    Case("stride21-asympad", (2, 2, 7, 8), (3, 2, 2, 3), stride=(2, 1),
         padding=((1, 0), (2, 1)), tiny=True),
    Case("same", (2, 3, 7, 6), (4, 3, 3, 3), padding="same", tiny=True),
    Case("same-even-kernel", (2, 2, 6, 7), (3, 2, 4, 2), padding="same"),
    Case("same-stride2", (2, 3, 7, 8), (4, 3, 3, 3), stride=2, padding="same", tiny=True),
    Case("same-stride3-dil2", (2, 2, 8, 7), (3, 2, 3, 2), stride=3, dilation=2, padding="same"),
    Case("full", (2, 2, 6, 5), (3, 2, 3, 2), padding="full", tiny=True),
    Case("full-dil2", (1, 2, 5, 6), (2, 2, 2, 3), padding="full", dilation=2),
    Case("valid-dil21", (2, 3, 8, 7), (4, 3, 3, 2), padding="valid", dilation=(2, 1),
         tiny=True),
    Case("dil2-pad2", (2, 2, 8, 8), (3, 2, 3, 3), dilation=2, padding=2),
    Case("groups2", (2, 4, 7, 6), (6, 2, 3, 3), groups=2, padding=1, tiny=True),
    Case("depthwise", (2, 4, 7, 7), (4, 1, 3, 3), groups=4, padding=1, tiny=True),
    Case("depthwise-x2", (2, 3, 6, 7), (6, 1, 3, 3), groups=3, stride=2, padding="same"),
    Case("groups2-s2-d2-same", (2, 4, 8, 8), (4, 2, 3, 3), groups=2, stride=2, dilation=2,
         padding="same"),
    Case("1x1", (2, 5, 6, 5), (4, 5, 1, 1), tiny=True),
    Case("1x1-stride2", (2, 4, 7, 6), (3, 4, 1, 1), stride=2),
    Case("5x1", (2, 2, 8, 6), (3, 2, 5, 1), padding=(2, 0)),
    Case("kernel-fills-input", (2, 3, 3, 4), (4, 3, 3, 4), tiny=True),
    Case("5x5-pad2", (2, 2, 9, 9), (3, 2, 5, 5), padding=2),
    Case("big-pad", (1, 2, 4, 4), (2, 2, 3, 3), padding=3),
    # odd, larger sizes hit the blocking tails of the fast kernels
    Case("medium-odd", (3, 13, 17, 19), (11, 13, 3, 3), padding=1),
    Case("medium-stride2", (2, 9, 21, 18), (10, 9, 5, 5), stride=2, padding=2),
    Case("medium-depthwise", (2, 24, 15, 17), (24, 1, 3, 3), groups=24, padding=1),
    Case("medium-1x1", (2, 33, 9, 11), (17, 33, 1, 1)),
    Case("medium-firstlayer", (5, 1, 20, 20), (7, 1, 5, 5)),
]


def conv_cases(method):
    """The grid for a method: everything on the CPU, the tiny cases in the CUDA simulator."""
    if is_cuda(method) and SIM:
        return [c for c in CONV_CASES if c.tiny]
    return CONV_CASES


def takes(op, method, x_shape, w_shape, conf=None, **options):
    """Whether ``method`` takes this conv2d or conv_transpose2d problem at all (winograd takes
    3x3 stride-1 ones only; test_winograd.py checks that it refuses the others by name)."""
    from fastconv import _validate

    conf = {**(conf or {}), **options}
    x, w = np.empty(x_shape), np.empty(w_shape)
    if op.startswith("conv_transpose2d"):
        geometry = [conf.get(k, d) for k, d in (("stride", 1), ("padding", 0),
                                                ("output_padding", 0), ("groups", 1),
                                                ("dilation", 1))]
        spec = _validate.conv_transpose2d(x, w, None, *geometry, "NCHW")[3]
    else:
        geometry = [conf.get(k, d) for k, d in
                    (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))]
        spec = _validate.conv2d(x, w, None, *geometry, "NCHW")[3]
    return _registry.implementation(op, method).unsupported(spec) is None


def method_case_params(op, small_only=False):
    """(method, case) pairs for parametrize, with readable ids and the cuda mark; a method's
    pairs are the cases it takes."""
    out = []
    for m in _registry.known(op):
        for c in conv_cases(m):
            if small_only and c.name.startswith("medium"):
                continue
            if not takes(op, m, c.x_shape, c.w_shape, c.conf):
                continue
            marks = [pytest.mark.cuda] if is_cuda(m) else []
            out.append(pytest.param(m, c, marks=marks, id=f"{m}-{c.name}"))
    return out


@functools.cache
def numgrad_for(case_name):
    """Numerical gradients for a case's float64 data (computed once, shared by all methods)."""
    case = next(c for c in CONV_CASES if c.name == case_name)
    x, w, _ = case.arrays(np.float64)
    g = np.random.default_rng(1).standard_normal(
        einsum_conv2d(x, w, **case.conf).shape)
    return x, w, g, numerical_grads(x, w, g, case.conf)


# ---------------------------------------------------------------------------------------------
# pool reference


def ref_max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(out, indices) by sliding windows over a -inf padded copy; first maximum, NaN wins."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape

    def size(L, k, s, p, d):
        span = L + 2 * p - d * (k - 1) - 1
        o = (int(np.ceil(span / s)) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= L + p:
            o -= 1
        return o

    oh, ow = size(h, kh, sh, ph, dh), size(w, kw, sw, pw, dw)
    need_h = (oh - 1) * sh + dh * (kh - 1) + 1
    need_w = (ow - 1) * sw + dw * (kw - 1) + 1
    extra_h, extra_w = max(need_h - h - 2 * ph, 0), max(need_w - w - 2 * pw, 0)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (ph, ph + extra_h),
                                            (pw, pw + extra_w)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(
        xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw][:, :, :oh, :ow, ::dh, ::dw].reshape(n, c, oh, ow, kh * kw)
    arg = np.argmax(win, axis=-1)
    out = np.take_along_axis(win, arg[..., None], -1)[..., 0]
    p, q = arg // kw, arg % kw
    rows = np.arange(oh)[:, None] * sh - ph + p * dh
    cols = np.arange(ow)[None, :] * sw - pw + q * dw
    # a window whose maximum is -inf (all of it -inf, or all of it padding) keeps PyTorch's
    # start: the first tap at or below row 0 and at or right of column 0, in the plane or not
    r0 = np.arange(oh) * sh - ph
    c0 = np.arange(ow) * sw - pw
    r0 = r0 + -(-np.maximum(-r0, 0) // dh) * dh
    c0 = c0 + -(-np.maximum(-c0, 0) // dw) * dw
    start = np.broadcast_to(r0[:, None] * w + c0[None, :], out.shape)
    return out, np.where(out == -np.inf, start, rows * w + cols)


def ref_avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None):
    """Average pooling by loops over output positions, from PyTorch's documented rule: a window
    ends at most ``padding`` past the input; its divisor counts the padding it covers, or not."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    n, c, h, w = x.shape

    def size(L, k, s, p):
        o = -(-(L + 2 * p - k) // s) + 1 if ceil_mode else (L + 2 * p - k) // s + 1
        return o - 1 if ceil_mode and (o - 1) * s >= L + p else o

    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    out = np.empty((n, c, oh, ow))
    for i in range(oh):
        r0 = i * sh - ph
        r1 = min(r0 + kh, h + ph)
        for j in range(ow):
            c0 = j * sw - pw
            c1 = min(c0 + kw, w + pw)
            area = (r1 - r0) * (c1 - c0)
            a, b, e, f = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
            if divisor_override is not None:
                div = divisor_override
            else:
                div = area if count_include_pad else (b - a) * (f - e)
            out[:, :, i, j] = np.asarray(x, np.float64)[:, :, a:b, e:f].sum(axis=(2, 3)) / div
    return out


def ref_adaptive_avg_pool2d(x, output_size):
    """Adaptive average pooling: output row i averages rows floor(i*H/OH) to ceil((i+1)*H/OH)."""
    n, c, h, w = x.shape
    oh, ow = _pair(output_size)
    oh, ow = oh or h, ow or w
    out = np.empty((n, c, oh, ow))
    for i in range(oh):
        a, b = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            e, f = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, :, i, j] = np.asarray(x, np.float64)[:, :, a:b, e:f].mean(axis=(2, 3))
    return out


def ref_conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1,
                         dilation=1):
    """Transposed convolution by its definition: every input pixel scatters its weighted kernel
    into a full-size result, from which ``padding`` is cut (and ``output_padding`` kept)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    oph, opw = _pair(output_padding)
    dh, dw = _pair(dilation)
    n, cin, h, wd = x.shape
    _, cog, r, s = w.shape
    full = np.zeros((n, cog * groups, (h - 1) * sh + dh * (r - 1) + 1 + oph,
                     (wd - 1) * sw + dw * (s - 1) + 1 + opw))
    cig = cin // groups
    for gi in range(groups):
        xs = np.asarray(x[:, gi * cig:(gi + 1) * cig], np.float64)
        for p in range(r):
            for q in range(s):
                # (n, cig, h, wd) x (cig, cog) -> (n, cog, h, wd), placed with the stride
                part = np.einsum("nchw,co->nohw", xs, w[gi * cig:(gi + 1) * cig, :, p, q])
                full[:, gi * cog:(gi + 1) * cog, p * dh:p * dh + (h - 1) * sh + 1:sh,
                     q * dw:q * dw + (wd - 1) * sw + 1:sw] += part
    oh = (h - 1) * sh - 2 * ph + dh * (r - 1) + oph + 1
    ow = (wd - 1) * sw - 2 * pw + dw * (s - 1) + opw + 1
    out = full[:, :, ph:ph + oh, pw:pw + ow]
    return out if b is None else out + np.asarray(b).reshape(-1, 1, 1)
