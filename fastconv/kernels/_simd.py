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

`max_block` is the max-pool's counterpart: eight windows' maxima and their positions, by
vector compares and selects, where a scalar loop would branch.

The same caching caveat as fastconv.kernels._numba applies: an edit here does not invalidate
the cached kernels of the modules that use it; clear their caches after changing it.
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

__all__ = ["VECTOR_BYTES", "TILE_VECTORS", "POOL_LANES", "lanes", "tile4", "tile4t", "tile1t",
           "dot_taps", "tile_dw", "dot_dw", "max_block", "unpool_block", "transpose_block",
           "prefetch_write"]

VECTOR_BYTES = 64  # one accumulator vector


def _tile_vectors():
    """Vectors of positions per 4-channel register tile for the CPU Numba compiles for: 16
    accumulators where there are 32 vector registers of VECTOR_BYTES (AVX-512), one elsewhere
    (with AVX2 one accumulator vector is already two of its 16 registers). Read at import,
    from what Numba targets (NUMBA_CPU_FEATURES if set), so it matches the compiled code; the
    on-disk cache is keyed by the same CPU."""
    from numba.core import config
    from llvmlite import binding

    features = config.CPU_FEATURES
    if features is None:
        if config.CPU_NAME not in (None, "host"):
            return 1  # a named target (e.g. 'generic' for portable caches): assume the least
        return 4 if binding.get_host_cpu_features().get("avx512f") else 1
    return 4 if "+avx512f" in features.split(",") else 1


TILE_VECTORS = _tile_vectors()


@register_jitable
def lanes(a):
    """Elements of ``a``'s dtype in one accumulator vector (``a``: an array, in jitted code or
    not, or a NumPy dtype)."""
    return VECTOR_BYTES // a.itemsize


def _splat(builder, value, lanes):
    """A vector of ``lanes`` copies of the scalar ``value``."""
    vty = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _tile_codegen(context, builder, lanes, elem_ty, scalar_at, vector_at, lo, hi, out_p, qs,
                  nvec):
    """The loop both tiles share: for r in [lo, hi), acc_uv += splat(*scalar_at(r, u)) *
    load(vector_at(r) + v*lanes) for v < nvec; then out[q_u + v*lanes :][:lanes] += acc_uv.
    ``scalar_at`` and ``vector_at`` emit the element pointers."""
    intp = context.get_value_type(types.intp)
    vty = ir.VectorType(elem_ty, lanes)
    size = context.get_abi_sizeof(elem_ty)
    zeros = ir.Constant(vty, [ir.Constant(elem_ty, 0.0)] * lanes)
    suffix = f"v{lanes}f{VECTOR_BYTES * 8 // lanes}"
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.{suffix}")
    accs = [[cgutils.alloca_once_value(builder, zeros) for _ in range(nvec)] for _ in qs]
    with cgutils.for_range_slice(builder, lo, hi, ir.Constant(intp, 1), intp=intp) as (r, _):
        base = vector_at(r)
        vvs = [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(intp, v * lanes)]),
                                            vty.as_pointer()), align=size)
               for v in range(nvec)]
        for u, row in enumerate(accs):
            av = _splat(builder, builder.load(scalar_at(r, u)), lanes)
            for vv, acc in zip(vvs, row):
                builder.store(builder.call(fma, [av, vv, builder.load(acc)]), acc)
    for q, row in zip(qs, accs):
        for v, acc in enumerate(row):
            at = builder.add(q, ir.Constant(intp, v * lanes))
            op = builder.bitcast(builder.gep(out_p, [at]), vty.as_pointer())
            builder.store(builder.fadd(builder.load(op, align=size), builder.load(acc)), op,
                          align=size)


