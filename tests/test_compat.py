"""fastconv.compat: the book's and the course's layers against references written here.

The references are written from the published formulas, not from the book's or the course's
code: for "Deep Learning from Scratch", the book's NumPy layers of fastconv.bench.nets (im2col
with zero padding, one row per output pixel, the receptive field flattened in (C, FH, FW)
order; the convolution as ``col @ W.reshape(FN, -1).T + b`` and pooling as an argmax over the
rows of the reshaped columns); for CS231n, the naive loops over output pixels. They compute in float64, as the book and the course do. Inputs have no tied
maxima (CS231n's fast pooling splits the gradient of a tie; the book and fastconv do not).
"""

import numpy as np
import pytest

import fastconv.compat.cs231n as cs
from fastconv.bench.nets import Affine, Relu, SoftmaxWithLoss
from fastconv.bench.nets import NumpyConvolution as RefConvolution
from fastconv.bench.nets import NumpyPooling as RefPooling
from fastconv.compat.dlfs import Convolution, Pooling
from helpers import tol


def _untied(shape, dtype=np.float64, seed=0):
    """Distinct values, about half of them negative, in a random order."""
    n = int(np.prod(shape))
    return ((np.random.default_rng(seed).permutation(n) - n / 2) / n).reshape(shape).astype(dtype)


def _normal(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


# ---------------------------------------------------------------------------------------------
# "Deep Learning from Scratch": the book's NumPy layers (fastconv.bench.nets, one home for them:
# NumPy im2col by strided copies, np.dot, col2im; no fastconv kernel) are the references


CONV_CONFS = [
    dict(x=(2, 3, 7, 7), w=(4, 3, 3, 3), stride=1, pad=0),
    dict(x=(2, 3, 8, 7), w=(5, 3, 3, 3), stride=2, pad=1),
    dict(x=(3, 2, 9, 8), w=(3, 2, 5, 4), stride=3, pad=2),
    dict(x=(2, 1, 12, 12), w=(6, 1, 5, 5), stride=1, pad=0),  # SimpleConvNet's first layer
]
POOL_CONFS = [
    dict(x=(2, 3, 8, 8), ph=2, pw=2, stride=2, pad=0),  # SimpleConvNet's pooling
    dict(x=(2, 3, 7, 9), ph=3, pw=3, stride=2, pad=0),  # overlapping windows
    dict(x=(2, 2, 6, 7), ph=2, pw=3, stride=1, pad=0),  # the book's default stride
    dict(x=(2, 2, 5, 5), ph=2, pw=2, stride=3, pad=1),  # padding where the book's sizes agree
    dict(x=(2, 2, 6, 6), ph=3, pw=3, stride=1, pad=1),  # padding, sizes from the book's im2col
]


def _ids(confs):
    return ["-".join(f"{k}{v}" for k, v in c.items()).replace(" ", "") for c in confs]


@pytest.mark.parametrize("conf", CONV_CONFS, ids=_ids(CONV_CONFS))
def test_dlfs_convolution_matches_book_formulas(conf):
    x, W, b = _normal(conf["x"]), _normal(conf["w"], seed=1), _normal(conf["w"][0], seed=2)
    ours = Convolution(W, b, conf["stride"], conf["pad"])
    ref = RefConvolution(W, b, conf["stride"], conf["pad"])
    out = ours.forward(x)
    want = ref.forward(x)
    assert out.shape == want.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, want, **tol(np.float64))
    dout = _normal(out.shape, seed=3)
    dx, want_dx = ours.backward(dout), ref.backward(dout)
    for got, ref_v in ((dx, want_dx), (ours.dW, ref.dW), (ours.db, ref.db)):
        assert got.shape == ref_v.shape
        np.testing.assert_allclose(got, ref_v, **tol(np.float64))


