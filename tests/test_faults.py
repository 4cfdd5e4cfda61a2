"""Faults a hostile user meets: limits, round trips, odd indices, huge options, empty batches,
flags that are not bools. Every method, through the registry."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv as fc
from fastconv import _registry, _validate
from fastconv.compat import cs231n, dlfs
from helpers import SIM, is_cuda, method_params, ref_max_pool2d, takes, to_host

POOL_METHODS = method_params("max_pool2d")
CONV_METHODS = method_params("conv2d")


def _spec(x_shape, w_shape, stride=1, padding=0, dilation=1, dtype=np.float32):
    """A validated spec from shapes alone (no array of a huge problem is ever made)."""
    return _validate._conv_spec(x_shape, w_shape, False, None, stride, padding, dilation, 1,
                                np.dtype(dtype), False)


# ---------------------------------------------------------------------------------------------
# 2. limits belong to unsupported(spec): auto never picks a method that then refuses


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward"])
def test_auto_avoids_im2col_beyond_the_blas_interface(op):
    spec = _spec((1, 3, 6000, 6000), (8, 3, 3, 3), padding=1)
    if "im2col" not in fc.methods(op):
        pytest.skip("im2col is not built here")
    assert _registry.resolve(op, "auto", spec).method != "im2col"
    with pytest.raises(ValueError, match=r"method='im2col' cannot run this problem: the output "
                                         r"plane OH\*OW = 36000000 for x of shape \(1, 3, 6000, "
                                         r"6000\) .* 32-bit BLAS"):
        _registry.resolve(op, "im2col", spec)


def test_every_candidate_of_auto_runs_a_problem_that_one_method_refuses():
    """stride 2**31 - 1: direct would lay out 2**62 elements and says so; auto computes."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 1, 1))
    big = 2**31 - 1
    with pytest.raises(ValueError, match=r"method='direct' cannot run this problem: .*stride="
                                         r"\(2147483647, 2147483647\)"):
        fc.conv2d(x, w, stride=big, method="direct")
    want = np.einsum("nc,kc->nk", x[:, :, 0, 0], w[:, :, 0, 0])[:, :, None, None]
    np.testing.assert_allclose(fc.conv2d(x, w, stride=big), want, rtol=1e-12)
    g = fc.conv2d_backward(np.ones((2, 4, 1, 1)), x, w, stride=big)
    np.testing.assert_allclose(g.grad_weight[:, :, 0, 0], np.tile(x[:, :, 0, 0].sum(0), (4, 1)))


# ---------------------------------------------------------------------------------------------
# 3. no BLAS: im2col's conv is unavailable, auto falls back


