"""conv_transpose2d on every method: against its definition (a scatter of weighted kernels),
against PyTorch when installed, and its backward against float64 numerical gradients."""

import numpy as np
import pytest

import fastconv as fc
from helpers import (DTYPES, SIM, checked, is_cuda, method_params, ref_conv_transpose2d, takes,
                     to_host, tol)

# (x shape, w shape (C_in, C_out // groups, R, S), options)
CASES = [
    ("plain", (2, 3, 5, 4), (3, 2, 3, 3), {}),
    ("decoder-2x2-s2", (2, 4, 5, 6), (4, 3, 2, 2), dict(stride=2)),
    ("s2-p1-op1", (2, 3, 4, 5), (3, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ("s3-op2-asym", (1, 2, 4, 3), (2, 3, 3, 2), dict(stride=(3, 2), output_padding=(2, 1))),
    ("dil2-p2", (2, 2, 5, 5), (2, 2, 3, 3), dict(dilation=2, padding=2)),
    ("dil2-op1", (1, 2, 4, 4), (2, 2, 2, 3), dict(dilation=2, output_padding=1)),
    ("groups2", (2, 4, 5, 4), (4, 3, 3, 3), dict(groups=2, stride=2, padding=1)),
    ("depthwise", (2, 3, 6, 5), (3, 1, 3, 3), dict(groups=3, padding=1)),
    ("1x1", (2, 5, 4, 4), (5, 3, 1, 1), {}),
    ("big-pad", (1, 2, 6, 6), (2, 2, 3, 3), dict(padding=2)),
]
TINY = {"plain", "decoder-2x2-s2", "s2-p1-op1", "groups2", "dil2-op1"}


def _params():
    out = []
    for m in fc._registry.known("conv_transpose2d"):
        for name, xs, ws, opts in CASES:
            if is_cuda(m) and SIM and name not in TINY:
                continue
            if not takes("conv_transpose2d", m, xs, ws, opts):
                continue
            marks = [pytest.mark.cuda] if is_cuda(m) else []
            out.append(pytest.param(m, xs, ws, opts, marks=marks, id=f"{m}-{name}"))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,xs,ws,opts", _params())
def test_matches_the_definition_and_its_gradients(method, xs, ws, opts, dtype):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[1] * opts.get("groups", 1)).astype(dtype)
    y = to_host(checked(fc.conv_transpose2d, x, w, b, **opts, method=method))
    want = ref_conv_transpose2d(x, w, b, **opts)
    assert y.shape == want.shape and y.dtype == dtype
    red = ws[1] * ws[2] * ws[3]
    np.testing.assert_allclose(y, want, **tol(dtype, red))
    # gradients of L = sum(y * g): dx is conv2d(g, w) (no flip), dw and db by definition
    g = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = (to_host(a) for a in checked(fc.conv_transpose2d_backward, g, x, w, **opts,
                                                method=method))
    np.testing.assert_allclose(db, g.astype(np.float64).sum(axis=(0, 2, 3)),
                               **tol(dtype, g.size // g.shape[1]))
    # L is linear in x and in w: <dx, u> must equal <ref(u, w), g> for any direction u
    ux, uw = rng.standard_normal(xs), rng.standard_normal(ws)
    gx = float(np.vdot(ref_conv_transpose2d(ux, w, **opts), g))
    gw = float(np.vdot(ref_conv_transpose2d(x, uw, **opts), g))
    for got, want_, u in ((dx, gx, ux), (dw, gw, uw)):
        assert got.dtype == dtype
        scale = float(np.linalg.norm(u) * np.linalg.norm(got)) + 1.0
        rel = 1e-4 if dtype == np.float32 else 1e-10
        assert abs(float(np.vdot(got, u)) - want_) <= rel * scale


_NUMGRAD = ((1, 4, 3, 3), (4, 1, 3, 2), dict(stride=2, padding=1, output_padding=1, groups=2))


@pytest.mark.parametrize("method", [m for m in method_params("conv_transpose2d", _NUMGRAD)
                                    if not is_cuda(m.values[0])])
def test_backward_matches_numerical_gradients(method):
    rng = np.random.default_rng(1)
    opts = _NUMGRAD[2]
    x, w = rng.standard_normal((1, 4, 3, 3)), rng.standard_normal((4, 1, 3, 2))
    g = rng.standard_normal(fc.conv_transpose2d(x, w, **opts).shape)

    def numgrad(a):
        out, eps = np.empty_like(a), 1e-6
        for i in range(a.size):
            v = a.flat[i]
            a.flat[i] = v + eps
            hi = np.vdot(ref_conv_transpose2d(x, w, **opts), g)
            a.flat[i] = v - eps
            lo = np.vdot(ref_conv_transpose2d(x, w, **opts), g)
            a.flat[i] = v
            out.flat[i] = (hi - lo) / (2 * eps)
        return out

    dx, dw, db = fc.conv_transpose2d_backward(g, x, w, **opts, method=method)
    np.testing.assert_allclose(dx, numgrad(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, numgrad(w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, g.sum(axis=(0, 2, 3)), rtol=1e-12)


# methods that take general configs (winograd, 3x3 stride 1 only, has its own in test_winograd)
@pytest.mark.parametrize("method", method_params("conv_transpose2d", _NUMGRAD))
def test_random_configs_match_torch(method):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    done = 0
    for _ in range(8 if is_cuda(method) and SIM else 40):
        groups = int(rng.choice([1, 2]))
        cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        r, s = (int(v) for v in rng.integers(1, 4, 2))
        st, dl = (tuple(int(v) for v in rng.integers(1, 4, 2)) for _ in range(2))
        opts = dict(stride=st, dilation=dl, groups=groups,
                    padding=(int(rng.integers(0, r)), int(rng.integers(0, s))),
                    output_padding=tuple(int(rng.integers(0, max(a, b))) for a, b in zip(st, dl)))
        x = rng.standard_normal((int(rng.integers(1, 3)), cin, *map(int, rng.integers(1, 6, 2))))
        w, b = rng.standard_normal((cin, cout // groups, r, s)), rng.standard_normal(cout)
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        try:
            ty = F.conv_transpose2d(tx, tw, tb, **opts)
        except RuntimeError:  # an empty output: ours must refuse it too
            with pytest.raises(ValueError, match="empty output"):
                fc.conv_transpose2d(x, w, b, **opts, method=method)
            continue
        g = rng.standard_normal(tuple(ty.shape))
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(to_host(fc.conv_transpose2d(x, w, b, **opts, method=method)),
                                   ty.detach().numpy(), rtol=1e-9, atol=1e-9)
        grads = fc.conv_transpose2d_backward(g, x, w, **opts, method=method)
        for got, t in zip(grads, (tx, tw, tb)):
            np.testing.assert_allclose(to_host(got), t.grad.numpy(), rtol=1e-9, atol=1e-9)
        done += 1
    assert done >= 4


def test_the_decoder_shape_doubles_the_plane():
    x = np.random.default_rng(3).standard_normal((2, 64, 7, 7)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((64, 32, 2, 2)).astype(np.float32)
    y = fc.conv_transpose2d(x, w, stride=2)
    assert y.shape == (2, 32, 14, 14)
    np.testing.assert_allclose(y, ref_conv_transpose2d(x, w, stride=2), rtol=1e-4, atol=1e-4)


def test_empty_batch_and_needs():
    x, w = np.ones((0, 4, 3, 3)), np.ones((4, 2, 2, 2))
    assert fc.conv_transpose2d(x, w, stride=2).shape == (0, 2, 6, 6)
    g = fc.conv_transpose2d_backward(np.ones((0, 2, 6, 6)), x, w, stride=2, need_input=False)
    assert g.grad_input is None and not g.grad_weight.any() and not g.grad_bias.any()


@pytest.mark.parametrize("call, err, match", [
    (lambda x, w: fc.conv_transpose2d(x, w, padding="same"), TypeError, "not a mode string"),
    (lambda x, w: fc.conv_transpose2d(x, w, stride=2, output_padding=2), ValueError,
     "output_padding=.2, 2. must be smaller than the stride"),
    (lambda x, w: fc.conv_transpose2d(x, w, output_padding=-1), ValueError, "output_padding"),
    (lambda x, w: fc.conv_transpose2d(x[:, :3], w), ValueError,
     r"weight of shape \(4, 2, 3, 3\) expects x with 4 channels"),
    (lambda x, w: fc.conv_transpose2d(x, w, groups=3), ValueError, "groups=3 must divide"),
    (lambda x, w: fc.conv_transpose2d(x, w, np.ones(3)), ValueError, r"b must have shape \(2,\)"),
    (lambda x, w: fc.conv_transpose2d(x, w, padding=4), ValueError, "empty output"),
    (lambda x, w: fc.conv_transpose2d(x, w, stride=1.5), TypeError, "stride"),
    (lambda x, w: fc.conv_transpose2d_backward(np.ones((1, 2, 5, 5)), x, w), ValueError,
     r"grad_output must have the forward output's shape \(1, 2, 7, 7\)"),
    (lambda x, w: fc.conv_transpose2d_backward(np.ones((1, 2, 7, 7)), x, w, need_bias=1),
     TypeError, "need_bias"),
])
def test_bad_arguments_are_named(call, err, match):
    x, w = np.ones((1, 4, 5, 5)), np.ones((4, 2, 3, 3))
    with pytest.raises(err, match=match):
        call(x, w)


def test_layer_matches_the_functions():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((4, 3, 2, 2)), np.ones(3)
    layer = fc.ConvTranspose2D(w, b, stride=2)
    y = layer.forward(x)
    np.testing.assert_allclose(y, ref_conv_transpose2d(x, w, b, stride=2), rtol=1e-12)
    g = rng.standard_normal(y.shape)
    want = fc.conv_transpose2d_backward(g, x, w, stride=2)
    np.testing.assert_allclose(layer.backward(g), want.grad_input)
    np.testing.assert_allclose(layer.dW, want.grad_weight)
    np.testing.assert_allclose(layer.db, want.grad_bias)
    assert fc.ConvTranspose2D(w, None).forward(x).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="output_padding"):
        fc.ConvTranspose2D(w, b, output_padding=1)