def test_dlfs_convolution_attributes_are_the_books():
    W, b = _normal((4, 3, 3, 3)), np.zeros(4)
    layer = Convolution(W, b, stride=2, pad=1)
    assert (layer.W is W, layer.b is b, layer.stride, layer.pad) == (True, True, 2, 1)
    assert layer.x is None and layer.dW is None and layer.db is None
    x = _normal((2, 3, 6, 6))
    layer.forward(x)
    assert layer.x is x  # kept, not copied
    layer.backward(np.ones((2, 4, 3, 3)))
    assert layer.dW.shape == W.shape and layer.db.shape == b.shape
    layer.pad = 0  # the book reads stride and pad at every forward
    assert layer.forward(x).shape == (2, 4, 2, 2)


@pytest.mark.parametrize("conf", POOL_CONFS, ids=_ids(POOL_CONFS))
def test_dlfs_pooling_matches_book_formulas(conf):
    x = _untied(conf["x"])
    args = conf["ph"], conf["pw"], conf["stride"], conf["pad"]
    ours, ref = Pooling(*args), RefPooling(*args)
    out, want = ours.forward(x), ref.forward(x)
    assert out.shape == want.shape and out.dtype == np.float64
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(ours.arg_max, ref.arg_max)
    assert ours.x is x
    dout = _normal(out.shape, seed=4)
    dx = ours.backward(dout)
    assert dx.shape == x.shape and dx.flags.c_contiguous
    np.testing.assert_allclose(dx, ref.backward(dout), **tol(np.float64))


def test_dlfs_pooling_pads_with_zeros():
    """An all-negative input: border windows take their maximum, 0, from the padding."""
    x = -1 - _untied((1, 2, 4, 4)) ** 2
    ours, ref = Pooling(3, 3, stride=1, pad=1), RefPooling(3, 3, stride=1, pad=1)
    out = ours.forward(x)
    np.testing.assert_array_equal(out, ref.forward(x))
    assert np.all(out[:, :, [0, -1], :] == 0) and np.all(out[:, :, :, [0, -1]] == 0)
    assert np.all(out[:, :, 1:-1, 1:-1] < 0)
    dout = _normal(out.shape, seed=5)
    dx = ours.backward(dout)
    np.testing.assert_allclose(dx, ref.backward(dout), **tol(np.float64))
    # the gradient of the zero-padded windows is dropped: only the 4 inner windows reach x
    assert np.count_nonzero(dx) <= 2 * 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dlfs_layers_keep_the_callers_dtype(dtype):
    x = _untied((2, 3, 8, 8), dtype)
    conv = Convolution(_normal((4, 3, 3, 3), dtype), np.zeros(4, dtype), pad=1)
    pool = Pooling(2, 2, stride=2)
    h = conv.forward(x)
    out = pool.forward(h)
    assert h.dtype == dtype and out.dtype == dtype
    dh = pool.backward(np.ones(out.shape, dtype))
    dx = conv.backward(dh)
    assert {a.dtype for a in (dh, dx, conv.dW, conv.db)} == {np.dtype(dtype)}
    ref = RefConvolution(conv.W.astype(np.float64), conv.b.astype(np.float64), 1, 1)
    np.testing.assert_allclose(h, ref.forward(x.astype(np.float64)), **tol(dtype, 27))