def test_without_blas_im2col_conv_is_unavailable_and_auto_falls_back():
    code = textwrap.dedent("""
        import sys
        sys.modules["scipy.linalg.cython_blas"] = None   # import fails
        import numpy as np, fastconv as fc
        assert "im2col" not in fc.methods(), fc.methods()
        assert "im2col" not in fc.methods("conv2d") and "im2col" in fc.methods("max_pool2d")
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
        np.testing.assert_allclose(fc.conv2d(x, w), fc.conv2d(x, w, method="naive"), rtol=1e-10)
        fc.conv2d_backward(np.ones((2, 4, 4, 4)), x, w)
        try:
            fc.conv2d(x, w, method="im2col")
        except fc.BackendUnavailableError as e:
            print("refused:", e)
    """)
    if "im2col" not in fc.methods("max_pool2d"):
        pytest.skip("the compiled core is not built here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: method='im2col' cannot run here: scipy.linalg.cython_blas cannot be " \
           "loaded" in out.stdout


# ---------------------------------------------------------------------------------------------
# 4, 5. pool backward takes whatever forward returned, and scatter-adds any in-plane index


def _routed(g, idx, x_shape, opts):
    """Reference backward: each gradient added at its index, except windows holding no pixel."""
    h, w = x_shape[2:]
    n, c = np.indices(x_shape[:2])
    out = np.zeros(x_shape)
    oh, ow = g.shape[2:]
    for i in range(oh):
        for j in range(ow):
            if _empty_window(i, j, h, w, opts):
                continue
            k = idx[:, :, i, j]
            np.add.at(out, (n, c, k // w, k % w), g[:, :, i, j])
    return out


def _empty_window(i, j, h, w, opts):
    kh, kw = np.broadcast_to(opts["kernel_size"], 2)
    sh, sw = np.broadcast_to(opts.get("stride") or opts["kernel_size"], 2)
    ph, pw = np.broadcast_to(opts.get("padding", 0), 2)
    dh, dw = np.broadcast_to(opts.get("dilation", 1), 2)
    rows = [i * sh - ph + p * dh for p in range(kh)]
    cols = [j * sw - pw + q * dw for q in range(kw)]
    return not any(0 <= r < h for r in rows) or not any(0 <= c < w for c in cols)


def test_the_issue_round_trip_through_windows_in_the_padding():
    args = ((2, 2), (3, 4), (1, 0), (2, 3), True)
    y, i = fc.max_pool2d(np.zeros((1, 2, 1, 11)), *args, return_indices=True)
    assert np.all(y == -np.inf)
    np.testing.assert_array_equal(i[0, 0, 0], [11, 15, 19])  # as PyTorch: outside the plane
    for m in fc.methods("max_pool2d_backward"):
        dx = to_host(fc.max_pool2d_backward(np.ones_like(y), i, (1, 2, 1, 11), *args, method=m))
        np.testing.assert_array_equal(dx, np.zeros((1, 2, 1, 11)))


def _random_pool_configs(n, seed):
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < n:
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        opts = dict(kernel_size=k, stride=tuple(int(v) for v in rng.integers(1, 5, 2)),
                    padding=tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k),
                    dilation=tuple(int(v) for v in rng.integers(1, 4, 2)),
                    ceil_mode=bool(rng.integers(0, 2)))
        shape = (1, 2, int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        try:
            oh, ow = _validate.max_pool2d(np.zeros(shape), **opts)[1].out_hw
        except ValueError:
            continue
        empties = sum(_empty_window(i, j, *shape[2:], opts) for i in range(oh) for j in range(ow))
        configs.append((shape, opts, empties))
    return configs


@pytest.mark.parametrize("method", POOL_METHODS)
def test_backward_accepts_every_forward_of_random_ceil_and_dilation_configs(method):
    configs = _random_pool_configs(40 if is_cuda(method) and SIM else 300, seed=5)
    assert sum(e > 0 for *_, e in configs) >= (3 if is_cuda(method) and SIM else 10)
    rng = np.random.default_rng(6)
    for shape, opts, _ in configs:
        x = rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64)
        y, idx = fc.max_pool2d(x, **opts, return_indices=True, method=method)
        y, idx = to_host(y), to_host(idx)
        want_y, want_idx = ref_max_pool2d(x, **opts)
        np.testing.assert_array_equal(y, want_y, err_msg=str((shape, opts)))
        np.testing.assert_array_equal(idx, want_idx, err_msg=str((shape, opts)))
        g = rng.standard_normal(y.shape)
        dx = to_host(fc.max_pool2d_backward(g, idx, shape, **opts, method=method))
        np.testing.assert_allclose(dx, _routed(g, idx, shape, opts), rtol=1e-12, atol=1e-12,
                                   err_msg=str((shape, opts)))


@pytest.mark.parametrize("method", POOL_METHODS)
def test_layer_round_trip_with_dilation_and_ceil_mode(method):
    pool = fc.MaxPool2D((2, 2), (3, 4), (1, 0), method, dilation=(2, 3), ceil_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 11))
    out = to_host(pool.forward(x))
    dx = to_host(pool.backward(np.ones_like(out)))
    assert dx.shape == x.shape and np.isfinite(dx).all()
    assert dx.sum() == np.isfinite(out).sum()  # one unit per window that holds a pixel


@pytest.mark.parametrize("method", POOL_METHODS)
def test_duplicate_and_foreign_indices_add(method):
    g = np.array([[[[1.0, 2.0]]]])
    dx = to_host(fc.max_pool2d_backward(g, np.zeros((1, 1, 1, 2), np.int64), (1, 1, 2, 4), 2,
                                        method=method))
    np.testing.assert_array_equal(dx[0, 0], [[3, 0, 0, 0], [0, 0, 0, 0]])
    # indices anywhere in the plane, also outside their own window, with overlapping windows
    rng = np.random.default_rng(1)
    shape, opts = (2, 3, 7, 6), dict(kernel_size=3, stride=2, padding=1)
    g = rng.standard_normal(fc.max_pool2d(np.zeros(shape), **opts).shape)
    idx = rng.integers(0, 42, size=g.shape)
    got = to_host(fc.max_pool2d_backward(g, idx, shape, **opts, method=method))
    np.testing.assert_allclose(got, _routed(g, idx, shape, opts), rtol=1e-12, atol=1e-12)


def test_indices_outside_the_plane_are_still_errors_in_windows_holding_pixels():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\) .* got values in "
                                         r"\[0, 16\]"):
        fc.max_pool2d_backward(np.ones((1, 1, 2, 2)), np.array([[[[0, 1], [2, 16]]]]),
                               (1, 1, 4, 4), 2)


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.int8])
def test_unsigned_and_small_index_dtypes_report_their_values(dtype):
    bad = np.array([[[[2**63 if dtype == np.uint64 else np.iinfo(dtype).max]]]], dtype)
    with pytest.raises(ValueError, match=rf"got values in \[{int(bad.max())}, "):
        fc.max_pool2d_backward(np.ones((1, 1, 1, 1)), bad, (1, 1, 2, 2), 2)