def _vectors(context, builder, elem, n_lanes):
    """What the codegen of the loop-over-vectors intrinsics (tile_dw, dot_dw, dot_taps) shares:
    the vector type, the element size, a zero vector, ``llvm.fma`` on it, and ``load(base,
    at)``: the vector at element ``at`` of the pointer ``base`` (unaligned)."""
    vty = ir.VectorType(elem, n_lanes)
    size = context.get_abi_sizeof(elem)
    zeros = ir.Constant(vty, [ir.Constant(elem, 0.0)] * n_lanes)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.v{n_lanes}f{VECTOR_BYTES * 8 // n_lanes}")

    def load(base, at):
        ptr = builder.bitcast(builder.gep(base, [at]), vty.as_pointer())
        return builder.load(ptr, align=size)

    return vty, size, zeros, fma, load


def _float_arrays(*arrays):
    return (all(isinstance(a, types.Array) for a in arrays)
            and len({a.dtype for a in arrays}) == 1
            and arrays[0].dtype in (types.float32, types.float64))


def _literal(t, values):
    return isinstance(t, types.Literal) and t.literal_value in values


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
def tile4(typingctx, src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3,
          nvec):
    """For pixels u = 0..3 and l < nvec * lanes(src):
    ``out[q_u + l] += sum over r in [r0, r1) of src[t_u + off[r]] * w[wb + r*wstride + l]``
    (channels-last: ``nvec`` vectors of output channels per pixel, a literal 1..4).

    The 4 x nvec accumulators live in vector registers for the whole reduction; every index
    must be in range (the callers' geometry guarantees it: nothing is checked here).
    """
    if not (_float_arrays(src, w, out) and _literal(nvec, (1, 2, 3, 4))):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3, nvec)

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
                      a.index(6), a.index(7), a.data(11), [a.index(i) for i in (12, 13, 14, 15)],
                      nvec.literal_value)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile4t(typingctx, w, s0, s1, s2, s3, sstride, src, vb, off, r0, r1, out, q0, q1, q2, q3,
           nvec):
    """For output channels u = 0..3 and l < nvec * lanes(src):
    ``out[q_u + l] += sum over r in [r0, r1) of w[s_u + r*sstride] * src[vb + off[r] + l]``
    (NCHW: ``nvec`` vectors of pixels per output channel, a literal 1..4), held in registers
    as `tile4`: each loaded weight feeds ``nvec`` FMAs and each loaded vector 4."""
    if not (_float_arrays(w, src, out) and _literal(nvec, (1, 2, 3, 4))):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(w, s0, s1, s2, s3, sstride, src, vb, off, r0, r1, out, q0, q1, q2, q3, nvec)

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
                      a.index(9), a.index(10), a.data(11), [a.index(i) for i in (12, 13, 14, 15)],
                      nvec.literal_value)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile1t(typingctx, w, s0, sstride, src, vb, off, r0, r1, out, q0, nvec):
    """`tile4t` for one output channel: ``out[q0 + l] += sum over r in [r0, r1) of
    w[s0 + r*sstride] * src[vb + off[r] + l]`` for l < nvec * lanes(src), ``nvec`` a literal
    1..8. A single channel has no other rows to share its loads, so it takes more vectors of
    pixels instead (a grad-input of one input channel reduces over every output channel x tap
    in one register pass, where the 9-tap micro-kernel re-reads its accumulators per chunk)."""
    if not (_float_arrays(w, src, out) and _literal(nvec, tuple(range(1, 9)))):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(w, s0, sstride, src, vb, off, r0, r1, out, q0, nvec)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        w_p, src_p = a.data(0), a.data(3)
        s0, st, vb = a.index(1), a.index(2), a.index(4)

        def scalar_at(r, u):
            return builder.gep(w_p, [builder.add(s0, builder.mul(r, st))])

        def vector_at(r):
            return builder.gep(src_p, [builder.add(vb, a.entry(5, r))])

        _tile_codegen(context, builder, n_lanes, src_p.type.pointee, scalar_at, vector_at,
                      a.index(6), a.index(7), a.data(8), [a.index(9)], nvec.literal_value)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_dw(typingctx, src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3,
            nvec):
    """Depthwise, channels-last: for pixels u = 0..3 and l < nvec * lanes(src),
    ``out[q_u + l] += sum over r in [r0, r1) of src[t_u + off[r] + l] * w[wb + r*wstride + l]``
    (each channel its own filter: vectors times vectors, where `tile4` broadcasts a scalar).
    The 4 x nvec accumulators stay in registers over the taps, so a tap costs 4 + 1 loads per
    4 FMAs of a vector instead of loading and storing the outputs; ``nvec`` is a literal 1..4
    and no index is checked here."""
    if not (_float_arrays(src, w, out) and _literal(nvec, (1, 2, 3, 4))):
        return None
    n_lanes = VECTOR_BYTES * 8 // src.dtype.bitwidth
    n_v = nvec.literal_value
    sig = types.none(src, t0, t1, t2, t3, off, r0, r1, w, wb, wstride, out, q0, q1, q2, q3, nvec)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        intp = context.get_value_type(types.intp)
        src_p, w_p, out_p = a.data(0), a.data(8), a.data(11)
        vty, size, zeros, fma, load = _vectors(context, builder, src_p.type.pointee, n_lanes)
        ts = [a.index(i) for i in (1, 2, 3, 4)]
        qs = [a.index(i) for i in (12, 13, 14, 15)]
        wb_, ws = a.index(9), a.index(10)
        accs = [[cgutils.alloca_once_value(builder, zeros) for _ in range(n_v)] for _ in ts]
        with cgutils.for_range_slice(builder, a.index(6), a.index(7), ir.Constant(intp, 1),
                                     intp=intp) as (r, _):
            o = a.entry(5, r)
            wr = builder.add(wb_, builder.mul(r, ws))
            for v in range(n_v):
                lane0 = ir.Constant(intp, v * n_lanes)
                wv = load(w_p, builder.add(wr, lane0))
                for u, t in enumerate(ts):
                    sv = load(src_p, builder.add(builder.add(t, o), lane0))
                    builder.store(builder.call(fma, [sv, wv, builder.load(accs[u][v])]),
                                  accs[u][v])
        for q, row in zip(qs, accs):
            for v, acc in enumerate(row):
                op = builder.bitcast(builder.gep(out_p, [builder.add(q, ir.Constant(
                    intp, v * n_lanes))]), vty.as_pointer())
                builder.store(builder.fadd(builder.load(op, align=size), builder.load(acc)), op,
                              align=size)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_dw(typingctx, x, xs, xstep, off, r0, g, gs, gstep, n, out, o0, ostride, ntaps, nvec):
    """Depthwise grad-weight, channels-last: for taps j < ntaps and lanes l < nvec * lanes(x),
    ``out[o0 + j*ostride + l] = sum over p < n of x[xs + p*xstep + off[r0 + j] + l] *
    g[gs + p*gstep + l]`` (stored, not added). The ntaps x nvec accumulators stay in registers
    over the n pixels, where a loop per pixel loaded and stored each of them; ``ntaps`` (1..9)
    and ``nvec`` (1..3) are literals and no index is checked here."""
    if not (_float_arrays(x, g, out) and _literal(ntaps, range(1, 10))
            and _literal(nvec, (1, 2, 3))):
        return None
    n_lanes = VECTOR_BYTES * 8 // x.dtype.bitwidth
    n_t, n_v = ntaps.literal_value, nvec.literal_value
    sig = types.none(x, xs, xstep, off, r0, g, gs, gstep, n, out, o0, ostride, ntaps, nvec)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        intp = context.get_value_type(types.intp)
        x_p, g_p, out_p = a.data(0), a.data(5), a.data(9)
        vty, size, zeros, fma, load = _vectors(context, builder, x_p.type.pointee, n_lanes)
        const = functools.partial(ir.Constant, intp)
        r0_ = a.index(4)
        offs = [a.entry(3, builder.add(r0_, const(j))) for j in range(n_t)]
        xs_, xst, gs_, gst = a.index(1), a.index(2), a.index(6), a.index(7)
        accs = [[cgutils.alloca_once_value(builder, zeros) for _ in range(n_v)]
                for _ in range(n_t)]
        with cgutils.for_range(builder, a.index(8), intp=intp) as loop:
            xb = builder.add(xs_, builder.mul(loop.index, xst))
            gb = builder.add(gs_, builder.mul(loop.index, gst))
            gv = [load(g_p, builder.add(gb, const(v * n_lanes))) for v in range(n_v)]
            for j in range(n_t):
                xj = builder.add(xb, offs[j])
                for v in range(n_v):
                    xv = load(x_p, builder.add(xj, const(v * n_lanes)))
                    builder.store(builder.call(fma, [xv, gv[v], builder.load(accs[j][v])]),
                                  accs[j][v])
        o0_, ost = a.index(10), a.index(11)
        for j in range(n_t):
            for v in range(n_v):
                at = builder.add(builder.add(o0_, builder.mul(ost, const(j))),
                                 const(v * n_lanes))
                op = builder.bitcast(builder.gep(out_p, [at]), vty.as_pointer())
                builder.store(builder.load(accs[j][v]), op, align=size)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_taps(typingctx, x, xstride, offs, g, gstride, g0, gplane, n_img, n, acc, ntaps, nk):
    """Correlation sums for grad-weight: for taps j < ntaps and channels r < nk,
    ``sum over l of acc[(j*nk + r)*L + l]`` gains (L = lanes(x))

        sum over images i < n_img and t < n of
            g[i*gstride + g0 + r*gplane + t] * x[i*xstride + offs[j] + t].

    x and g are C-contiguous arrays read flat. The ntaps x nk vector accumulators stay in
    registers over all images (a reduction of a few hundred positions per image would
    otherwise spend more on loading and storing them than on FMAs); each image's last partial
    vector is loaded ending at position n - 1 with the lanes already counted set to zero, so
    nothing outside [0, n) is read and n must be at least L. ``ntaps`` (1..9) and ``nk`` (1..3)
    are literals; no index is checked here.
    """
    if not (_float_arrays(x, g, acc) and x.layout == g.layout == "C"
            and _literal(ntaps, range(1, 10)) and _literal(nk, (1, 2, 3))):
        return None
    n_lanes = VECTOR_BYTES * 8 // x.dtype.bitwidth
    n_t, n_k = ntaps.literal_value, nk.literal_value
    sig = types.none(x, xstride, offs, g, gstride, g0, gplane, n_img, n, acc, ntaps, nk)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        intp = context.get_value_type(types.intp)
        x_p, g_p, acc_p = a.data(0), a.data(3), a.data(9)
        vty, size, zeros, fma, load = _vectors(context, builder, x_p.type.pointee, n_lanes)
        const = functools.partial(ir.Constant, intp)
        offs_v = [a.entry(2, const(j)) for j in range(n_t)]
        xs, gs, g0_, gp, n_ = a.index(1), a.index(4), a.index(5), a.index(6), a.index(8)
        accs = [[cgutils.alloca_once_value(builder, zeros) for _ in range(n_k)]
                for _ in range(n_t)]
        n_full = builder.udiv(n_, const(n_lanes))
        tail = builder.sub(n_, const(n_lanes))
        # lanes of the last vector not yet counted: l >= L - (n - L*n_full)
        done = builder.sub(const(n_lanes), builder.sub(n_, builder.mul(n_full, const(n_lanes))))
        lane_ids = ir.Constant(ir.VectorType(intp, n_lanes), list(range(n_lanes)))
        keep = builder.icmp_signed(">=", lane_ids, _splat(builder, done, n_lanes))

        def step(xb, gb, pos, mask):
            gv = [load(g_p, builder.add(builder.add(gb, builder.mul(gp, const(r))), pos))
                  for r in range(n_k)]
            if mask is not None:
                gv = [builder.select(mask, v, zeros) for v in gv]
            for j in range(n_t):
                xv = load(x_p, builder.add(builder.add(xb, offs_v[j]), pos))
                if mask is not None:
                    xv = builder.select(mask, xv, zeros)
                for r in range(n_k):
                    builder.store(builder.call(fma, [gv[r], xv, builder.load(accs[j][r])]),
                                  accs[j][r])

        with cgutils.for_range(builder, a.index(7), intp=intp) as img:
            xb = builder.mul(img.index, xs)
            gb = builder.add(builder.mul(img.index, gs), g0_)
            with cgutils.for_range(builder, n_full, intp=intp) as i:
                step(xb, gb, builder.mul(i.index, const(n_lanes)), None)
            partial = builder.icmp_signed("<", builder.mul(n_full, const(n_lanes)), n_)
            with builder.if_then(partial):
                step(xb, gb, tail, keep)
        for j in range(n_t):
            for r in range(n_k):
                op = builder.bitcast(builder.gep(acc_p, [const((j * n_k + r) * n_lanes)]),
                                     vty.as_pointer())
                builder.store(builder.fadd(builder.load(op, align=size),
                                           builder.load(accs[j][r])), op, align=size)
        return context.get_dummy_value()

    return sig, codegen


