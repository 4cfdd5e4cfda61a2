"""avg_pool2d and adaptive_avg_pool2d on every method: against loop references re-derived from
PyTorch's rules, against PyTorch itself when installed, and the backward as the forward's exact
adjoint (both ops are linear)."""

import numpy as np
import pytest

import fastconv as fc
from helpers import (DTYPES, SIM, checked, is_cuda, method_params, ref_adaptive_avg_pool2d,
                     ref_avg_pool2d, to_host, tol)

AVG = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1)),
    dict(kernel_size=2, stride=3, ceil_mode=True),
    dict(kernel_size=(2, 4), stride=1, padding=(0, 2), divisor_override=3),
    dict(kernel_size=(9, 11)),  # global on (N, C, 9, 11)
    # one window over each whole plane, its divisor counting padding or not, or overridden
    dict(kernel_size=(11, 13), padding=1),
    dict(kernel_size=(11, 13), padding=1, count_include_pad=False),
    dict(kernel_size=(9, 11), divisor_override=5),
]
ADAPTIVE = [1, 2, (3, 4), (5, 1), (9, 11), (4, None), (None, 6), (7, 13), 10]


def _id(o):
    return "-".join(f"{k}{v}" for k, v in o.items()) if isinstance(o, dict) else str(o)


def _shape(method):
    return (1, 2, 9, 11) if is_cuda(method) and SIM else (2, 3, 9, 11)


def _adjoint_check(forward, backward, x_shape, dtype, rng):
    """<forward(x), g> == <x, backward(g)> on random x and g: backward is forward's adjoint."""
    x = rng.standard_normal(x_shape).astype(dtype)
    y = to_host(forward(x))
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = to_host(checked(backward, g))
    assert dx.shape == x_shape and dx.dtype == dtype
    lhs, rhs = float(np.vdot(y.astype(np.float64), g)), float(np.vdot(x.astype(np.float64), dx))
    scale = float(np.linalg.norm(y) * np.linalg.norm(g))  # the sums cancel: compare to it
    assert abs(lhs - rhs) <= (1e-5 if dtype == np.float32 else 1e-12) * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("opts", AVG, ids=_id)