# ---------------------------------------------------------------------------------------------
# 6. huge options: a ValueError naming the option, or a result


@pytest.mark.parametrize("call,match", [
    (lambda x, w: fc.conv2d(x, w, stride=2**31), r"stride=2147483648 is too large"),
    (lambda x, w: fc.conv2d(x, w, dilation=2**31), r"dilation=2147483648 is too large"),
    (lambda x, w: fc.conv2d(x, w, padding=2**40), r"padding=1099511627776 is too large"),
    (lambda x, w: fc.conv2d(x, w, padding=((0, 2**31), (0, 0))), r"padding=\(0, 2147483648\)"),
    (lambda x, w: fc.conv2d(x, w, groups=2**31), r"groups=2147483648 is too large"),
    (lambda x, w: fc.max_pool2d(x, 2, stride=2**31), r"stride=2147483648 is too large"),
    (lambda x, w: fc.max_pool2d(x, 2**40), r"kernel_size=1099511627776 is too large"),
    (lambda x, w: fc.conv2d_backward(np.ones((1, 1, 5, 5)), x, w, stride=(1, 2**33)),
     r"stride=\(1, 8589934592\) is too large"),
])
def test_huge_options_name_themselves(call, match):
    x, w = np.ones((1, 1, 5, 5)), np.ones((1, 1, 1, 1))
    with pytest.raises(ValueError, match=match):
        call(x, w)


def test_an_output_too_large_to_exist_names_the_padding():
    with pytest.raises(ValueError, match=r"padding=2147483647 and stride=\(1, 1\) give an "
                                         r"output of shape \(1, 1, 4294967299, 4294967299\)"):
        fc.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 1, 1)), padding=2**31 - 1)


@pytest.mark.parametrize("method", [m for m in CONV_METHODS  # winograd takes 3x3 only
                                    if takes("conv2d", m.values[0], (1, 2, 5, 5), (3, 2, 1, 1))])
def test_the_largest_options_compute(method):
    if method not in fc.methods("conv2d"):
        pytest.skip(f"{method} cannot run here")
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 1, 1))
    y = to_host(fc.conv2d(x, w, dilation=2**31 - 1, method=method))
    np.testing.assert_allclose(y, np.einsum("nchw,kc->nkhw", x, w[:, :, 0, 0]), rtol=1e-12)
    pool = method if method in fc.methods("max_pool2d") else "naive"
    p = to_host(fc.max_pool2d(x, 2, stride=2**31 - 1, method=pool))
    np.testing.assert_array_equal(p, x[:, :, :2, :2].max(axis=(2, 3), keepdims=True))


# ---------------------------------------------------------------------------------------------
# 7. empty batch