#: Windows per `max_block`: one ymm of float32, a ymm pair of float64 (rows of 8 to 24 windows
#: are common in pools; a wider block would leave more of them to the scalar path).
POOL_LANES = 8


@intrinsic
def max_block(typingctx, xf, pb, kp, rstep, of, af, o, size, step, with_idx):
    """`POOL_LANES` max-pool windows of size x size taps at once, stride ``step`` along a row:
    tap (p, q) of window l is ``xf[pb + kp + l*step + p*rstep + q]``. ``of[o + l]`` gets the
    window's maximum and, if ``with_idx``, ``af[o + l]`` (int64) its in-plane position ``kp +
    l*step + p*rstep + q``; ``kp + rstep*size`` must fit in 31 bits.

    The semantics of fastconv.kernels.pool: a tap replaces the running maximum when it is
    strictly greater or when it is the first NaN, so the first maximum wins ties. Vector
    compares and selects throughout: a scalar loop's selects are turned back into branches by
    the x86 backend, and those mispredict on about every other tap of random data. A stride-2
    tap is one load of 16 consecutive elements, of which the even or odd lanes are kept; the
    load starts at the tap (q = 0) or one before it, so it never reads past the last window's
    last tap. ``size``, ``step`` and ``with_idx`` are literals; no index is checked here.
    """
    if not (isinstance(xf, types.Array) and isinstance(of, types.Array)
            and xf.dtype == of.dtype and xf.dtype in (types.float32, types.float64)
            and isinstance(af, types.Array) and af.dtype == types.int64
            and _literal(size, (2, 3)) and _literal(step, (1, 2))
            and _literal(with_idx, (True, False))):
        return None
    n, k, st, idx = (POOL_LANES, size.literal_value, step.literal_value,
                     with_idx.literal_value)
    sig = types.none(xf, pb, kp, rstep, of, af, o, size, step, with_idx)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        x_p, o_p, a_p = a.data(0), a.data(4), a.data(5)
        elem = x_p.type.pointee
        esize = context.get_abi_sizeof(elem)
        i32 = ir.IntType(32)
        vty, ity = ir.VectorType(elem, n), ir.VectorType(i32, n)
        base = builder.add(a.index(1), a.index(2))
        kp32 = builder.trunc(a.index(2), i32)
        rs = a.index(3)
        lane_step = ir.Constant(ity, [st * lane for lane in range(n)])

        def tap(p, q):
            off = builder.add(base, builder.mul(rs, ir.Constant(rs.type, p)))
            if st == 1:
                ptr = builder.gep(x_p, [builder.add(off, ir.Constant(rs.type, q))])
                return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=esize)
            start, first = (q, 0) if q == 0 else (q - 1, 1)
            wty = ir.VectorType(elem, 2 * n)
            ptr = builder.gep(x_p, [builder.add(off, ir.Constant(rs.type, start))])
            wide_v = builder.load(builder.bitcast(ptr, wty.as_pointer()), align=esize)
            mask = ir.Constant(ir.VectorType(i32, n), [first + 2 * lane for lane in range(n)])
            return builder.shuffle_vector(wide_v, ir.Constant(wty, ir.Undefined), mask)

        best = tap(0, 0)
        first = builder.add(_splat(builder, kp32, n), lane_step)  # each window's first tap
        arg = first
        rs32 = builder.trunc(rs, i32)
        for p in range(k):
            for q in range(k):
                if p == 0 and q == 0:
                    continue
                v = tap(p, q)
                take = builder.or_(builder.fcmp_ordered(">", v, best),
                                   builder.and_(builder.fcmp_unordered("uno", v, v),
                                                builder.fcmp_ordered("ord", best, best)))
                best = builder.select(take, v, best)
                if idx:
                    shift = builder.add(builder.mul(rs32, ir.Constant(i32, p)),
                                        ir.Constant(i32, q))
                    cand = builder.add(first, _splat(builder, shift, n))
                    arg = builder.select(take, cand, arg)
        out = builder.gep(o_p, [a.index(6)])
        builder.store(best, builder.bitcast(out, vty.as_pointer()), align=esize)
        if idx:
            i64v = ir.VectorType(ir.IntType(64), n)
            dst = builder.bitcast(builder.gep(a_p, [a.index(6)]), i64v.as_pointer())
            builder.store(builder.sext(arg, i64v), dst, align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def unpool_block(typingctx, gf, af, o, df, d0, kp, rstep, size):
    """Max-pool backward for `POOL_LANES` windows that tile a row (size x size, stride size):
    the windows' gradients ``gf[o + l]`` go to their argmax positions ``af[o + l]`` (in-plane)
    and zeros to their other taps, writing tap (p, q) of window l at ``df[d0 + kp + l*size +
    p*rstep + q]`` exactly once; ``kp`` is the first window's in-plane start. Returns the
    lanes whose index lay in its own window, as bits (lane l: bit l); for a lane whose bit is
    clear the caller must scatter the gradient instead (an index may be any position in the
    plane).

    Write-once, with no read of ``df``: where windows do not overlap this replaces zeroing the
    plane and adding each gradient at its index. Vector compares and selects (bit-exact: the
    gradient's bits, NaN included, or +0.0); a pool row of taps is one contiguous store of the
    ``size`` tap vectors interleaved. ``size`` (2 or 3) is a literal. An index may hold any
    value (it is only compared, in 64 bits); the windows' taps and ``gf``/``af`` must be in
    range (nothing is checked here).
    """
    if not (isinstance(gf, types.Array) and isinstance(df, types.Array)
            and gf.dtype == df.dtype and gf.dtype in (types.float32, types.float64)
            and isinstance(af, types.Array) and af.dtype == types.int64
            and _literal(size, (2, 3))):
        return None
    n, k = POOL_LANES, size.literal_value
    sig = types.int64(gf, af, o, df, d0, kp, rstep, size)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        g_p, a_p, d_p = a.data(0), a.data(1), a.data(3)
        elem = g_p.type.pointee
        esize = context.get_abi_sizeof(elem)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(elem, n)
        o_i, kp = a.index(2), a.index(5)
        g = builder.load(builder.bitcast(builder.gep(g_p, [o_i]), vty.as_pointer()), align=esize)
        idx = builder.load(builder.bitcast(builder.gep(a_p, [o_i]), ir.VectorType(i64, n)
                                           .as_pointer()), align=8)
        kp_v = _splat(builder, builder.sext(kp, i64) if kp.type.width < 64 else kp, n)
        # positions relative to the block, in 64 bits: an index from anywhere (even outside
        # the plane) matches a tap only if it is that tap
        rel = builder.sub(idx, kp_v)
        lty = ir.VectorType(i64, n)
        rs64 = builder.sext(a.index(6), i64) if a.index(6).type.width < 64 else a.index(6)
        zeros = ir.Constant(vty, [ir.Constant(elem, 0.0)] * n)
        base = builder.add(a.index(4), kp)
        hit = ir.Constant(ir.VectorType(ir.IntType(1), n), [0] * n)
        for p in range(k):
            row_off = builder.mul(rs64, ir.Constant(i64, p))
            row_v = _splat(builder, row_off, n)
            taps = []
            for q in range(k):
                cand = builder.add(ir.Constant(lty, [k * lane + q for lane in range(n)]), row_v)
                eq = builder.icmp_signed("==", rel, cand)
                hit = builder.or_(hit, eq)
                taps.append(builder.select(eq, g, zeros))
            if k == 2:
                row = builder.shuffle_vector(taps[0], taps[1], ir.Constant(
                    ir.VectorType(i32, 2 * n), [q * n + lane for lane in range(n)
                                                for q in range(2)]))
            else:
                both = builder.shuffle_vector(taps[0], taps[1],
                                              ir.Constant(ir.VectorType(i32, 2 * n),
                                                          list(range(2 * n))))
                third = builder.shuffle_vector(taps[2], ir.Constant(vty, ir.Undefined),
                                               ir.Constant(ir.VectorType(i32, 2 * n),
                                                           list(range(n)) + [0] * n))
                row = builder.shuffle_vector(both, third, ir.Constant(
                    ir.VectorType(i32, 3 * n), [q * n + lane for lane in range(n)
                                                for q in range(3)]))
            dst = builder.gep(d_p, [builder.add(base, builder.mul(a.index(6), ir.Constant(
                base.type, p)))])
            builder.store(row, builder.bitcast(dst, row.type.as_pointer()), align=esize)
        return builder.zext(builder.bitcast(hit, ir.IntType(n)), i64)

    return sig, codegen


@intrinsic
def transpose_block(typingctx, src, s0, sstride, dst, d0, dstride):
    """``dst[d0 + q*dstride + p] = src[s0 + p*sstride + q]`` for p, q < L = lanes(src): one
    L x L block (16 x 16 float32, 8 x 8 float64) loaded as L rows, transposed in registers,
    stored as L rows. The shuffles swap the off-diagonal h x h blocks of every 2h x 2h block
    for h = L/2, ..., 1 (2 L log2(L) shuffles in all), where a scalar loop moves an element
    every few cycles. No index is checked here."""
    if not (_float_arrays(src, dst)):
        return None
    n = VECTOR_BYTES * 8 // src.dtype.bitwidth
    sig = types.none(src, s0, sstride, dst, d0, dstride)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        s_p, d_p = a.data(0), a.data(3)
        elem = s_p.type.pointee
        size = context.get_abi_sizeof(elem)
        vty = ir.VectorType(elem, n)
        intp = a.index(1).type
        s0_, ss, d0_, ds = a.index(1), a.index(2), a.index(4), a.index(5)

        def at(p, base, stride, row):
            off = builder.add(base, builder.mul(stride, ir.Constant(intp, row)))
            return builder.bitcast(builder.gep(p, [off]), vty.as_pointer())

        rows = [builder.load(at(s_p, s0_, ss, r), align=size) for r in range(n)]
        h = n // 2
        while h >= 1:
            low = [lane if lane & h == 0 else n + lane - h for lane in range(n)]
            high = [lane + h if lane & h == 0 else n + lane for lane in range(n)]
            for i in range(n):
                if i & h:
                    continue
                j = i + h
                ri, rj = rows[i], rows[j]
                mask = ir.VectorType(ir.IntType(32), n)
                rows[i] = builder.shuffle_vector(ri, rj, ir.Constant(mask, low))
                rows[j] = builder.shuffle_vector(ri, rj, ir.Constant(mask, high))
            h //= 2
        for q in range(n):
            builder.store(rows[q], at(d_p, d0_, ds, q), align=size)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_write(typingctx, a, start, count):
    """Hint that ``a[start : start + count]`` is about to be written: one write prefetch per
    64-byte line (``llvm.prefetch``, into the caches in a writable state), so the stores that
    follow find their lines there instead of each waiting for it from memory. Only a hint:
    nothing is loaded or stored (callers keep the range within ``a`` all the same)."""
    if not (isinstance(a, types.Array) and isinstance(start, types.Integer)
            and isinstance(count, types.Integer)):
        return None
    sig = types.none(a, start, count)

    def codegen(context, builder, sig, args):
        arg = _Args(context, builder, sig, args)
        p = arg.data(0)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        intp = arg.index(1).type
        esize = ir.Constant(intp, context.get_abi_sizeof(p.type.pointee))
        base = builder.bitcast(builder.gep(p, [arg.index(1)]), i8p)
        n_bytes = builder.mul(arg.index(2), esize)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), n_bytes,
                                     ir.Constant(intp, 64), intp=intp) as (off, _):
            builder.call(fn, [builder.gep(base, [off]), ir.Constant(i32, 1), ir.Constant(i32, 3),
                              ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
