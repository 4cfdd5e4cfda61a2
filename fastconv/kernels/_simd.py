"""Register-resident micro-kernels, written as LLVM IR through Numba intrinsics.

Numba's loops keep an accumulator in memory when LLVM cannot prove it does not alias the
arrays the loop reads, and a vectorized loop over a short channel count reloads and stores
its outputs at every step. These kernels instead hold a tile of accumulators in vector
registers across a whole reduction and store it once, as oneDNN's and LIBXSMM's micro-kernels
do. The vectors are generic LLVM vectors (``<16 x float>``, ``<8 x double>``): LLVM lowers
them to the registers of the CPU Numba compiles for, at run time (one zmm with AVX-512, two
ymm with AVX2, four xmm with SSE2), so the same code is correct and fast on every x86-64 CPU
and on others; Numba's on-disk cache is keyed by the CPU, so a cache written on an AVX-512
machine is never loaded on an AVX2 one.

The same caching caveat as fastconv.kernels._numba applies: an edit here does not invalidate
the cached kernels of the modules that use it; clear their caches after changing it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["LANES", "tile4"]

#: Lanes of one accumulator vector: 64 bytes of the dtype.
LANES = {"float32": 16, "float64": 8}


@intrinsic
def tile4(typingctx, src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3):
    """For pixels u = 0..3 and lanes l < LANES[dtype]:
    ``out[q_u + l] += sum over r in [r0, r1) of src[t_u + off[r]] * w[wb + r*wstride + l]``.

    The four accumulators live in vector registers for the whole reduction; every index must
    be in range (the callers' geometry guarantees it: nothing is checked here).
    """
    if not (isinstance(src, types.Array) and isinstance(w, types.Array)
            and isinstance(out, types.Array) and src.dtype == w.dtype == out.dtype
            and src.dtype in (types.float32, types.float64)):
        return None
    lanes = 16 if src.dtype == types.float32 else 8
    sig = types.none(src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3)

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        (a_src, a_t0, a_t1, a_t2, a_t3, a_off, a_r0, a_r1, a_w, a_wb, a_ws, a_out,
         a_q0, a_q1, a_q2, a_q3) = args
        ty = sig.args

        def index(i):
            return context.cast(builder, args[i], ty[i], types.intp)

        def data(i):
            return context.make_array(ty[i])(context, builder, args[i]).data

        src_p, off_p, w_p, out_p = data(0), data(5), data(8), data(11)
        ts = [index(i) for i in (1, 2, 3, 4)]
        qs = [index(i) for i in (12, 13, 14, 15)]
        lo, hi, wb, ws = index(6), index(7), index(9), index(10)
        elem = src_p.type.pointee
        vty = ir.VectorType(elem, lanes)
        size = context.get_abi_sizeof(elem)
        zeros = ir.Constant(vty, [ir.Constant(elem, 0.0)] * lanes)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        suffix = f"v{lanes}f{32 if lanes == 16 else 64}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.{suffix}")
        accs = [cgutils.alloca_once_value(builder, zeros) for _ in range(4)]
        with cgutils.for_range_slice(builder, lo, hi, ir.Constant(intp, 1), intp=intp) as (r, _):
            f = context.cast(builder, builder.load(builder.gep(off_p, [r])), ty[5].dtype,
                             types.intp)
            wp = builder.gep(w_p, [builder.add(wb, builder.mul(r, ws))])
            wv = builder.load(builder.bitcast(wp, vty.as_pointer()), align=size)
            for t, acc in zip(ts, accs):
                a = builder.load(builder.gep(src_p, [builder.add(t, f)]))
                av = builder.insert_element(ir.Constant(vty, ir.Undefined), a,
                                            ir.Constant(ir.IntType(32), 0))
                av = builder.shuffle_vector(av, ir.Constant(vty, ir.Undefined), splat_mask)
                builder.store(builder.call(fma, [av, wv, builder.load(acc)]), acc)
        for q, acc in zip(qs, accs):
            op = builder.bitcast(builder.gep(out_p, [q]), vty.as_pointer())
            builder.store(builder.fadd(builder.load(op, align=size), builder.load(acc)), op,
                          align=size)
        return context.get_dummy_value()

    return sig, codegen