@pytest.mark.parametrize("method", CONV_METHODS)
def test_empty_batch_conv_forward_and_backward(method):
    if method not in fc.methods("conv2d"):
        pytest.skip(f"{method} cannot run here")
    x = np.zeros((0, 3, 8, 8), np.float32)
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = to_host(fc.conv2d(x, w, np.ones(4, np.float32), method=method))
    assert y.shape == (0, 4, 6, 6) and y.dtype == np.float32
    g = fc.conv2d_backward(np.zeros((0, 4, 6, 6), np.float32), x, w, method=method)
    assert to_host(g.grad_input).shape == (0, 3, 8, 8)
    np.testing.assert_array_equal(to_host(g.grad_weight), np.zeros((4, 3, 3, 3)))
    np.testing.assert_array_equal(to_host(g.grad_bias), np.zeros(4))
    assert to_host(g.grad_weight).dtype == np.float32
    assert fc.conv2d_backward(np.zeros((0, 4, 6, 6)), x, w, method=method,
                              need_weight=False).grad_weight is None


@pytest.mark.parametrize("method", POOL_METHODS)
def test_empty_batch_pool(method):
    if method not in fc.methods("max_pool2d"):
        pytest.skip(f"{method} cannot run here")
    y, i = fc.max_pool2d(np.zeros((0, 3, 8, 8)), 2, return_indices=True, method=method)
    assert to_host(y).shape == to_host(i).shape == (0, 3, 4, 4) and to_host(i).dtype == np.int64
    dx = fc.max_pool2d_backward(np.zeros((0, 3, 4, 4)), np.zeros((0, 3, 4, 4), np.int64),
                                (0, 3, 8, 8), 2, method=method)
    assert to_host(dx).shape == (0, 3, 8, 8)


def test_empty_batch_layers_and_adapters():
    w, b = np.ones((2, 3, 3, 3)), np.zeros(2)
    x = np.zeros((0, 3, 8, 8))
    for layer in (fc.Conv2D(w, b, padding=1), dlfs.Convolution(w, b, pad=1)):
        assert layer.forward(x).shape == (0, 2, 8, 8)
        assert layer.backward(np.zeros((0, 2, 8, 8))).shape == x.shape
        np.testing.assert_array_equal(layer.dW, np.zeros_like(w))
    for pool in (fc.MaxPool2D(2), dlfs.Pooling(2, 2, 2)):
        assert pool.forward(x).shape == (0, 3, 4, 4)
        assert pool.backward(np.zeros((0, 3, 4, 4))).shape == x.shape
    out, cache = cs231n.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    dx, dw, db = cs231n.conv_backward_fast(np.zeros_like(out), cache)
    assert out.shape == (0, 2, 8, 8) and dx.shape == x.shape and not dw.any() and not db.any()
    out, cache = cs231n.max_pool_forward_fast(x, {"pool_height": 2, "pool_width": 2, "stride": 2})
    assert cs231n.max_pool_backward_fast(np.zeros_like(out), cache).shape == x.shape


@pytest.mark.parametrize("shape", [(1, 0, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)])
def test_zero_channels_or_planes_stay_errors(shape):
    with pytest.raises(ValueError, match=r"has an empty dimension \(only the batch"):
        fc.conv2d(np.zeros(shape), np.ones((1, 3, 1, 1)))
    with pytest.raises(ValueError, match="has an empty dimension"):
        fc.max_pool2d(np.zeros(shape), 1)


# ---------------------------------------------------------------------------------------------
# 9. flags are bools, counts are not


@pytest.mark.parametrize("flag", ["need_input", "need_weight", "need_bias"])
@pytest.mark.parametrize("value", ["no", 1, None, np.array([True, False])])
def test_backward_flags_take_only_bools(flag, value):
    x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3))
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got"):
        fc.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, **{flag: value})
    g = fc.conv2d_backward(np.ones((1, 1, 2, 2)), x, w, **{flag: np.bool_(False)})
    assert getattr(g, "grad_" + flag[5:]) is None


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_return_indices_and_ceil_mode_take_only_bools(value):
    with pytest.raises(TypeError, match="return_indices must be a bool"):
        fc.max_pool2d(np.ones((1, 1, 4, 4)), 2, return_indices=value)
    with pytest.raises(TypeError, match="ceil_mode must be a bool"):
        fc.max_pool2d(np.ones((1, 1, 4, 4)), 2, ceil_mode=value)


@pytest.mark.parametrize("value", [True, np.bool_(True), False])
def test_set_num_threads_rejects_bools(value):
    with pytest.raises(TypeError, match="n must be an int"):
        fc.set_num_threads(value)


# ---------------------------------------------------------------------------------------------
# 11. small things


