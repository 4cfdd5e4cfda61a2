"""im2col + GEMM conv2d, and window max-pool, on the Cython core (CPU, BLAS).

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``. float32 stays float32 end to end (``sgemm``); float64 uses ``dgemm``.

Algorithm
---------
With ``Cg = C // groups``, ``Kg = K // groups``, ``P = OH*OW`` and the batch folded into the
GEMM's N dimension, the columns of group ``g`` form the matrix ``cols_g`` of shape
``(Cg*R*S, N*P)`` (row ``(c*R + r)*S + s``, column ``(n*OH + i)*OW + j``; see
``fastconv.kernels._im2col``) and the weights of the group the matrix ``W_g`` of shape
``(Kg, Cg*R*S)``, a reshape of ``w`` without copy. Then

* forward:      ``Y_g = W_g @ cols_g``, stored as ``out[:, g*Kg:(g+1)*Kg]`` plus the bias;
* grad-weight:  ``dW_g = G_g @ cols_g.T`` with ``G_g`` the ``(Kg, N*P)`` grad-output of the group;
* grad-input:   ``dcols_g = W_g.T @ G_g``, then ``dx[:, group] = col2im(dcols_g)``;
* grad-bias:    ``grad_out.sum(axis=(0, 2, 3))``, on the thread pool (fastconv.kernels._reduce).

The column matrix is never built whole. Its columns are cut into tiles of ``tile_rows`` output
rows (``tile_rows*OW`` columns, a buffer of about ``TILE_BYTES``, spanning images where the
images are small), and fastconv's thread pool hands the tiles to the threads: each unfolds a
tile into its own buffer and multiplies it at once with one single-threaded BLAS ``gemm`` per
group, while the tile is still in its cache. For every product the BLAS call is given the memory
order it reads without copying: the tile is a column-major ``(T, Cg*R*S)`` operand, the weights
a column-major ``(Cg*R*S, Kg)`` one (both plain reshapes, no transposed copy), and the part of
``out`` / ``grad_out`` an image contributes, ``[n, k0:k1, rows]``, is a column-major
``(rows*OW, Kg)`` matrix with leading dimension ``P``: forward writes its product there and
grad-weight and grad-input read it there directly ("direct", one GEMM per image a tile
touches). A 1x1 convolution with stride 1 and no padding needs no unfold at all: the input
planes ``x[n, c0:c1, rows]`` are the columns, read in place, and grad-input's GEMM writes the
planes of ``dx`` directly (no col2im). Where tiles span many small images and the weights are
large (keras-c2), one GEMM per tile is cheaper than one per image (each call packs the weights),
and the tile's product
(forward) or grad-output (grad-weight) goes through a ``K x T`` staging buffer instead.

Why tiles rather than one ``(Kg x Cg*R*S) @ (Cg*R*S x N*P)`` call per group: the whole column
matrix is ``R*S/stride**2`` times the input (58 MB for vgg-256 in float32), is written to and
read back from memory, is page-faulted in on every call, and its ``im2col`` / ``col2im`` would
run on one thread pool right before / after the GEMM runs on BLAS's, each pool's idle threads
competing with the other's. Per-thread GEMMs on tiles have one pool, no big buffer and
cache-hot operands.

Parallelism and determinism
---------------------------
* forward: tiles claimed dynamically from the call's counter; each writes its own outputs.
* grad-weight: the tiles are cut into ``N_SLABS`` contiguous slabs (fewer if there are fewer
  tiles); each slab sums its tiles in order into its own ``K x Cg*R*S`` accumulator and the
  accumulators are added in slab order. The result depends on the tiling only, not on the
  number of threads or the schedule.
* grad-input: units of (images, group, channel block) write disjoint ``(n, c)`` planes, each
  folded in a fixed order (race-free ``col2im``).
* max-pool: ``(n, c)`` planes; backward adds overlapping windows in a fixed order per plane.

So every result is bit-identical run after run. The kernels' results depend on the tiling
only, never on the schedule or the threads running them; `plan` derives the tiling from the
problem and ``fastconv.get_num_threads()`` (enough tiles per thread), so a different thread
count may change the last bits of conv results (not of max-pool's).

Threads and BLAS
----------------
fastconv's pool runs the kernels (`fastconv.kernels._parallel.run`, which keeps small problems
on the calling thread). Every GEMM they make is single-threaded: a BLAS that threads itself
inside each of our threads would oversubscribe the cores, and the results would depend on its
threading. So the BLAS they call, SciPy's, is held at one thread around every call
(`serial_blas`, reference-counted across concurrent calls). NumPy's BLAS is a separate library
in the NumPy and SciPy wheels and is never touched; other code calling SciPy's BLAS from other
Python threads meanwhile runs single-threaded.

Memory
------
Peak extra memory, besides the inputs and the results, with ``t`` threads, ``T`` the columns of
a tile and ``e`` the item size:

* forward: ``t * (Cg*R*S + K) * T * e`` (``t * Cg*R*S * T * e`` when direct), i.e. about
  ``t * TILE_BYTES``, independent of the batch size (the classic method's column buffer is
  ``Cg*R*S * N*P * e``: 58 MB for vgg-256 in float32, against 2 x 1 MB here).
* backward: grad-weight ``n_slabs * K*Cg*R*S * e + t * (Cg*R*S + K) * T * e``, then
  grad-input ``t * (cb*R*S * ib*P + Kg * ib*P) * e`` for blocks of ``cb`` channels and ``ib``
  images (about ``DX_BLOCK_BYTES`` each), allocated one after the other, never together.
* max-pool: none beyond the output (and indices).

Channels-last
-------------
A channels-last 1x1 layer (stride 1, no padding, one group) is a GEMM on its arrays as they
lie: x as ``(N*H*W, C)``, w ``(1, 1, C, K)`` as ``(C, K)``, the output and grad-output as
``(N*H*W, K)``. Forward and grad-input multiply blocks of rows, grad-weight sums slabs of
rows (``_im2col.rows_times``, ``rows_gram``), on the pool with serial BLAS as above. Other
channels-last forwards of one group unfold x transposed to NCHW and store each tile's product
channels-last (``conv_forward_channels_last``: a pixel's K channels are a row of the GEMM's
column-major result). The rest is transposed to NCHW and back (fastconv.kernels.layout).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from . import _im2col, _parallel, _pool, _reduce
from ._numba import cdiv as _cdiv
from ._window import box_windows

__all__ = [
    "unsupported",
    "conv2d_forward",
    "conv2d_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "serial_blas",
    "plan",
    "geometry",
]

#: Target size of one thread's column tile (forward, grad-weight), in bytes.
TILE_BYTES = 1 << 20
#: Target size of one thread's grad-input block (its GEMM's output, folded by col2im), in bytes.
DX_BLOCK_BYTES = 4 << 20
#: A tile has at least this many columns when the problem is big enough (GEMM efficiency).
MIN_TILE_COLS = 256
#: Tiles (or grad-input units) per thread, when the problem is big enough (load balance).
TILES_PER_THREAD = 4
#: Weights (elements per group) up to which a tile spanning many images still takes one GEMM
#: per image, straight into the output (see `plan`).
DIRECT_MAX_WEIGHTS = 16384
#: Slabs of the grad-weight sum (the result depends on it, not on the thread count).
N_SLABS = 8


# ---------------------------------------------------------------------------------------------
# BLAS threads


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = None


@contextlib.contextmanager
def serial_blas():
    """Hold the BLAS the kernels call (SciPy's) at one thread inside the block.

    Reference-counted: with concurrent blocks, the first to enter saves the thread count and
    the last to leave restores it. NumPy's BLAS, a separate library, is never touched.
    """
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = _im2col.blas_threads()
            if _blas_saved not in (None, 1):
                _im2col.set_blas_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved not in (None, 1):
                _im2col.set_blas_threads(_blas_saved)


def unsupported(spec):
    """Why the conv kernels cannot take ``spec`` (None when they can): BLAS's 32-bit sizes."""
    k, cg, r, s = spec.w_shape
    sizes = {"the output plane OH*OW": spec.out_hw[0] * spec.out_hw[1],
             "the reduction C/groups*R*S": cg * r * s, "the output channels K": k}
    over = [f"{name} = {v}" for name, v in sizes.items() if v > _im2col.BLAS_SIZE_LIMIT]
    if over:
        return (f"{', '.join(over)} for x of shape {spec.x_shape} and weight of shape "
                f"{spec.w_shape} exceed the 32-bit BLAS interface's limit of "
                f"{_im2col.BLAS_SIZE_LIMIT} (use method='direct' or 'naive')")
    return None


# ---------------------------------------------------------------------------------------------
# tiling


def plan(spec, n_threads=None):
    """The tiling the kernels use for ``spec``: a dict of tile_rows, n_slabs, direct,
    chan_block, img_block and n_threads (see the module docstring)."""
    t = _parallel.count if n_threads is None else n_threads
    n, c, _, _ = spec.x_shape
    k, cg, r, s = spec.w_shape
    oh, ow = spec.out_hw
    e = np.dtype(spec.dtype).itemsize
    crs, plane, rows = cg * r * s, oh * ow, n * oh

    # forward / grad-weight: output rows per tile
    tile = max(TILE_BYTES // (crs * ow * e), _cdiv(MIN_TILE_COLS, ow), 1)
    if t > 1:  # enough tiles to keep every thread busy, before the GEMM size
        tile = min(tile, max(1, rows // (TILES_PER_THREAD * t)))
    tile = min(tile, rows)
    slabs = min(N_SLABS if t <= N_SLABS else t, _cdiv(rows, tile))
    # GEMMs straight into out / from grad_out, one per image a tile touches, when that is at
    # most two calls or the weights are small (each call repacks them); else one GEMM per tile
    # through a K x T staging buffer
    direct = tile <= oh + 1 or crs * (k // spec.groups) <= DIRECT_MAX_WEIGHTS or _pointwise(spec)

    # grad-input: channels of a group x images per unit
    per = r * s * plane * e  # one channel of one image
    cb = min(max(DX_BLOCK_BYTES // per, 1), cg)
    ib = min(max(DX_BLOCK_BYTES // (cb * per), 1), n) if cb == cg else 1
    while t > 1 and _cdiv(n, ib) * spec.groups * _cdiv(cg, cb) < TILES_PER_THREAD * t:
        if ib > 1:
            ib = _cdiv(ib, 2)
        elif cb > 1:
            cb = _cdiv(cb, 2)
        else:
            break
    return dict(tile_rows=int(tile), n_slabs=int(slabs), direct=bool(direct),
                chan_block=int(cb), img_block=int(ib), n_threads=t)


def _pointwise(spec):
    """1x1, stride 1, no padding: the kernels read the input planes as the columns in place
    (needs the direct GEMMs, one per image a tile touches)."""
    return (spec.w_shape[2:] == (1, 1) and spec.stride == (1, 1)
            and spec.padding == ((0, 0), (0, 0)))


def geometry(spec, kernel=None):
    """The kernels' `Geom` tuple for a conv spec, or for a pool spec with its ``kernel``."""
    n, c, h, w = spec.x_shape
    if kernel is None:
        k, _, r, s = spec.w_shape
        (pt, _), (pl, _) = spec.padding
        groups = spec.groups
    else:
        k, (r, s), (pt, pl), groups = c, kernel, spec.padding, 1
    return (n, c, h, w, k, r, s, *spec.stride, pt, pl, *spec.dilation, *spec.out_hw, groups)


# ---------------------------------------------------------------------------------------------
# conv2d


@functools.cache
def _through_nchw(op):
    from . import layout

    return layout.adapt(op, {"conv2d": conv2d_forward, "conv2d_backward": conv2d_backward}[op])


def _pointwise_nhwc(spec):
    return spec.layout == "NHWC" and spec.groups == 1 and _pointwise(spec)


def _row_block(spec, width):
    """Rows per item of a channels-last 1x1 product whose rows are ``width`` elements (its
    operand's and result's together): a tile of about TILE_BYTES, at least MIN_TILE_COLS,
    fewer where that leaves threads idle."""
    n, _, h, w = spec.x_shape
    m = n * h * w
    per = max(1, TILE_BYTES // (width * np.dtype(spec.dtype).itemsize))
    rows = min(per, max(_cdiv(m, TILES_PER_THREAD * _parallel.count), MIN_TILE_COLS))
    return max(1, min(rows, m))


def _forward_nhwc(x, w, b, spec):
    n, c, h, wd = spec.x_shape
    k, m = spec.w_shape[0], n * h * wd
    out = np.empty((n, h, wd, k), dtype=spec.dtype)
    rows = _row_block(spec, c + k)
    with serial_blas():
        _parallel.run(_im2col.rows_times,
                      (x.reshape(m, c), w.reshape(c, k), b, out.reshape(m, k), False, rows),
                      _cdiv(m, rows), _parallel.conv_work_ns(spec))
    return out


def _backward_nhwc(g, x, w, spec, need_input, need_weight, need_bias):
    n, c, h, wd = spec.x_shape
    k, m = spec.w_shape[0], n * h * wd
    dx = dw = db = None
    g2, w2 = g.reshape(m, k), w.reshape(c, k)
    with serial_blas():
        if need_weight:
            t = _parallel.count
            n_slabs = min(N_SLABS if t <= N_SLABS else t, max(1, _cdiv(m, MIN_TILE_COLS)))
            slabs = np.empty((n_slabs, c, k), dtype=spec.dtype)
            _parallel.run(_im2col.rows_gram,
                          (x.reshape(m, c), g2, slabs, _im2col.BLAS_SIZE_LIMIT), n_slabs,
                          _parallel.conv_work_ns(spec))
            dw = np.add.reduce(slabs, axis=0).reshape(1, 1, c, k)  # HWIO
        if need_input:
            dx = np.empty((n, h, wd, c), dtype=spec.dtype)
            rows = _row_block(spec, c + k)
            _parallel.run(_im2col.rows_times, (g2, w2, None, dx.reshape(m, c), True, rows),
                          _cdiv(m, rows), _parallel.conv_work_ns(spec))
    if need_bias:
        db = _reduce.channel_sums(g, channels_last=True)
    return dx, dw, db


def _forward_channels_last_out(x, w, b, spec):
    """A channels-last forward of one group: x transposed to NCHW for the unfold (a view for
    one channel), each tile's GEMM storing its pixels' K channels straight into the NHWC
    output (no transpose of the output, K channels wide)."""
    from . import layout

    p = plan(spec)
    n, k = spec.x_shape[0], spec.w_shape[0]
    oh, ow = spec.out_hw
    out = np.empty((n, oh, ow, k), dtype=spec.dtype)
    w2 = np.ascontiguousarray(w.transpose(3, 2, 0, 1)).reshape(k, -1)  # HWIO -> OIHW rows
    args = (layout.to_nchw(x), w2, b, out, geometry(spec), p["tile_rows"])
    with serial_blas():
        _parallel.run(_im2col.conv_forward_channels_last, args,
                      _cdiv(n * oh, p["tile_rows"]), _parallel.conv_work_ns(spec))
    return out


def conv2d_forward(x, w, b, spec):
    """conv2d by im2col + GEMM on tiles (see the module docstring)."""
    if spec.layout == "NHWC":
        if _pointwise_nhwc(spec):
            return _forward_nhwc(x, w, b, spec)
        if spec.groups == 1:
            return _forward_channels_last_out(x, w, b, spec)
        return _through_nchw("conv2d")(x, w, b, spec)
    p = plan(spec)
    k = spec.w_shape[0]
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    n_tiles = _cdiv(spec.x_shape[0] * spec.out_hw[0], p["tile_rows"])
    args = (x, w.reshape(k, -1), b, out, geometry(spec), p["tile_rows"], p["direct"])
    with serial_blas():
        _parallel.run(_im2col.conv_forward, args, n_tiles, _parallel.conv_work_ns(spec))
    return out


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    """Gradients by GEMMs on tiles (see the module docstring)."""
    if spec.layout == "NHWC":
        if _pointwise_nhwc(spec):
            return _backward_nhwc(g, x, w, spec, need_input, need_weight, need_bias)
        return _through_nchw("conv2d_backward")(g, x, w, spec, need_input, need_weight,
                                                need_bias)
    p = plan(spec)
    k = spec.w_shape[0]
    dx = dw = db = None
    geo = geometry(spec)
    if need_weight:
        slabs = np.empty((p["n_slabs"], k, w[0].size), dtype=spec.dtype)
        with serial_blas():
            _parallel.run(_im2col.conv_backward_weight,
                          (g, x, slabs, geo, p["tile_rows"], p["direct"]), p["n_slabs"],
                          _parallel.conv_work_ns(spec))
        dw = np.add.reduce(slabs, axis=0).reshape(spec.w_shape)  # in slab order
    if need_input:
        dx = np.empty(spec.x_shape, dtype=spec.dtype)
        n, cg = spec.x_shape[0], spec.w_shape[1]
        units = _cdiv(n, p["img_block"]) * spec.groups * _cdiv(cg, p["chan_block"])
        with serial_blas():
            _parallel.run(_im2col.conv_backward_input,
                          (g, w.reshape(k, -1), dx, geo, p["chan_block"], p["img_block"]),
                          units, _parallel.conv_work_ns(spec))
    if need_bias:
        db = _reduce.channel_sums(g)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# max-pool


def max_pool2d_forward(x, spec, return_indices):
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    idx = np.empty(spec.out_shape, dtype=np.int64) if return_indices else None
    planes = spec.x_shape[0] * spec.x_shape[1]
    _parallel.run(_pool.max_pool_forward, (x, out, idx, geometry(spec, spec.kernel)), planes,
                 _parallel.pool_work_ns(spec))
    return out, idx


def max_pool2d_backward(g, idx, spec):
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    planes = spec.x_shape[0] * spec.x_shape[1]
    _parallel.run(_pool.max_pool_backward, (g, idx, dx), planes,
                  _parallel.pool_work_ns(spec, backward=True))
    return dx


# ---------------------------------------------------------------------------------------------
# average pools


def avg_pool2d_forward(x, spec):
    t = box_windows(spec)
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    _parallel.run(_pool.box_forward, (x, out, t.rows, t.cols),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return out


def avg_pool2d_backward(g, spec):
    t = box_windows(spec)
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    _parallel.run(_pool.box_backward, (g, dx, t.rows, t.cols),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return dx