def test_dlfs_pooling_errors():
    with pytest.raises(RuntimeError, match="before forward"):
        Pooling(2, 2).backward(np.zeros((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="pad must be >= 0"):
        Pooling(2, 2, pad=-1).forward(np.zeros((1, 1, 4, 4)))
    with pytest.raises(TypeError, match="pad must be an int"):
        Pooling(2, 2, pad=1.5).forward(np.zeros((1, 1, 4, 4)))


# a SimpleConvNet-like net, written here with the book's layer interface


class _TinyConvNet:
    """conv -> relu -> pool -> affine -> relu -> affine -> softmax with loss."""

    def __init__(self, conv_cls, pool_cls, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "W1": 0.3 * rng.standard_normal((4, 2, 3, 3)), "b1": 0.1 * rng.standard_normal(4),
            "W2": 0.1 * rng.standard_normal((4 * 4 * 4, 8)), "b2": 0.1 * rng.standard_normal(8),
            "W3": 0.3 * rng.standard_normal((8, 3)), "b3": 0.1 * rng.standard_normal(3),
        }
        p = self.params
        self.layers = [conv_cls(p["W1"], p["b1"], 1, 1), Relu(), pool_cls(2, 2, stride=2),
                       Affine(p["W2"], p["b2"]), Relu(), Affine(p["W3"], p["b3"])]
        self.last = SoftmaxWithLoss()

    def loss(self, x, t):
        for layer in self.layers:
            x = layer.forward(x)
        return self.last.forward(x, t)

    def gradient(self, x, t):
        loss = self.loss(x, t)
        d = self.last.backward()
        for layer in reversed(self.layers):
            d = layer.backward(d)
        grads = {}
        for i, k in ((0, "1"), (3, "2"), (5, "3")):
            grads["W" + k], grads["b" + k] = self.layers[i].dW, self.layers[i].db
        return loss, grads, d


def test_dlfs_net_loss_and_grads_match_reference_layers_while_training():
    x, t = _untied((5, 2, 8, 8), seed=7) * 8, np.array([0, 1, 2, 1, 0])
    ours, ref = _TinyConvNet(Convolution, Pooling), _TinyConvNet(RefConvolution, RefPooling)
    for _ in range(3):  # a few SGD steps that update params[key] in place, as the book's SGD
        loss, grads, dx = ours.gradient(x, t)
        want_loss, want_grads, want_dx = ref.gradient(x, t)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-9, atol=1e-12)
        for key in want_grads:
            np.testing.assert_allclose(grads[key], want_grads[key], rtol=1e-9, atol=1e-12,
                                       err_msg=key)
        for net, g in ((ours, grads), (ref, want_grads)):
            for key in net.params:
                net.params[key] -= 0.5 * g[key]
    assert ours.loss(x, t) < _TinyConvNet(Convolution, Pooling).loss(x, t)


# ---------------------------------------------------------------------------------------------
# CS231n: references from the naive loops of the assignment's formulas


def ref_conv_forward(x, w, b, conv_param):
    s, p = conv_param["stride"], conv_param["pad"]
    n, _, h, wd = x.shape
    f, _, hh, ww = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((n, f, _out(h, hh, s, p), _out(wd, ww, s, p)))
    for i in range(n):
        for k in range(f):
            for r in range(out.shape[2]):
                for c in range(out.shape[3]):
                    out[i, k, r, c] = np.sum(xp[i, :, r * s:r * s + hh, c * s:c * s + ww] * w[k])
            out[i, k] += b[k]
    return out


def ref_conv_backward(dout, x, w, conv_param):
    s, p = conv_param["stride"], conv_param["pad"]
    _, _, hh, ww = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    dxp, dw = np.zeros_like(xp), np.zeros(w.shape)
    for i in range(dout.shape[0]):
        for k in range(dout.shape[1]):
            for r in range(dout.shape[2]):
                for c in range(dout.shape[3]):
                    win = (i, slice(None), slice(r * s, r * s + hh), slice(c * s, c * s + ww))
                    dxp[win] += w[k] * dout[i, k, r, c]
                    dw[k] += xp[win] * dout[i, k, r, c]
    db = dout.sum(axis=(0, 2, 3))
    return dxp[:, :, p:p + x.shape[2], p:p + x.shape[3]], dw, db


def ref_pool_forward(x, pool_param):
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    n, c, h, w = x.shape
    out = np.zeros((n, c, _out(h, ph, s, 0), _out(w, pw, s, 0)))
    for r in range(out.shape[2]):
        for q in range(out.shape[3]):
            out[:, :, r, q] = x[:, :, r * s:r * s + ph, q * s:q * s + pw].max(axis=(2, 3))
    return out


def ref_pool_backward(dout, x, pool_param):
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    dx = np.zeros(x.shape)
    for i in range(dout.shape[0]):
        for k in range(dout.shape[1]):
            for r in range(dout.shape[2]):
                for q in range(dout.shape[3]):
                    win = x[i, k, r * s:r * s + ph, q * s:q * s + pw]
                    a, b = np.unravel_index(np.argmax(win), win.shape)
                    dx[i, k, r * s + a, q * s + b] += dout[i, k, r, q]
    return dx


CS_CONV = [
    ((2, 3, 8, 8), (4, 3, 3, 3), {"stride": 1, "pad": 1}),
    ((2, 3, 9, 7), (5, 3, 3, 3), {"stride": 2, "pad": 1}),
    ((2, 2, 9, 9), (3, 2, 5, 5), {"stride": 2, "pad": 0}),
    ((1, 3, 10, 11), (2, 3, 4, 3), {"stride": 3, "pad": 2}),  # stride does not tile: floor
]
CS_POOL = [
    ((2, 3, 8, 8), {"pool_height": 2, "pool_width": 2, "stride": 2}),  # the "reshape" case
    ((2, 3, 9, 9), {"pool_height": 3, "pool_width": 3, "stride": 2}),  # overlapping
    ((2, 2, 7, 8), {"pool_height": 2, "pool_width": 3, "stride": 1}),
    ((1, 2, 7, 7), {"pool_height": 2, "pool_width": 2, "stride": 2}),  # floor
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,w_shape,conv_param", CS_CONV, ids=_ids([
    dict(x=a, w=b, **c) for a, b, c in CS_CONV]))