@pytest.mark.parametrize("method", method_params("avg_pool2d"))
def test_avg_pool_matches_the_reference(method, opts, dtype):
    rng = np.random.default_rng(3)
    shape = _shape(method)
    x = rng.standard_normal(shape).astype(dtype)
    y = to_host(checked(fc.avg_pool2d, x, **opts, method=method))
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref_avg_pool2d(x, **opts), **tol(dtype, 99))
    _adjoint_check(lambda a: fc.avg_pool2d(a, **opts, method=method),
                   lambda g: fc.avg_pool2d_backward(g, shape, **opts, method=method),
                   shape, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("size", ADAPTIVE, ids=_id)
@pytest.mark.parametrize("method", method_params("adaptive_avg_pool2d"))
def test_adaptive_avg_pool_matches_the_reference(method, size, dtype):
    rng = np.random.default_rng(4)
    shape = _shape(method)
    x = rng.standard_normal(shape).astype(dtype)
    y = to_host(checked(fc.adaptive_avg_pool2d, x, size, method=method))
    np.testing.assert_allclose(y, ref_adaptive_avg_pool2d(x, size), **tol(dtype, 99))
    _adjoint_check(lambda a: fc.adaptive_avg_pool2d(a, size, method=method),
                   lambda g: fc.adaptive_avg_pool2d_backward(g, shape, size, method=method),
                   shape, dtype, rng)


@pytest.mark.parametrize("method", method_params("avg_pool2d"))
def test_random_avg_pools_match_torch(method):
    """Random odd configurations, values and gradients, against PyTorch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    done = 0
    for _ in range(12 if is_cuda(method) and SIM else 60):
        shape = tuple(int(v) for v in (*rng.integers(1, 4, 2), *rng.integers(1, 12, 2)))
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        opts = dict(kernel_size=k, stride=tuple(int(v) for v in rng.integers(1, 4, 2)),
                    padding=tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k),
                    ceil_mode=bool(rng.integers(2)), count_include_pad=bool(rng.integers(2)),
                    divisor_override=None if rng.integers(2) else int(rng.integers(1, 7)))
        size = (int(rng.integers(1, shape[2] + 3)), int(rng.integers(1, shape[3] + 3)))
        x = rng.standard_normal(shape)
        tx = torch.tensor(x, requires_grad=True)
        try:
            ty = F.avg_pool2d(tx, **opts)
        except RuntimeError:  # an empty output: ours must refuse it too
            with pytest.raises(ValueError, match="output would be empty"):
                fc.avg_pool2d(x, **opts, method=method)
            continue
        g = rng.standard_normal(tuple(ty.shape))
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(to_host(fc.avg_pool2d(x, **opts, method=method)),
                                   ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            to_host(fc.avg_pool2d_backward(g, shape, **opts, method=method)),
            tx.grad.numpy(), rtol=1e-12, atol=1e-12)
        ta = torch.tensor(x, requires_grad=True)
        tya = F.adaptive_avg_pool2d(ta, size)
        ga = rng.standard_normal(tuple(tya.shape))
        tya.backward(torch.tensor(ga))
        np.testing.assert_allclose(to_host(fc.adaptive_avg_pool2d(x, size, method=method)),
                                   tya.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            to_host(fc.adaptive_avg_pool2d_backward(ga, shape, size, method=method)),
            ta.grad.numpy(), rtol=1e-12, atol=1e-12)
        done += 1
    assert done >= 5


def test_large_windows_on_the_gpu_reduce_in_blocks():
    """cuda-direct sums windows of 64 and more elements with a block per output."""
    pytest.importorskip("numba.cuda")
    from fastconv import _registry

    if _registry.cuda_missing():
        pytest.skip(_registry.cuda_missing())
    x = np.random.default_rng(6).standard_normal((1, 2, 9, 10))
    for fn, args in ((fc.avg_pool2d, ((9, 10),)), (fc.adaptive_avg_pool2d, (1,))):
        np.testing.assert_allclose(to_host(fn(x, *args, method="cuda-direct")),
                                   x.mean(axis=(2, 3), keepdims=True), rtol=1e-12)


test_large_windows_on_the_gpu_reduce_in_blocks = pytest.mark.cuda(
    test_large_windows_on_the_gpu_reduce_in_blocks)


def test_global_average_pool_is_the_mean():
    x = np.random.default_rng(7).standard_normal((3, 16, 7, 7)).astype(np.float32)
    for method in fc.methods("adaptive_avg_pool2d"):
        if is_cuda(method):
            continue
        y = fc.adaptive_avg_pool2d(x, 1, method=method)
        np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_global_pooling_over_many_planes(dtype):
    """Planes in several work items (global pooling claims blocks of them), forward and
    backward, against the references. Each call follows one on the negated input whose result
    is dropped, so a plane left unwritten would likely hold that result (NumPy reuses the
    memory) rather than the right one by chance."""
    rng = np.random.default_rng(8)
    shape = (40, 50, 5, 7)
    x = rng.standard_normal(shape).astype(dtype) + 1
    g = rng.standard_normal((40, 50, 1, 1)).astype(dtype) + 1
    want = ref_adaptive_avg_pool2d(x, 1)
    want_dx = np.broadcast_to(g / 35, shape)

    def fresh(f, a, *args, **kw):
        f(-a, *args, **kw)
        return f(a, *args, **kw)

    for method in fc.methods("adaptive_avg_pool2d"):
        if is_cuda(method):
            continue
        for got, ref in [(fresh(fc.adaptive_avg_pool2d, x, 1, method=method), want),
                         (fresh(fc.avg_pool2d, x, (5, 7), method=method), want),
                         (fresh(fc.adaptive_avg_pool2d_backward, g, shape, 1, method=method),
                          want_dx),
                         (fresh(fc.avg_pool2d_backward, g, shape, (5, 7), method=method),
                          want_dx)]:
            np.testing.assert_allclose(got, ref, **tol(dtype))


def test_empty_batch():
    assert fc.avg_pool2d(np.ones((0, 3, 8, 8)), 2).shape == (0, 3, 4, 4)
    assert fc.adaptive_avg_pool2d(np.ones((0, 3, 8, 8)), (2, 3)).shape == (0, 3, 2, 3)
    assert fc.avg_pool2d_backward(np.ones((0, 3, 4, 4)), (0, 3, 8, 8), 2).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("call, err, match", [
    (lambda x: fc.avg_pool2d(x, 3, padding=2), ValueError, "at most half"),
    (lambda x: fc.avg_pool2d(x, 3, divisor_override=0), ValueError, "divisor_override"),
    (lambda x: fc.avg_pool2d(x, 3, divisor_override=1.5), TypeError, "divisor_override"),
    (lambda x: fc.avg_pool2d(x, 3, divisor_override=True), TypeError, "divisor_override"),
    (lambda x: fc.avg_pool2d(x, 3, count_include_pad="no"), TypeError, "count_include_pad"),
    (lambda x: fc.avg_pool2d(x, 9), ValueError, r"x of shape \(2, 3, 8, 8\).*empty"),
    (lambda x: fc.avg_pool2d(x[0], 2), ValueError, "4"),
    (lambda x: fc.avg_pool2d(x.astype(complex), 2), TypeError, "complex"),
    (lambda x: fc.avg_pool2d(x, 2, method="fast"), ValueError, "method='fast'"),
    (lambda x: fc.adaptive_avg_pool2d(x, 0), ValueError, "output_size"),
    (lambda x: fc.adaptive_avg_pool2d(x, (1, 2, 3)), TypeError, "output_size"),
    (lambda x: fc.adaptive_avg_pool2d(x, "1"), TypeError, "output_size"),
    (lambda x: fc.adaptive_avg_pool2d(x, 2.0), TypeError, "output_size"),
    (lambda x: fc.avg_pool2d_backward(np.ones((2, 3, 3, 3)), x.shape, 2), ValueError,
     r"grad_output must have the forward output's shape \(2, 3, 4, 4\)"),
    (lambda x: fc.adaptive_avg_pool2d_backward(np.ones((2, 3, 2, 2)), (2, 3, 8), 2),
     ValueError, "input_shape must have 4 entries"),
    (lambda x: fc.avg_pool2d(x, 2, layout="NWHC"), ValueError, "layout='NWHC'"),
])
def test_bad_arguments_are_named(call, err, match):
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8))
    with pytest.raises(err, match=match):
        call(x)


def test_layers_average_and_route_gradients():
    x = np.random.default_rng(9).standard_normal((2, 3, 8, 8))
    pool = fc.AvgPool2D(3, stride=2, padding=1, count_include_pad=False)
    np.testing.assert_allclose(pool.forward(x), ref_avg_pool2d(x, 3, 2, 1, False, False))
    g = np.random.default_rng(10).standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(pool.backward(g), fc.avg_pool2d_backward(
        g, x.shape, 3, 2, 1, count_include_pad=False))
    gap = fc.AdaptiveAvgPool2D(1)
    assert gap.forward(x).shape == (2, 3, 1, 1)
    np.testing.assert_allclose(gap.backward(np.ones((2, 3, 1, 1))), np.full(x.shape, 1 / 64))
    with pytest.raises(RuntimeError, match="before forward"):
        fc.AvgPool2D(2).backward(g)
    with pytest.raises(ValueError, match="at most half"):
        fc.AvgPool2D(2, padding=2)
    with pytest.raises(ValueError, match="output_size"):
        fc.AdaptiveAvgPool2D(0)
