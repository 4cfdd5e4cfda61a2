"""What only the CUDA methods do: device arrays in and out, dispatch, availability, real GPUs.

The conformance suite (test_conv2d, test_grad, test_pool, test_torch) already checks every CUDA
method's values on tiny problems, in the simulator or on a GPU. Here: arrays that stay on the
device, ``method="auto"`` with device arrays, the errors, and on real hardware (``gpu``) larger
problems, determinism and interop with PyTorch and CuPy.
"""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import _registry, _validate
from helpers import SIM, einsum_conv2d, ref_max_pool2d, tol

CUDA_METHODS = ("cuda-naive", "cuda-im2col", "cuda-direct")
POOL_METHODS = tuple(m for m in _registry.known("max_pool2d") if m.startswith("cuda"))


def device(a):
    """A device copy of a host array.

    On a GPU, a Numba device array. The simulator's device arrays export no
    ``__cuda_array_interface__``, so there the copy is a simulator array that adds one, which is
    all fastconv looks for.
    """
    from numba import cuda

    a = np.asarray(a)
    if not SIM:
        return cuda.to_device(a)
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class SimDeviceArray(FakeCUDAArray):
        @property
        def __cuda_array_interface__(self):
            ai = self._ary.__array_interface__
            return dict(shape=ai["shape"], typestr=ai["typestr"], data=ai["data"],
                        strides=ai["strides"], version=3)

    return SimDeviceArray(a)


def is_numba_device_array(a):
    return getattr(a, "__cuda_ndarray__", False) and hasattr(a, "copy_to_host")


@contextlib.contextmanager
def no_host_copies():
    """Make any host <-> device copy inside the block fail."""
    from numba import cuda

    def refuse(*args, **kwargs):
        raise AssertionError("a host <-> device copy was made")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cuda, "to_device", refuse)
        m.setattr(type(cuda.device_array(1)), "copy_to_host", refuse)
        yield


def _problem(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, 6, 7)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    return x, w, b


# ---------------------------------------------------------------------------------------------
# device arrays in -> device arrays out


@pytest.mark.cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_conv_device_arrays_stay_on_device(method):
    x, w, b = _problem()
    conf = dict(stride=(1, 2), padding=1)
    xd, wd, bd, gd = (device(a) for a in (x, w, b, np.ones((1, 4, 6, 4), np.float32)))
    with no_host_copies():
        y = fc.conv2d(xd, wd, bd, **conf, method=method)
        g = fc.conv2d_backward(gd, xd, wd, **conf, method=method)
    assert is_numba_device_array(y) and y.shape == (1, 4, 6, 4) and y.dtype == np.float32
    assert all(is_numba_device_array(a) for a in g)
    np.testing.assert_allclose(y.copy_to_host(), einsum_conv2d(x, w, b, **conf),
                               **tol(np.float32, 27))
    want = fc.conv2d_backward(np.ones(y.shape, np.float32), x, w, **conf, method="naive")
    for got, ref in zip(g, want):
        np.testing.assert_allclose(got.copy_to_host(), ref, **tol(np.float32, 27))


