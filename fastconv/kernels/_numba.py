"""The few Numba helpers that the CPU kernel modules share (direct.py, pool.py).

Numba's on-disk cache keys a compiled function on its own source file only: code compiled into
it from another module is not tracked, so an edit here leaves the cached kernels of direct.py
and pool.py as they were (STYLE.md, "Kernel modules"). That is why everything else stays in the
module that uses it, and why only these small, settled helpers live here. After changing one,
clear the caches: delete the ``*.nbi`` / ``*.nbc`` files under ``fastconv/kernels/__pycache__``
(or wherever `fastconv.kernels.numba_cache_location` says), or touch the kernel modules.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic, register_jitable

__all__ = ["cdiv", "claim", "wide"]


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
