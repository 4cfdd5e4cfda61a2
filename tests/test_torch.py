"""Every method against PyTorch autograd, forward and backward, when torch is installed."""

import numpy as np
import pytest

import fastconv as fc
from helpers import DTYPES, is_cuda, method_case_params, method_params, to_host, tol

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_conv(x, w, b, stride=1, padding=0, dilation=1, groups=1):
    """torch conv2d with our padding forms translated to an explicit F.pad."""
    from helpers import ref_padding

    def pair(v):
        return (v, v) if np.ndim(v) == 0 else tuple(v)

    (pt, pb), (pl, pr) = ref_padding(padding, x.shape[2:], w.shape[2:], pair(stride),
                                     pair(dilation))
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    y = F.conv2d(F.pad(tx, (pl, pr, pt, pb)), tw, tb, stride=stride, dilation=dilation,
                 groups=groups)
    return tx, tw, tb, y


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,case", method_case_params("conv2d"))
def test_conv_forward_and_backward_match_torch(method, case, dtype):
    x, w, b = case.arrays(dtype, seed=21, n=1 if is_cuda(method) else None)
    tx, tw, tb, ty = torch_conv(x, w, b, **case.conf)
    g = np.random.default_rng(22).standard_normal(tuple(ty.shape)).astype(dtype)
    ty.backward(torch.tensor(g))
    y = to_host(fc.conv2d(x, w, b, **case.conf, method=method))
    assert y.shape == tuple(ty.shape)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol(dtype, case.reduction))
    dx, dw, db = (to_host(a) for a in fc.conv2d_backward(g, x, w, **case.conf, method=method))
    n_pos = g.size // g.shape[1]
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol(dtype, case.reduction))
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol(dtype, n_pos))
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol(dtype, n_pos))


POOLS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1)),
    dict(kernel_size=2, stride=2, ceil_mode=True),
]


@pytest.mark.parametrize("opts", POOLS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("method", method_params("max_pool2d"))
def test_pool_matches_torch(method, opts):
    shape = (1, 2, 7, 8) if is_cuda(method) else (2, 3, 11, 9)
    x = np.random.default_rng(0).permutation(int(np.prod(shape))).reshape(shape) / 7.0
    tx = torch.tensor(x, requires_grad=True)
    ty, tidx = F.max_pool2d(tx, **opts, return_indices=True)
    g = np.random.default_rng(1).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(g))
    y, idx = fc.max_pool2d(x, **opts, return_indices=True, method=method)
    np.testing.assert_array_equal(to_host(y), ty.detach().numpy())
    np.testing.assert_array_equal(to_host(idx), tidx.numpy())
    dx = fc.max_pool2d_backward(g, to_host(idx), x.shape, **opts, method=method)
    np.testing.assert_allclose(to_host(dx), tx.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_same_padding_matches_torch_at_stride_one():
    x = np.random.default_rng(0).standard_normal((1, 2, 7, 6))
    for k in [(3, 3), (4, 2), (5, 4)]:
        w = np.random.default_rng(1).standard_normal((3, 2, *k))
        want = F.conv2d(torch.tensor(x), torch.tensor(w), padding="same").numpy()
        np.testing.assert_allclose(fc.conv2d(x, w, padding="same"), want, **tol(np.float64))

