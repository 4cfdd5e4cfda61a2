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
from numba.extending import intrinsic, register_jitable

__all__ = ["VECTOR_BYTES", "lanes", "tile4", "tile4t"]

VECTOR_BYTES = 64  # one accumulator vector


@register_jitable
def lanes(a):
    """Elements of ``a``'s dtype in one accumulator vector (``a``: an array, in jitted code or
    not, or a NumPy dtype)."""
    return VECTOR_BYTES // a.itemsize


def _tile_codegen(context, builder, lanes, elem_ty, scalar_at, vector_at, lo, hi, out_p, qs):
    """The loop both tiles share: for r in [lo, hi), acc_u += splat(*scalar_at(r, u)) *
    load(vector_at(r)); then out[q_u : q_u + lanes] += acc_u. ``scalar_at`` and ``vector_at``
    emit the element pointers."""
    intp = context.get_value_type(types.intp)
    vty = ir.VectorType(elem_ty, lanes)
    size = context.get_abi_sizeof(elem_ty)
    zeros = ir.Constant(vty, [ir.Constant(elem_ty, 0.0)] * lanes)
    splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    suffix = f"v{lanes}f{VECTOR_BYTES * 8 // lanes}"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.{suffix}")
    accs = [cgutils.alloca_once_value(builder, zeros) for _ in range(4)]
    with cgutils.for_range_slice(builder, lo, hi, ir.Constant(intp, 1), intp=intp) as (r, _):
        vv = builder.load(builder.bitcast(vector_at(r), vty.as_pointer()), align=size)
        for u, acc in enumerate(accs):
            a = builder.load(scalar_at(r, u))
            av = builder.insert_element(ir.Constant(vty, ir.Undefined), a,
                                        ir.Constant(ir.IntType(32), 0))
            av = builder.shuffle_vector(av, ir.Constant(vty, ir.Undefined), splat_mask)
            builder.store(builder.call(fma, [av, vv, builder.load(acc)]), acc)
    for q, acc in zip(qs, accs):
        op = builder.bitcast(builder.gep(out_p, [q]), vty.as_pointer())
        builder.store(builder.fadd(builder.load(op, align=size), builder.load(acc)), op,
                      align=size)


def _float_arrays(*arrays):
    return (all(isinstance(a, types.Array) for a in arrays)
            and len({a.dtype for a in arrays}) == 1
            and arrays[0].dtype in (types.float32, types.float64))


class _Args:
    """An intrinsic's arguments in its codegen: integers as intp, arrays' data pointers, and an
    entry of an index table."""

    def __init__(self, context, builder, sig, args):
        self.context, self.builder, self.types, self.args = context, builder, sig.args, args

    def index(self, i):
        return self.context.cast(self.builder, self.args[i], self.types[i], types.intp)

    def data(self, i):
        return self.context.make_array(self.types[i])(self.context, self.builder,
                                                      self.args[i]).data

    def entry(self, i, r):
        value = self.builder.load(self.builder.gep(self.data(i), [r]))
        return self.context.cast(self.builder, value, self.types[i].dtype, types.intp)


@intrinsic
def tile4(typingctx, src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3):
    """For pixels u = 0..3 and lanes l < lanes(src):
    ``out[q_u + l] += sum over r in [r0, r1) of src[t_u + off[r]] * w[wb + r*wstride + l]``
    (channels-last: a vector of output channels per pixel).

    The four accumulators live in vector registers for the whole reduction; every index must
    be in range (the callers' geometry guarantees it: nothing is checked here).
    """
    if not _float_arrays(src, w, out):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        src_p, w_p = a.data(0), a.data(8)
        ts = [a.index(i) for i in (1, 2, 3, 4)]
        wb, ws = a.index(9), a.index(10)

        def scalar_at(r, u):
            return builder.gep(src_p, [builder.add(ts[u], a.entry(5, r))])

        def vector_at(r):
            return builder.gep(w_p, [builder.add(wb, builder.mul(r, ws))])

        _tile_codegen(context, builder, n_lanes, src_p.type.pointee, scalar_at, vector_at,
                      a.index(6), a.index(7), a.data(11), [a.index(i) for i in (12, 13, 14, 15)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile4t(typingctx, w, s0, s1, s2, s3, sstride, src, vb, off, r0, r1, out, q0, q1, q2, q3):
    """For output channels u = 0..3 and lanes l < lanes(src):
    ``out[q_u + l] += sum over r in [r0, r1) of w[s_u + r*sstride] * src[vb + off[r] + l]``
    (NCHW: a vector of pixels per output channel), held in registers as `tile4`."""
    if not _float_arrays(w, src, out):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(w, s0, s1, s2, s3, sstride, src, vb, off, r0, r1, out, q0, q1, q2, q3)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        w_p, src_p = a.data(0), a.data(6)
        ss = [a.index(i) for i in (1, 2, 3, 4)]
        st, vb = a.index(5), a.index(7)

        def scalar_at(r, u):
            return builder.gep(w_p, [builder.add(ss[u], builder.mul(r, st))])

        def vector_at(r):
            return builder.gep(src_p, [builder.add(vb, a.entry(8, r))])

        _tile_codegen(context, builder, n_lanes, src_p.type.pointee, scalar_at, vector_at,
                      a.index(9), a.index(10), a.data(11), [a.index(i) for i in (12, 13, 14, 15)])
        return context.get_dummy_value()

    return sig, codegen
