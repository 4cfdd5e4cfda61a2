"""fastconv.Conv2D and fastconv.MaxPool2D: against the functional API, and through a whole net."""

import numpy as np
import pytest

import fastconv as fc
from helpers import CONV_CASES, DTYPES, is_cuda, method_params, takes, to_host, tol

LAYER_CASES = [c for c in CONV_CASES if c.tiny]
CPU_METHODS = [m for m in fc.methods("conv2d") if not m.startswith("cuda")]
POOL_OPTS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2),  # overlapping windows: gradients add
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=2, stride=1, dilation=2),
]


def _grid(op, cases, case_ids):
    """(method, case, dtype) for every method; a CUDA method (slow in the simulator, and checked
    kernel by kernel elsewhere) gets only the first case in float32: the layer code is the same."""
    out = []
    for m in ["auto", *method_params(op)]:
        name = m if isinstance(m, str) else m.values[0]
        marks = () if isinstance(m, str) else m.marks
        few = is_cuda(name)
        taken = [(c, cid) for c, cid in zip(cases, case_ids)
                 if name == "auto" or not op.startswith("conv")
                 or takes(op, name, c.x_shape, c.w_shape, c.conf)]
        for case, cid in taken[:1 if few else None]:
            for dt in DTYPES[:1] if few else DTYPES:
                out.append(pytest.param(name, case, dt, marks=marks,
                                        id=f"{name}-{cid}-{np.dtype(dt).name}"))
    return out