def test_input_shape_errors_name_input_shape():
    with pytest.raises(ValueError, match=r"input_shape=\(2, 3, -8, 8\) has an empty dimension"):
        fc.max_pool2d_backward(np.ones((2, 3, 4, 4)), np.zeros((2, 3, 4, 4), np.int64),
                               (2, 3, -8, 8), 2)
    with pytest.raises(TypeError, match="input_shape must be a tuple of 4 ints"):
        fc.max_pool2d_backward(np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.int64), 5, 2)


def test_backward_before_forward_names_the_class():
    with pytest.raises(RuntimeError, match=r"^Convolution\.backward called before forward"):
        dlfs.Convolution(np.ones((1, 1, 3, 3)), np.zeros(1)).backward(np.ones((1, 1, 3, 3)))
    with pytest.raises(RuntimeError, match=r"^Pooling\.backward called before forward"):
        dlfs.Pooling(2, 2).backward(np.ones((1, 1, 3, 3)))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fc.Conv2D(np.ones((1, 1, 3, 3)), None, stride="a"), TypeError, "stride must be"),
    (lambda: fc.Conv2D(np.ones((1, 1, 3, 3)), None, padding="nope"), ValueError,
     "padding='nope'"),
    (lambda: fc.Conv2D(np.ones((1, 1, 3, 3)), None, dilation=0), ValueError, "dilation must"),
    (lambda: fc.Conv2D(np.ones((1, 1, 3, 3)), None, groups=1.5), TypeError, "groups must"),
    (lambda: fc.Conv2D(np.ones((1, 1, 3, 3)), None, method="fft"), ValueError, "method='fft'"),
    (lambda: fc.MaxPool2D(2, padding=-1), ValueError, "padding must be >= 0"),
    (lambda: fc.MaxPool2D(2, padding=2), ValueError, "at most half of kernel_size"),
    (lambda: fc.MaxPool2D(2, ceil_mode="yes"), TypeError, "ceil_mode must be a bool"),
    (lambda: fc.MaxPool2D(2, method=3), TypeError, "method must be a string"),
    (lambda: dlfs.Convolution(np.ones((1, 1, 3, 3)), None, stride=0), ValueError, "stride must"),
    (lambda: dlfs.Pooling(2, 2, pad=-1), ValueError, "pad must be >= 0"),
    (lambda: dlfs.Pooling(2, 0), ValueError, "must be >= 1"),
])
def test_layers_check_their_options_in_the_constructor(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# 1. a read-only install with no writable home


_READ_ONLY_RUN = """
import sys, tempfile
if {no_tmp}:
    tempfile.tempdir = {blocked!r}      # a file: nothing can be made under it
sys.path.insert(0, {site!r})
import numpy as np
import fastconv as fc
from fastconv.kernels import direct, naive, numba_cache_location, pool
assert fc.__file__.startswith({site!r}), fc.__file__
print("cache:", numba_cache_location())
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
y = fc.conv2d(x, w, method="naive")
np.testing.assert_allclose(fc.conv2d(x, w), y, rtol=1e-10)
np.testing.assert_array_equal(fc.max_pool2d(x, 2, method="naive"), x.reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5)))
print("ok")
"""


@pytest.mark.parametrize("no_tmp", [False, True], ids=["private-tmp-cache", "no-cache"])
def test_numba_methods_run_from_a_read_only_install(tmp_path, no_tmp):
    """The package's __pycache__ and the home directory cannot be created (files stand in the
    way: this holds even for root, unlike permission bits), so Numba has no cache locator."""
    import shutil

    src = os.path.dirname(fc.__file__)
    site = tmp_path / "site"
    shutil.copytree(src, site / "fastconv", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "fastconv" / "kernels" / "__pycache__").write_text("")
    (site / "fastconv" / "__pycache__").write_text("")
    (tmp_path / "home").write_text("")
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    code = _READ_ONLY_RUN.format(site=str(site), blocked=str(blocked), no_tmp=no_tmp)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("ok\n")
    if no_tmp:
        assert "cache: none: no writable location" in out.stdout
    else:
        private = tmp_path / "tmp" / f"fastconv-numba-cache-{os.getuid()}"
        assert f"cache: {private} (the package and the user's cache dir are read-only)" in \
            out.stdout
        assert any(private.iterdir())  # the compiled kernels were cached there
