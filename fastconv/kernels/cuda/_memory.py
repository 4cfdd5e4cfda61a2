"""Device arrays for the CUDA methods, and the moves between host and device.

Results, copies and scratch arrays come from a pool of recycled blocks (the bookkeeping is
``_devpool``): ``_empty`` builds an array the way Numba builds its own, from two of Numba's
internals, with a finalizer that hands the block back instead of freeing it. Where the pool is
off (the simulator, ``FASTCONV_CUDA_POOL_MB=0``, per-thread default streams, a Numba without
those internals) arrays are plain ``cuda.device_array``.
"""

from __future__ import annotations

import itertools
import math
import os
import threading

import numpy as np

from . import _devpool
from ._common import _cuda, _elementwise, _launch_flat, _sim

cuda = None  # numba.cuda, bound by _cuda(globals()) on first use


class _Io:
    """Moves a call's arrays to the device and its results back, as the inputs were given."""

    def __init__(self, spec):
        self.on_device = spec.on_device
        self.dtype = np.dtype(spec.dtype)
        _cuda(globals())

    def inputs(self, *arrays):
        return tuple(None if a is None else self._to_device(a) for a in arrays)

    def _to_device(self, a):
        if not self.on_device:  # C-contiguous already; size-1 axes may carry odd strides
            d = _empty(a.shape, a.dtype)
            d.copy_to_device(a if _canonical(a) else a.copy(order="C"))
            return d
        if getattr(a, "__cuda_ndarray__", False):  # a Numba device array (or the simulator's)
            d = a
        else:  # CuPy, PyTorch, ...: a Numba view of the same memory
            d = cuda.as_cuda_array(a)
        return d if _canonical(d) else _contiguous_copy(d)

    def output(self, d):
        return d if self.on_device else d.copy_to_host()

    def empty(self, shape, dtype=None):
        return _empty(shape, self.dtype if dtype is None else dtype)


def _c_strides(shape, itemsize):
    """The strides of a fresh C-contiguous array."""
    strides, step = [], itemsize
    for dim in reversed(tuple(shape)):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _canonical(a):
    """C-contiguous with the strides of a fresh array (what device-array reshapes need)."""
    return tuple(a.strides) == _c_strides(a.shape, np.dtype(a.dtype).itemsize)


def _contiguous_copy(d):
    """A C-contiguous copy, made on the device, of a strided device array."""
    out = _empty(d.shape, d.dtype)
    if d.ndim == 1:
        _launch_flat(_elementwise().copy1, d.shape[0], d, out)
    elif d.ndim == 4:
        _launch_flat(_elementwise().copy4, int(np.prod(d.shape)), d, out)
    else:  # pragma: no cover - the validators only pass 1-D and 4-D arrays
        raise ValueError(f"unexpected {d.ndim}-D device array")
    return out


_pool = None  # a _devpool.BlockPool once the first array is made; False when not used
_pool_off_reason = ""
_live: dict = {}  # token -> the pointer of a pooled array, alive until its last view is gone
_tokens = itertools.count()


def _get_pool():
    global _pool, _pool_off_reason
    if _pool is None:
        limit = _devpool.limit_from_env()
        if _sim():
            _pool, _pool_off_reason = False, "the CUDA simulator"
        elif limit == 0:
            _pool, _pool_off_reason = False, "FASTCONV_CUDA_POOL_MB=0"
        elif _per_thread_default_streams():
            # each thread's default stream would order only that thread's kernels: a block
            # freed in one thread could be written by another while still being read
            _pool, _pool_off_reason = False, "per-thread default streams"
        else:
            _pool = _devpool.BlockPool(limit)
    return _pool


def _per_thread_default_streams():
    from numba import config

    env = os.environ.get("NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM", "0").strip()
    return bool(getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", 0)) or env not in ("", "0")


def _context_key(ctx):
    h = ctx.handle
    return getattr(h, "value", None) or int(h)


def _allocate(ctx, pool, size):
    """A fresh block; when the device is full, the pool's idle blocks are freed first."""
    try:
        return ctx.memalloc(size)
    except Exception:  # out of memory (CudaAPIError): Numba retries after its pending frees
        if not pool.idle:
            raise
        pool.clear()
        return ctx.memalloc(size)


def _empty(shape, dtype):
    """``cuda.device_array(shape, dtype)``, its memory from the pool (see ``_devpool``): an
    array built the way Numba builds its own, with a finalizer that hands the block back
    instead of freeing it."""
    global _pool, _pool_off_reason
    dtype = np.dtype(dtype)
    shape = tuple(int(v) for v in shape) if isinstance(shape, tuple) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    pool = _get_pool()
    if not pool or nbytes == 0:
        return cuda.device_array(shape, dtype=dtype)
    try:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.cudadrv.driver import AutoFreePointer
    except ImportError as e:  # a Numba without these internals: allocate plainly
        _pool, _pool_off_reason = False, f"Numba's internals differ ({e})"
        return cuda.device_array(shape, dtype=dtype)
    size = _devpool.rounded(nbytes)
    ctx = cuda.current_context()
    key = _context_key(ctx)
    block = pool.take(key, size)
    try:
        pointer = block.device_pointer if block is not None else None
    except ReferenceError:  # its context was closed meanwhile
        pointer = None
    if pointer is None:
        block = _allocate(ctx, pool, size)
        pointer = block.device_pointer
    token = next(_tokens)

    def release():
        _live.pop(token, None)
        pool.give(key, size, block)

    # the array's own size, not the block's: Numba copies that many bytes to and from it
    mem = AutoFreePointer(ctx, pointer, nbytes, finalizer=release)
    _live[token] = mem  # as Numba's context keeps its allocations: refcounts decide the end
    return DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype, gpu_data=mem.own())


def empty_cache():
    """Free the idle blocks of the CUDA methods' memory pool (arrays in use stay)."""
    if _pool:
        _pool.clear()


_local = threading.local()


def _workspace(name, shape, dtype):
    """A scratch device array, reused between calls of one Python thread (never returned)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    size = int(np.prod(shape))
    buf = cache.get(name)
    if buf is None or buf.dtype != np.dtype(dtype) or buf.shape[0] < size:
        cache[name] = buf = _empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


def _dummy(dtype):
    """A stand-in for an absent bias (kernels take arrays, not None)."""
    return _empty(1, dtype)