@pytest.mark.parametrize("kind", ["fast", "naive"])
def test_cs231n_conv_matches_naive_loops(kind, x_shape, w_shape, conv_param, dtype):
    fwd = getattr(cs, f"conv_forward_{kind}")
    bwd = getattr(cs, f"conv_backward_{kind}")
    x, w, b = _normal(x_shape, dtype), _normal(w_shape, dtype, 1), _normal(w_shape[0], dtype, 2)
    out, cache = fwd(x, w, b, conv_param)
    want = ref_conv_forward(x, w, b, conv_param)
    assert out.shape == want.shape and out.dtype == dtype
    reduction = int(np.prod(w_shape[1:]))
    np.testing.assert_allclose(out, want, **tol(dtype, reduction))
    dout = _normal(out.shape, dtype, 3)
    grads = bwd(dout, cache)
    for got, ref in zip(grads, ref_conv_backward(dout, x, w, conv_param)):
        assert got.shape == ref.shape and got.dtype == dtype
        np.testing.assert_allclose(got, ref, **tol(dtype, out.size))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,pool_param", CS_POOL, ids=_ids([
    dict(x=a, **p) for a, p in CS_POOL]))
@pytest.mark.parametrize("kind", ["fast", "naive"])
def test_cs231n_max_pool_matches_naive_loops(kind, x_shape, pool_param, dtype):
    fwd = getattr(cs, f"max_pool_forward_{kind}")
    bwd = getattr(cs, f"max_pool_backward_{kind}")
    x = _untied(x_shape, dtype)
    out, cache = fwd(x, pool_param)
    want = ref_pool_forward(x, pool_param)
    assert out.shape == want.shape and out.dtype == dtype
    np.testing.assert_array_equal(out, want)
    dout = _normal(out.shape, dtype, 3)
    dx = bwd(dout, cache)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, ref_pool_backward(dout, x, pool_param), **tol(dtype))