@pytest.mark.cuda
@pytest.mark.parametrize("method", POOL_METHODS)
def test_pool_device_arrays_stay_on_device(method):
    x = np.random.default_rng(1).permutation(2 * 7 * 6).reshape(1, 2, 7, 6).astype(np.float64)
    opts = dict(kernel_size=3, stride=2, padding=1)
    g = np.random.default_rng(2).standard_normal((1, 2, 4, 3))
    xd, gd = device(x), device(g)
    with no_host_copies():
        out, idx = fc.max_pool2d(xd, **opts, return_indices=True, method=method)
    if SIM:  # the simulator's own arrays export no __cuda_array_interface__: re-wrap
        idx = device(idx.copy_to_host())
    with no_host_copies():
        dx = fc.max_pool2d_backward(gd, idx, x.shape, **opts, method=method)
    assert is_numba_device_array(out) and is_numba_device_array(idx)
    assert is_numba_device_array(dx) and idx.dtype == np.int64
    want, want_idx = ref_max_pool2d(x, **opts)
    np.testing.assert_array_equal(out.copy_to_host(), want)
    np.testing.assert_array_equal(idx.copy_to_host(), want_idx)
    np.testing.assert_allclose(dx.copy_to_host(),
                               fc.max_pool2d_backward(g, want_idx, x.shape, **opts,
                                                      method="naive"), rtol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_strided_device_arrays_are_copied_on_device(method):
    rng = np.random.default_rng(3)
    base, b_base = rng.standard_normal((1, 6, 7, 12)), rng.standard_normal(8)
    w = np.asfortranarray(rng.standard_normal((4, 3, 3, 3)))
    x, b = base[:, ::2, :, ::2], b_base[::2]
    if SIM:  # the simulator's arrays wrap the strided host views themselves
        xd, wd, bd = device(x), device(w), device(b)
    else:  # strided views of device arrays, and a Fortran-ordered one
        xd, wd, bd = device(base)[:, ::2, :, ::2], device(w), device(b_base)[::2]
    assert not xd.is_c_contiguous() and not wd.is_c_contiguous()
    y = fc.conv2d(xd, wd, bd, padding="same", method=method)
    np.testing.assert_allclose(y.copy_to_host(), einsum_conv2d(x, w, b, padding="same"),
                               **tol(np.float64))
    np.testing.assert_array_equal(xd.copy_to_host(), x)  # the input was not modified


@pytest.mark.cuda
def test_auto_sends_device_arrays_to_a_cuda_method():
    x, w, b = _problem()
    xd, wd, bd, spec = _validate.conv2d(device(x), device(w), device(b), 1, 0, 1, 1)
    assert spec.on_device
    assert _registry.resolve("conv2d", "auto", spec).device == "cuda"
    y = fc.conv2d(device(x), device(w), device(b))
    assert is_numba_device_array(y)
    np.testing.assert_allclose(y.copy_to_host(), einsum_conv2d(x, w, b), **tol(np.float32, 27))
    g = fc.conv2d_backward(device(np.ones(y.shape, np.float32)), device(x), device(w))
    assert all(is_numba_device_array(a) for a in g)
    out = fc.max_pool2d(device(x), 2)
    assert is_numba_device_array(out)
    # host arrays stay on the CPU
    host = fc.conv2d(x, w, b)
    assert isinstance(host, np.ndarray)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward", "max_pool2d"])
def test_cpu_method_with_device_arrays_raises(op):
    x, w, b = _problem()
    with pytest.raises(ValueError, match="runs on the CPU but the arrays are on the GPU"):
        if op == "conv2d":
            fc.conv2d(device(x), device(w), method="naive")
        elif op == "conv2d_backward":
            fc.conv2d_backward(device(np.ones((1, 4, 4, 5), np.float32)), device(x), device(w),
                               method="naive")
        else:
            fc.max_pool2d(device(x), 2, method="naive")


@pytest.mark.cuda
def test_mixed_host_and_device_arrays_raise():
    x, w, _ = _problem()
    with pytest.raises(TypeError, match="on the GPU but"):
        fc.conv2d(device(x), w, method="cuda-naive")


# ---------------------------------------------------------------------------------------------
# without a GPU


@pytest.fixture
def no_gpu(monkeypatch):
    """numba.cuda finds no GPU and the simulator is off; the availability caches are reset."""
    from numba import cuda

    clear = _registry.reprobe

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    clear()
    yield
    clear()  # the monkeypatches are undone right after: the next probe sees the real state


@pytest.mark.parametrize("method", CUDA_METHODS)
def test_no_gpu_raises_backend_unavailable(method, no_gpu):
    x, w, _ = _problem()
    with pytest.raises(fc.BackendUnavailableError, match=f"method='{method}' cannot run here"):
        fc.conv2d(x, w, method=method)
    with pytest.raises(fc.BackendUnavailableError, match="python -m fastconv info"):
        fc.conv2d_backward(np.ones((1, 4, 4, 5)), x, w, method=method)
    assert isinstance(fc.BackendUnavailableError("x"), RuntimeError)
    assert not any(m.startswith("cuda") for m in fc.methods())
    assert isinstance(fc.conv2d(x, w), np.ndarray)  # "auto" still works on the CPU


def test_import_does_not_load_numba_cuda():
    """fastconv and its CUDA kernel module import without touching numba.cuda (no GPU needed)."""
    code = ("import sys, fastconv, fastconv.kernels.cuda; "
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda was imported'")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# real hardware only


GPU_CASES = [  # name, x shape, w shape, options: large enough for several blocks, tiles and splits
    ("vgg-like", (2, 64, 30, 29), (48, 64, 3, 3), dict(padding=1)),
    ("stride2-5x5", (3, 24, 37, 41), (40, 24, 5, 5), dict(stride=2, padding=2)),
    ("dilated-groups", (2, 32, 33, 35), (32, 8, 3, 3), dict(groups=4, dilation=2,
                                                             padding="same")),
    ("depthwise", (4, 96, 40, 40), (96, 1, 3, 3), dict(groups=96, padding=1)),
    ("1x1", (4, 160, 14, 14), (72, 160, 1, 1), {}),
    ("alexnet-like", (2, 3, 67, 67), (32, 3, 11, 11), dict(stride=4, padding=2)),
]


@pytest.mark.cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", CUDA_METHODS)
@pytest.mark.parametrize("name,xs,ws,conf", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_larger_problems_match_naive(name, xs, ws, conf, method, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    want = fc.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **conf,
                     method="naive")
    got = fc.conv2d(x, w, b, **conf, method=method)
    red = int(np.prod(ws[1:]))
    np.testing.assert_allclose(got, want, **tol(dtype, red))
    g = rng.standard_normal(want.shape).astype(dtype)
    want_g = fc.conv2d_backward(g.astype(np.float64), x.astype(np.float64),
                                w.astype(np.float64), **conf, method="naive")
    got_g = fc.conv2d_backward(g, x, w, **conf, method=method)
    n_pos = g.size // g.shape[1]
    for a, ref, r in zip(got_g, want_g, (red, n_pos, n_pos)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, ref, **tol(dtype, r))


@pytest.mark.cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_gpu_results_are_deterministic(method):
    rng = np.random.default_rng(8)
    x = device(rng.standard_normal((8, 64, 28, 28)).astype(np.float32))
    w = device(rng.standard_normal((64, 64, 3, 3)).astype(np.float32))
    g = device(rng.standard_normal((8, 64, 28, 28)).astype(np.float32))
    runs = [[a.copy_to_host() for a in fc.conv2d_backward(g, x, w, padding=1, method=method)]
            for _ in range(3)]
    fwd = [fc.conv2d(x, w, padding=1, method=method).copy_to_host() for _ in range(2)]
    for r in runs[1:]:
        for a, ref in zip(r, runs[0]):
            np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(fwd[0], fwd[1])


@pytest.mark.cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", POOL_METHODS)
@pytest.mark.parametrize("opts", [dict(kernel_size=2), dict(kernel_size=3, stride=2),
                                  dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)],
                         ids=["2x2", "3x3s2", "3x3s2p1-ceil"])
def test_gpu_larger_pools_match_reference(method, opts):
    rng = np.random.default_rng(9)
    shape = (4, 24, 55, 57)
    x = (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.25).astype(np.float32)
    out, idx = fc.max_pool2d(x, **opts, return_indices=True, method=method)
    want, want_idx = ref_max_pool2d(x, **opts)
    np.testing.assert_array_equal(out, want.astype(np.float32))
    np.testing.assert_array_equal(idx, want_idx)
    g = rng.standard_normal(out.shape).astype(np.float32)
    np.testing.assert_allclose(fc.max_pool2d_backward(g, idx, shape, **opts, method=method),
                               fc.max_pool2d_backward(g, idx, shape, **opts, method="naive"),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.gpu
def test_gpu_torch_and_cupy_arrays_are_accepted():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no GPU")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(2, 16, 20, 20, device="cuda")
    w = torch.randn(24, 16, 3, 3, device="cuda")
    want = torch.nn.functional.conv2d(x, w, padding=1).cpu().numpy()
    for method in CUDA_METHODS:
        y = fc.conv2d(x, w, padding=1, method=method)
        assert is_numba_device_array(y)
        np.testing.assert_allclose(y.copy_to_host(), want, **tol(np.float32, 144))
    try:
        import cupy
    except ImportError:
        return
    y = fc.conv2d(cupy.asarray(x.cpu().numpy()), cupy.asarray(w.cpu().numpy()), padding=1)
    np.testing.assert_allclose(y.copy_to_host(), want, **tol(np.float32, 144))


@pytest.mark.cuda
@pytest.mark.gpu
def test_gpu_pool_recycles_a_block_only_once_no_array_uses_it():
    import gc

    from fastconv.kernels.cuda import _memory as kc

    def ptr(d):
        return d.__cuda_array_interface__["data"][0]

    assert kc._get_pool(), kc._pool_off_reason
    assert kc._empty((3,), np.float32).alloc_size == 12  # its own size, not its block's
    ref = np.arange(3000, dtype=np.float32)
    a = kc._empty((3000,), np.float32)
    a.copy_to_device(ref)
    p = ptr(a)
    view = a[10:20]
    del a
    gc.collect()
    b = kc._empty((3000,), np.float32)  # the view keeps the block: b lives elsewhere
    b.copy_to_device(np.zeros(3000, np.float32))
    assert ptr(b) != p
    np.testing.assert_array_equal(view.copy_to_host(), ref[10:20])
    del view
    gc.collect()
    c = kc._empty((3000,), np.float32)  # now the block is free again
    assert ptr(c) == p
    # results of the methods come from the pool and hold their values while held
    x = device(np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float32))
    w = device(np.random.default_rng(4).standard_normal((4, 3, 3, 3)).astype(np.float32))
    y1 = fc.conv2d(x, w, method="cuda-direct")
    want = y1.copy_to_host()
    hits = kc._pool.hits
    for _ in range(3):
        fc.conv2d(x, w, method="cuda-direct")  # each result dropped at once: blocks reused
    assert kc._pool.hits > hits
    np.testing.assert_array_equal(y1.copy_to_host(), want)