def _untied(shape, dtype, seed=0):
    """Distinct values (no tied maxima), negative and positive, in a shuffled order."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) - n / 2).astype(dtype) / 7


# ---------------------------------------------------------------------------------------------
# Conv2D


@pytest.mark.parametrize("method,case,dtype",
                         _grid("conv2d", LAYER_CASES, [c.name for c in LAYER_CASES]))
def test_conv2d_layer_matches_functional(method, case, dtype):
    x, w, b = case.arrays(dtype, seed=3)
    layer = fc.Conv2D(w, b, **case.conf, method=method)
    out = to_host(layer.forward(x))
    want = to_host(fc.conv2d(x, w, b, **case.conf, method=method))
    assert out.shape == want.shape and out.dtype == want.dtype == dtype
    np.testing.assert_allclose(out, want, **tol(dtype))

    dout = np.random.default_rng(4).standard_normal(out.shape).astype(dtype)
    dx = to_host(layer.backward(dout))
    g = fc.conv2d_backward(dout, x, w, **case.conf, method=method)
    for got, ref in zip((dx, layer.dW, layer.db), g):
        got, ref = to_host(got), to_host(ref)
        assert got.shape == ref.shape and got.dtype == ref.dtype == dtype
        np.testing.assert_allclose(got, ref, **tol(dtype, case.reduction))


def test_conv2d_layer_keeps_references_not_copies():
    x, w, b = CONV_CASES[0].arrays(np.float64)
    copies = x.copy(), w.copy(), b.copy()
    layer = fc.Conv2D(w, b)
    out = layer.forward(x)
    assert layer.W is w and layer.b is b and layer.x is x
    layer.backward(np.ones_like(out))
    for a, c in zip((x, w, b), copies):  # nothing was modified either
        np.testing.assert_array_equal(a, c)


def test_conv2d_layer_keeps_a_strided_view_as_given():
    base = np.random.default_rng(0).standard_normal((2, 3, 14, 12))
    x = base[:, :, ::2, ::2]  # non-contiguous
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    layer = fc.Conv2D(w, None, padding=1)
    out = layer.forward(x)
    assert layer.x is x
    np.testing.assert_allclose(out, fc.conv2d(x, w, padding=1), **tol(np.float64))
    dx = layer.backward(np.ones_like(out))
    assert dx.shape == x.shape and layer.db is None


def test_in_place_weight_update_is_seen():
    """An optimizer that updates W and b in place (params[k] -= lr * grads[k]) trains the layer."""
    x, w, b = CONV_CASES[1].arrays(np.float64, seed=5)
    conf = CONV_CASES[1].conf
    layer = fc.Conv2D(w, b, **conf)
    out = layer.forward(x)
    layer.backward(out)  # the gradient of 0.5 * sum(out ** 2)
    w -= 1e-3 * layer.dW
    b -= 1e-3 * layer.db
    assert layer.W is w
    np.testing.assert_allclose(layer.forward(x), fc.conv2d(x, w, b, **conf), **tol(np.float64))
    assert 0.5 * np.sum(layer.forward(x) ** 2) < 0.5 * np.sum(out ** 2)


def test_assigned_weight_is_seen_and_backward_uses_the_forward_weight():
    x, w, b = CONV_CASES[0].arrays(np.float64, seed=6)
    layer = fc.Conv2D(w, b)
    layer.W = 2 * w
    out = layer.forward(x)
    np.testing.assert_allclose(out, fc.conv2d(x, 2 * w, b), **tol(np.float64))
    layer.W = w  # a rebinding between forward and backward does not change the gradient
    dx = layer.backward(np.ones_like(out))
    np.testing.assert_allclose(
        dx, fc.conv2d_backward(np.ones_like(out), x, 2 * w).grad_input, **tol(np.float64))


def test_conv2d_layer_errors():
    w = np.zeros((4, 3, 3, 3))
    layer = fc.Conv2D(w, np.zeros(4))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 4, 3, 3)))
    with pytest.raises(ValueError, match="expect x with 3 channels"):
        layer.forward(np.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match="method='nope'"):
        fc.Conv2D(w, None, method="nope").forward(np.zeros((1, 3, 5, 5)))


# ---------------------------------------------------------------------------------------------
# MaxPool2D


@pytest.mark.parametrize("method,opts,dtype", _grid(
    "max_pool2d", POOL_OPTS, ["-".join(f"{k}{v}" for k, v in o.items()) for o in POOL_OPTS]))
def test_max_pool_layer_matches_functional(method, opts, dtype):
    x = _untied((2, 3, 9, 8), dtype)
    opts = dict(opts)
    k = opts.pop("kernel_size")
    extra = {key: opts.pop(key) for key in ("dilation", "ceil_mode") if key in opts}
    layer = fc.MaxPool2D(k, **opts, method=method, **extra)
    out = to_host(layer.forward(x))
    want, idx = fc.max_pool2d(x, k, **opts, **extra, return_indices=True, method=method)
    np.testing.assert_array_equal(out, to_host(want))
    assert out.dtype == dtype
    np.testing.assert_array_equal(to_host(layer.indices), to_host(idx))

    dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    dx = to_host(layer.backward(dout))
    want_dx = fc.max_pool2d_backward(dout, idx, x.shape, k, **opts, **extra, method=method)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, to_host(want_dx), **tol(dtype))


def test_max_pool_layer_defaults_and_errors():
    pool = fc.MaxPool2D(2)
    with pytest.raises(RuntimeError, match="before forward"):
        pool.backward(np.zeros((1, 1, 2, 2)))
    x = _untied((1, 2, 4, 6), np.float64)
    out = pool.forward(x)
    assert out.shape == (1, 2, 2, 3)  # stride defaults to kernel_size
    dx = pool.backward(np.ones_like(out))
    assert dx.sum() == out.size and set(np.unique(dx)) == {0.0, 1.0}
    with pytest.raises(ValueError, match="padding"):
        fc.MaxPool2D(2, padding=2).forward(x)


# ---------------------------------------------------------------------------------------------
# gradient check through a whole small net


class _Relu:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, d):
        return d * self.mask


class _Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.shape, self.x2 = x.shape, x.reshape(len(x), -1)
        return self.x2 @ self.W + self.b

    def backward(self, d):
        self.dW, self.db = self.x2.T @ d, d.sum(axis=0)
        return (d @ self.W.T).reshape(self.shape)


def _softmax_loss(scores, labels):
    z = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(labels)
    d = p.copy()
    d[np.arange(n), labels] -= 1
    return -np.mean(np.log(p[np.arange(n), labels])), d / n


NETS = {
    # conv -> relu -> pool -> affine, as SimpleConvNet
    "simple": dict(x=(2, 2, 6, 6), w=(3, 2, 3, 3), conv=dict(padding=1), pool=dict(kernel_size=2)),
    # strided, dilated, grouped conv and an overlapping, padded pool
    "grouped": dict(x=(2, 4, 9, 8), w=(4, 2, 2, 3), conv=dict(stride=(1, 2), dilation=2,
                    groups=2, padding="same"), pool=dict(kernel_size=3, stride=2, padding=1)),
}


def _build(spec, method, seed=0):
    rng = np.random.default_rng(seed)
    params = {"W1": rng.standard_normal(spec["w"]) * 0.5, "b1": rng.standard_normal(spec["w"][0])}
    conv = fc.Conv2D(params["W1"], params["b1"], **spec["conv"], method=method)
    pool_opts = dict(spec["pool"])
    pool = fc.MaxPool2D(pool_opts.pop("kernel_size"), **pool_opts,
                        method=method if method in fc.methods("max_pool2d") else "naive")
    x = rng.standard_normal(spec["x"])
    flat = pool.forward(_Relu().forward(conv.forward(x))).reshape(len(x), -1).shape[1]
    params["W2"] = rng.standard_normal((flat, 3)) * 0.3
    params["b2"] = rng.standard_normal(3)
    layers = [conv, _Relu(), pool, _Affine(params["W2"], params["b2"])]
    labels = rng.integers(0, 3, len(x))
    return layers, params, x, labels


def _loss_and_grads(layers, x, labels):
    for layer in layers:
        x = layer.forward(x)
    loss, d = _softmax_loss(x, labels)
    for layer in reversed(layers):
        d = layer.backward(d)
    conv, affine = layers[0], layers[3]
    return loss, {"x": d, "W1": conv.dW, "b1": conv.db, "W2": affine.dW, "b2": affine.db}


@pytest.mark.parametrize("net,method", [
    (net, m) for net in NETS for m in CPU_METHODS
    if takes("conv2d", m, NETS[net]["x"], NETS[net]["w"], NETS[net]["conv"])])
def test_whole_net_gradients_match_central_differences(net, method):
    """Central differences in float64: every entry with the naive method, else 20 per array."""
    entries = None if method == "naive" else 20
    layers, params, x, labels = _build(NETS[net], method)
    _, grads = _loss_and_grads(layers, x, labels)
    rng = np.random.default_rng(1)
    eps = 1e-6
    for name, a in dict(params, x=x).items():
        flat = a.reshape(-1)  # a view: perturb the very array the layers read
        picked = rng.permutation(flat.size)[:entries]
        num = np.empty(len(picked))
        for j, i in enumerate(picked):
            v = flat[i]
            flat[i] = v + eps
            hi = _loss_and_grads(layers, x, labels)[0]
            flat[i] = v - eps
            lo = _loss_and_grads(layers, x, labels)[0]
            flat[i] = v
            num[j] = (hi - lo) / (2 * eps)
        got = to_host(grads[name]).reshape(-1)[picked]
        np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-7, err_msg=f"d loss / d {name}")
