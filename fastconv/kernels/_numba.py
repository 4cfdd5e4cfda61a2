"""The few Numba helpers that the CPU kernel modules share (direct.py, direct_nhwc.py,
pool.py, _reduce.py, layout.py).

Numba's on-disk cache keys a compiled function on its own source file only: code compiled into
it from another module is not tracked, so an edit here leaves the cached kernels of those
modules as they were (STYLE.md, "Kernel modules"). That is why everything else stays in the
module that uses it, and why only these small, settled helpers live here. After changing one,
clear the caches: delete the ``*.nbi`` / ``*.nbc`` files under ``fastconv/kernels/__pycache__``
(or wherever `fastconv.kernels.numba_cache_location` says), or touch the kernel modules.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types, uint64
from numba.extending import intrinsic, register_jitable

from . import NUMBA_CACHE

__all__ = ["cdiv", "claim", "wide", "sum_flat"]


@register_jitable
def cdiv(a, b):
    """``ceil(a / b)`` for integers, ``b > 0``; plain Python, and callable from jitted code."""
    return -(-a // b)


@intrinsic
def wide(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers where the CPU has them.

    On AVX-512 machines LLVM's cost model defaults to 256-bit vectors for auto-vectorized loops
    ("prefer-vector-width"); the convolution loops are FMA-bound, and zmm registers do about
    1.3x the work there. The attribute is a tuning hint and harmless elsewhere; if llvmlite ever
    refuses it, it is skipped and the kernels stay correct with 256-bit vectors.
    """

    def codegen(context, builder, sig, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # pragma: no cover - a future llvmlite
            pass
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def claim(typingctx, counter):
    """The next work item of a call: ``counter[0]``, then advanced by one, atomically (the
    threads running the call share it; see fastconv.kernels._parallel)."""
    sig = types.int64(counter)

    def codegen(context, builder, sig, args):
        ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", ptr, one, "monotonic")

    return sig, codegen


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"reassoc", "contract"})
def sum_flat(src, base, n):
    """sum(src[base:base + n]) in float64, by blocks of 1024 summed in src's dtype: float32
    vectors hold twice the lanes and need no conversion per element (global pooling of
    8x64x28x28, cache-resident, 1.4x faster), while each lane of a block adds only a few
    dozen values (errors of a few float32 ulps, as a float64 sum rounded to float32). The
    order is fixed by the compiled code, so sums are deterministic."""
    wide()
    b, m = uint64(base), uint64(n)
    total = 0.0
    t0 = uint64(0)
    while t0 < m:
        t1 = min(t0 + uint64(1024), m)
        part = np.float32(0.0)  # float64 when src is: Numba unifies the two
        for t in range(t0, t1):
            part += src[b + t]
        total += part
        t0 = t1
    return total
