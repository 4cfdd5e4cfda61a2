"""Other ways to compute the same things, for benchmarks and cross-checks: NumPy, SciPy, PyTorch.

Used by ``python -m fastconv bench`` (`fastconv.bench`) and by the pytest-benchmark suites in
``benchmarks/``. Nothing here is used by fastconv's own kernels.

``im2col_*``
    A plain NumPy implementation in the style of the layers of "Deep Learning from Scratch"
    (Saito): pad with ``np.pad``, copy each kernel tap's strided view into a column matrix, one
    ``np.dot`` (BLAS), and the reverse scatter (col2im) for the gradients. Written here from the
    description, not copied. This is the reference for speed-ups and, computed in float64, for
    the errors that the benchmark reports.
``scipy_conv2d``
    ``scipy.signal.correlate2d`` looped over batch, output and input channels: only sensible on
    small problems (see `scipy_is_small`).
``torch_*``
    PyTorch's CPU (and CUDA) kernels, imported only when asked for.

Semantics are those of DESIGN.md: NCHW, cross-correlation, ``padding`` as an int, a pair,
((top, bottom), (left, right)) or "valid" / "same" / "full", max-pool padded with ``-inf``,
indices are flat positions in the unpadded input plane, the first maximum of a window wins. ``ceil_mode`` is not supported (the shape suite does
not use it).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "im2col_conv2d",
    "im2col_conv2d_backward",
    "im2col_max_pool2d",
    "im2col_max_pool2d_backward",
    "im2col_conv_transpose2d",
    "im2col_conv_transpose2d_backward",
    "numpy_adaptive_avg_pool2d",
    "numpy_adaptive_avg_pool2d_backward",
    "scipy_conv2d",
    "scipy_is_small",
    "torch_callable",
]


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def _pads(padding, hw=None, k_eff=None, stride=None):
    """((top, bottom), (left, right)) from an int, a pair, the nested form or a mode string
    (the strings need the input size, the dilated kernel extent and the stride)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "full":
            return tuple((k - 1, k - 1) for k in k_eff)
        if padding != "same":
            raise ValueError(f"padding={padding!r} is not one of ('valid', 'same', 'full')")
        out = []
        for n, k, s in zip(hw, k_eff, stride):  # Keras: output ceil(n / s), odd pixel last
            total = max((-(-n // s) - 1) * s + k - n, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if np.ndim(padding) == 2:
        (t, b), (left, r) = padding
        return (int(t), int(b)), (int(left), int(r))
    ph, pw = _pair(padding)
    return (ph, ph), (pw, pw)


def _out_size(size, lo, hi, k, s, d):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------------------------------
# NumPy im2col (the "Deep Learning from Scratch" way)


def _columns(xp, kh, kw, sh, sw, dh, dw, oh, ow):
    """The column matrix of a padded batch: one row per output pixel (n, i, j), one column per
    input tap (c, p, q). Built one kernel tap at a time from strided views, as the book does."""
    n, c = xp.shape[:2]
    col = np.empty((n, c, kh, kw, oh, ow), dtype=xp.dtype)
    for p in range(kh):
        r0 = p * dh
        for q in range(kw):
            c0 = q * dw
            col[:, :, p, q] = xp[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def _uncolumns(dcol, x_shape, pads, kh, kw, sh, sw, dh, dw, oh, ow):
    """col2im: add each column back onto the (padded) input positions it was copied from."""
    n, c, h, w = x_shape
    (pt, pb), (pl, pr) = pads
    dxp = np.zeros((n, c, h + pt + pb, w + pl + pr), dtype=dcol.dtype)
    d6 = dcol.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    for p in range(kh):
        r0 = p * dh
        for q in range(kw):
            c0 = q * dw
            dxp[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw] += d6[:, :, p, q]
    return dxp[:, :, pt:pt + h, pl:pl + w]


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    _, _, h, w = x_shape
    _, _, kh, kw = w_shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pads = _pads(padding, (h, w), (dh * (kh - 1) + 1, dw * (kw - 1) + 1), (sh, sw))
    oh = _out_size(h, *pads[0], kh, sh, dh)
    ow = _out_size(w, *pads[1], kw, sw, dw)
    return (sh, sw), (dh, dw), pads, (oh, ow)


def im2col_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d forward with NumPy: im2col, then one matrix product per group (BLAS).

    Like the book, the result is a transposed view of the product, not a C-contiguous copy.
    """
    n, c = x.shape[:2]
    k, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), pads, (oh, ow) = _conv_geometry(x.shape, w.shape, stride, padding,
                                                        dilation)
    xp = np.pad(x, ((0, 0), (0, 0), *pads))
    col = _columns(xp, kh, kw, sh, sw, dh, dw, oh, ow)  # (N*OH*OW, C*KH*KW)
    if groups == 1:
        out = np.dot(col, w.reshape(k, -1).T)  # (N*OH*OW, K)
    else:
        kg, j = k // groups, cg * kh * kw
        colg = col.reshape(-1, groups, j).transpose(1, 0, 2)  # (G, M, J)
        wg = w.reshape(groups, kg, j).transpose(0, 2, 1)  # (G, J, Kg)
        out = np.matmul(colg, wg).transpose(1, 0, 2).reshape(-1, k)
    if b is not None:
        out += b
    return out.reshape(n, oh, ow, k).transpose(0, 3, 1, 2)


def im2col_conv2d_backward(grad_out, x, w, stride=1, padding=0, dilation=1, groups=1):
    """Gradients (dx, dw, db) of `im2col_conv2d` with NumPy: the columns are rebuilt from x,
    dw is ``dout^T col``, dx is col2im of ``dout W``."""
    k, cg, kh, kw = w.shape
    (sh, sw), (dh, dw_), pads, (oh, ow) = _conv_geometry(x.shape, w.shape, stride, padding,
                                                         dilation)
    xp = np.pad(x, ((0, 0), (0, 0), *pads))
    col = _columns(xp, kh, kw, sh, sw, dh, dw_, oh, ow)  # (M, C*KH*KW)
    dout = grad_out.transpose(0, 2, 3, 1).reshape(-1, k)  # (M, K)
    db = dout.sum(axis=0)
    if groups == 1:
        wmat = w.reshape(k, -1)
        dw = np.dot(dout.T, col).reshape(w.shape)
        dcol = np.dot(dout, wmat)
    else:
        kg, j = k // groups, cg * kh * kw
        colg = col.reshape(-1, groups, j).transpose(1, 0, 2)  # (G, M, J)
        doutg = dout.reshape(-1, groups, kg).transpose(1, 0, 2)  # (G, M, Kg)
        wg = w.reshape(groups, kg, j)  # (G, Kg, J)
        dw = np.matmul(doutg.transpose(0, 2, 1), colg).reshape(w.shape)
        dcol = np.matmul(doutg, wg).transpose(1, 0, 2).reshape(col.shape)
    dx = _uncolumns(dcol, x.shape, pads, kh, kw, sh, sw, dh, dw_, oh, ow)
    return dx, dw, db


def _pool_geometry(x_shape, kernel_size, stride, padding, dilation):
    _, _, h, w = x_shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oh = _out_size(h, ph, ph, kh, sh, dh)
    ow = _out_size(w, pw, pw, kw, sw, dw)
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow)


def im2col_max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1):
    """max-pool forward with NumPy: the window taps side by side, then max and argmax.

    Returns (out, indices); indices are flat positions in the unpadded H*W plane.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _pool_geometry(
        x.shape, kernel_size, stride, padding, dilation)
    xp = x if ph == pw == 0 else np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)),
                                        constant_values=-np.inf)
    taps = np.empty((kh * kw, n, c, oh, ow), dtype=x.dtype)
    for p in range(kh):
        for q in range(kw):
            r0, c0 = p * dh, q * dw
            taps[p * kw + q] = xp[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw]
    arg = np.argmax(taps, axis=0)  # the first maximum; NaN counts as the maximum
    out = np.take_along_axis(taps, arg[None], axis=0)[0]
    rows = np.arange(oh).reshape(-1, 1) * sh - ph + (arg // kw) * dh
    cols = np.arange(ow) * sw - pw + (arg % kw) * dw
    return out, rows * w + cols


def im2col_max_pool2d_backward(grad_out, indices, x_shape, kernel_size, stride=None, padding=0,
                               dilation=1):
    """max-pool backward with NumPy: each gradient goes to its window's argmax (col2im-style,
    one strided add per tap, so overlapping windows add up)."""
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _pool_geometry(
        x_shape, kernel_size, stride, padding, dilation)
    # which tap of its window each index is
    rows, cols = indices // w, indices % w
    p = (rows - (np.arange(oh).reshape(-1, 1) * sh - ph)) // dh
    q = (cols - (np.arange(ow) * sw - pw)) // dw
    tap = p * kw + q
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=grad_out.dtype)
    for pp in range(kh):
        for qq in range(kw):
            r0, c0 = pp * dh, qq * dw
            dxp[:, :, r0:r0 + sh * (oh - 1) + 1:sh, c0:c0 + sw * (ow - 1) + 1:sw] += np.where(
                tap == pp * kw + qq, grad_out, 0)
    return dxp[:, :, ph:ph + h, pw:pw + w]


def im2col_conv_transpose2d(x, w, b=None, stride=1, padding=0):
    """conv_transpose2d forward with NumPy (groups 1, no output padding or dilation): one
    product ``x W`` per pixel, then col2im, the book's way of running a conv backward."""
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    out_shape = (n, cout, (h - 1) * sh - 2 * ph + kh, (wd - 1) * sw - 2 * pw + kw)
    dcol = np.dot(x.transpose(0, 2, 3, 1).reshape(-1, cin), w.reshape(cin, -1))
    out = _uncolumns(dcol, out_shape, ((ph, ph), (pw, pw)), kh, kw, sh, sw, 1, 1, h, wd)
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


def im2col_conv_transpose2d_backward(grad_out, x, w, stride=1, padding=0):
    """Gradients (dx, dw, db) of `im2col_conv_transpose2d`: dx is the conv2d of the
    grad-output, dw the product of x and the grad-output's columns."""
    cin = x.shape[1]
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    kh, kw = w.shape[2:]
    gp = np.pad(grad_out, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    col = _columns(gp, kh, kw, sh, sw, 1, 1, *x.shape[2:])  # (N*H*W, C_out*R*S)
    xm = x.transpose(0, 2, 3, 1).reshape(-1, cin)
    dx = np.dot(col, w.reshape(cin, -1).T).reshape(x.shape[0], *x.shape[2:], cin)
    dw = np.dot(xm.T, col).reshape(w.shape)
    return dx.transpose(0, 3, 1, 2), dw, grad_out.sum(axis=(0, 2, 3))


def numpy_adaptive_avg_pool2d(x, output_size=1):
    """Adaptive average pooling with NumPy: a mean over each window's slice."""
    n, c, h, w = x.shape
    oh, ow = _pair(output_size)
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    for i in range(oh):
        r0, r1 = i * h // oh, -(-(i + 1) * h // oh)
        for j in range(ow):
            c0, c1 = j * w // ow, -(-(j + 1) * w // ow)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def numpy_adaptive_avg_pool2d_backward(grad_out, x_shape, output_size=1):
    """Its gradient: each output's gradient spread evenly over its window."""
    n, c, h, w = x_shape
    oh, ow = _pair(output_size)
    dx = np.zeros(x_shape, dtype=grad_out.dtype)
    for i in range(oh):
        r0, r1 = i * h // oh, -(-(i + 1) * h // oh)
        for j in range(ow):
            c0, c1 = j * w // ow, -(-(j + 1) * w // ow)
            dx[:, :, r0:r1, c0:c1] += (grad_out[:, :, i:i + 1, j:j + 1]
                                       / ((r1 - r0) * (c1 - c0)))
    return dx


# ---------------------------------------------------------------------------------------------
# scipy.signal loops


def scipy_is_small(x_shape, w_shape, groups=1):
    """Whether looping scipy.signal over (n, k, c) finishes in well under a second."""
    n, c, h, w = x_shape
    k, cg, kh, kw = w_shape
    calls = n * k * cg
    return calls <= 20_000 and calls * h * w * kh * kw <= 2e8


def scipy_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d forward as ``scipy.signal.correlate2d`` summed over the input channels of each
    group, one call per (n, k, c); strides subsample the stride-1 result."""
    from scipy import signal

    n = x.shape[0]
    k, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), pads, (oh, ow) = _conv_geometry(x.shape, w.shape, stride, padding,
                                                        dilation)
    xp = np.pad(x, ((0, 0), (0, 0), *pads))
    if (dh, dw) != (1, 1):
        wd = np.zeros((k, cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1), dtype=w.dtype)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    kg = k // groups
    out = np.empty((n, k, oh, ow), dtype=np.result_type(x, w))
    for i in range(n):
        for o in range(k):
            c0 = (o // kg) * cg
            acc = signal.correlate2d(xp[i, c0], w[o, 0], mode="valid")
            for cc in range(1, cg):
                acc += signal.correlate2d(xp[i, c0 + cc], w[o, cc], mode="valid")
            out[i, o] = acc[: sh * (oh - 1) + 1:sh, : sw * (ow - 1) + 1:sw]
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_callable(op, arrays, conf, device="cpu", layout="NCHW"):
    """A zero-argument callable running ``op`` with PyTorch on ``device`` ("cpu" or "cuda"),
    and a function turning its result into NumPy arrays in fastconv's output order.

    ``arrays`` are the NumPy inputs of fastconv's function for ``op`` (see `fastconv.bench`);
    they are copied to tensors once, outside the callable. With ``layout="NHWC"`` (conv2d only)
    they are channels-last with HWIO filters, and PyTorch gets them as NCHW tensors in its
    ``channels_last`` memory format (the same bytes), its own way of running NHWC. On CUDA the callable synchronizes,
    and TF32 is turned off (for the whole process) so that float32 means float32, as in
    fastconv: cuDNN's default TF32 convolutions are faster but have 10-bit mantissas.
    """
    import torch
    import torch.nn.functional as F

    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if layout == "NHWC":
        return _torch_channels_last(op, arrays, conf, device, t, sync)
    if op.startswith("adaptive_avg_pool2d"):
        size = _pair(conf.get("output_size", 1))
        if op == "adaptive_avg_pool2d":
            (x,) = (t(a) for a in arrays)

            def call():
                y = F.adaptive_avg_pool2d(x, size)
                sync()
                return y

            return call, lambda y: (y.cpu().numpy(),)
        g = t(arrays[0])
        x = torch.empty(tuple(arrays[1]), dtype=g.dtype, device=device)  # its shape is used

        def call():
            dx = torch.ops.aten._adaptive_avg_pool2d_backward(g, x)
            sync()
            return dx

        return call, lambda dx: (dx.cpu().numpy(),)
    if op.startswith("conv_transpose2d"):
        stride, padding = _pair(conf.get("stride", 1)), _pair(conf.get("padding", 0))
        if op == "conv_transpose2d":
            x, w, b = (None if a is None else t(a) for a in arrays)

            def call():
                y = F.conv_transpose2d(x, w, b, stride, padding)
                sync()
                return y

            return call, lambda y: (y.cpu().numpy(),)
        g, x, w = (t(a) for a in arrays)

        def call():
            res = torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[1]], list(stride), list(padding), [1, 1], True, [0, 0], 1,
                [True, True, True])
            sync()
            return res

        return call, lambda res: tuple(r.cpu().numpy() for r in res)
    if op in ("conv2d", "conv2d_backward"):
        xa, wa = (arrays[0], arrays[1]) if op == "conv2d" else (arrays[1], arrays[2])
        (sh, sw), (dh, dw), ((pt, pb), (pl, pr)), _ = _conv_geometry(
            xa.shape, wa.shape, conf.get("stride", 1), conf.get("padding", 0),
            conf.get("dilation", 1))
        stride, dilation = (sh, sw), (dh, dw)
        groups = conf.get("groups", 1)
        symmetric = pt == pb and pl == pr
        pad = (pt, pl) if symmetric else (0, 0)

        def padded(xx):
            return xx if symmetric else F.pad(xx, (pl, pr, pt, pb))

    if op == "conv2d":
        x, w, b = (None if a is None else t(a) for a in arrays)

        def call():
            y = F.conv2d(padded(x), w, b, stride, pad, dilation, groups)
            sync()
            return y

        return call, lambda y: (y.cpu().numpy(),)
    if op == "conv2d_backward":
        g, x, w = (t(a) for a in arrays)
        k = w.shape[0]

        def call():
            res = torch.ops.aten.convolution_backward(
                g, padded(x), w, [k], list(stride), list(pad), list(dilation), False, [0, 0],
                groups, [True, True, True])
            sync()
            return res

        def finish(res):
            dx, dw, db = (r.cpu().numpy() for r in res)
            if not symmetric:
                dx = dx[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
            return dx, dw, db

        return call, finish
    kernel = _pair(conf["kernel_size"])
    stride = _pair(conf.get("stride") or conf["kernel_size"])
    padding, dilation = _pair(conf.get("padding", 0)), _pair(conf.get("dilation", 1))
    if op == "max_pool2d":
        (x,) = (t(a) for a in arrays)

        def call():
            res = F.max_pool2d(x, kernel, stride, padding, dilation, False, True)
            sync()
            return res

        return call, lambda res: (res[0].cpu().numpy(), res[1].cpu().numpy())
    if op == "max_pool2d_backward":
        g, idx, x_shape = arrays
        g, idx = t(g), t(idx)
        x = torch.empty(tuple(x_shape), dtype=g.dtype, device=device)  # only its shape is used

        def call():
            dx = torch.ops.aten.max_pool2d_with_indices_backward(
                g, x, list(kernel), list(stride), list(padding), list(dilation), False, idx)
            sync()
            return dx

        return call, lambda dx: (dx.cpu().numpy(),)
    raise ValueError(f"op={op!r} has no PyTorch peer here")


def _torch_channels_last(op, arrays, conf, device, t, sync):
    """conv2d and its backward in PyTorch's channels_last format, from NHWC / HWIO arrays."""
    import torch
    import torch.nn.functional as F

    cl = torch.channels_last

    def nchw(a):  # NHWC bytes seen as NCHW: already channels_last
        return t(a).permute(0, 3, 1, 2)

    def oihw(a):
        return t(a).permute(3, 2, 0, 1).contiguous(memory_format=cl)

    def nhwc(y):
        return y.permute(0, 2, 3, 1).cpu().numpy()

    stride, groups = _pair(conf.get("stride", 1)), conf.get("groups", 1)
    padding = _pair(conf.get("padding", 0))
    if op == "conv2d":
        x, w, b = nchw(arrays[0]), oihw(arrays[1]), t(arrays[2])

        def call():
            y = F.conv2d(x, w, b, stride, padding, 1, groups)
            sync()
            return y

        return call, lambda y: (nhwc(y),)
    g, x, w = nchw(arrays[0]), nchw(arrays[1]), oihw(arrays[2])

    def call():
        res = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]], list(stride), list(padding), [1, 1], False, [0, 0], groups,
            [True, True, True])
        sync()
        return res

    def finish(res):
        dx, dw, db = res
        return nhwc(dx), dw.permute(2, 3, 1, 0).cpu().numpy(), db.cpu().numpy()

    return call, finish