def test_cs231n_caches_have_the_courses_layout():
    x, w, b = _normal((1, 2, 5, 5)), _normal((3, 2, 3, 3)), np.zeros(3)
    conv_param = {"stride": 1, "pad": 1}
    _, cache = cs.conv_forward_naive(x, w, b, conv_param)
    assert len(cache) == 4 and cache[0] is x and cache[1] is w and cache[3] is conv_param
    _, cache = cs.conv_forward_fast(x, w, b, conv_param)
    assert cache[:4] == (x, w, b, conv_param) and cache[4] == "auto"
    # either backward accepts either cache
    a = cs.conv_backward_fast(np.ones((1, 3, 5, 5)), cs.conv_forward_naive(x, w, b, conv_param)[1])
    z = cs.conv_backward_naive(np.ones((1, 3, 5, 5)), cache)
    for u, v in zip(a, z):
        np.testing.assert_allclose(u, v, **tol(np.float64))
    pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}
    _, cache = cs.max_pool_forward_naive(x, pool_param)
    assert cache == (x, pool_param)
    _, cache = cs.max_pool_forward_fast(x, pool_param)
    assert cache[0] == "auto" and cache[1][0] is x and cache[1][2] is pool_param


def test_cs231n_backward_uses_the_method_of_the_forward(monkeypatch):
    seen = []

    def spy(fn):
        def wrapper(*args, method, **kwargs):
            seen.append((fn.__name__, method))
            return fn(*args, method=method, **kwargs)
        return wrapper

    for name in ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward"):
        monkeypatch.setattr(cs, name, spy(getattr(cs, name)))
    x, w, b = _untied((1, 2, 6, 6)), _normal((3, 2, 3, 3)), np.zeros(3)
    out, cache = cs.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1}, method="naive")
    cs.conv_backward_fast(np.ones_like(out), cache)
    out, cache = cs.max_pool_forward_fast(x, {"pool_height": 2, "pool_width": 2, "stride": 2},
                                          method="naive")
    cs.max_pool_backward_fast(np.ones_like(out), cache)
    out, cache = cs.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    cs.conv_backward_fast(np.ones_like(out), cache)
    assert seen == [("conv2d", "naive"), ("conv2d_backward", "naive"),
                    ("max_pool2d", "naive"), ("max_pool2d_backward", "naive"),
                    ("conv2d", "auto"), ("conv2d_backward", "auto")]


def test_cs231n_conv_relu_pool_chain_matches_reference():
    """layer_utils' conv_relu_pool_forward / backward, composed from the compat functions."""
    x, w, b = _normal((2, 3, 8, 8)), _normal((4, 3, 3, 3), seed=1), _normal(4, seed=2)
    conv_param = {"stride": 1, "pad": 1}
    pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}
    a, conv_cache = cs.conv_forward_fast(x, w, b, conv_param)
    r = np.maximum(a, 0)
    out, pool_cache = cs.max_pool_forward_fast(r, pool_param)
    dout = _normal(out.shape, seed=3)
    dr = cs.max_pool_backward_fast(dout, pool_cache)
    dx, dw, db = cs.conv_backward_fast(dr * (a > 0), conv_cache)

    a_ref = ref_conv_forward(x, w, b, conv_param)
    r_ref = np.maximum(a_ref, 0)
    np.testing.assert_allclose(out, ref_pool_forward(r_ref, pool_param), **tol(np.float64))
    dr_ref = ref_pool_backward(dout, r_ref, pool_param)
    for got, ref in zip((dx, dw, db), ref_conv_backward(dr_ref * (a_ref > 0), x, w, conv_param)):
        np.testing.assert_allclose(got, ref, **tol(np.float64))


def test_cs231n_errors_name_the_problem():
    x, w, b = _normal((1, 2, 5, 5)), _normal((3, 2, 3, 3)), np.zeros(3)
    with pytest.raises(KeyError, match="pad"):
        cs.conv_forward_fast(x, w, b, {"stride": 1})
    with pytest.raises(ValueError, match="method='nope'"):
        cs.conv_forward_fast(x, w, b, {"stride": 1, "pad": 0}, method="nope")
    with pytest.raises(ValueError, match="empty"):
        cs.max_pool_forward_fast(x, {"pool_height": 6, "pool_width": 2, "stride": 1})
