"""Argument checks and normalization: every error names the argument and the values."""

import numpy as np
import pytest

import fastconv as fc
from fastconv import _registry, _validate

X = np.ones((1, 3, 5, 5))
W = np.ones((4, 3, 3, 3))


def spec(x=X, w=W, b=None, stride=1, padding=0, dilation=1, groups=1):
    return _validate.conv2d(x, w, b, stride, padding, dilation, groups)[3]


@pytest.mark.parametrize("padding,want", [
    (0, ((0, 0), (0, 0))),
    (2, ((2, 2), (2, 2))),
    ((1, 2), ((1, 1), (2, 2))),
    (((1, 0), (0, 3)), ((1, 0), (0, 3))),
    ("valid", ((0, 0), (0, 0))),
    ("full", ((2, 2), (2, 2))),
    ("same", ((1, 1), (1, 1))),
    (np.int64(1), ((1, 1), (1, 1))),
])
def test_padding_forms(padding, want):
    assert spec(padding=padding).padding == want


@pytest.mark.parametrize("h,k,s,d,want_pad,want_out", [
    (5, 3, 1, 1, (1, 1), 5),
    (6, 4, 1, 1, (1, 2), 6),    # odd total: the extra pixel at the bottom
    (7, 3, 2, 1, (1, 1), 4),    # ceil(7 / 2)
    (8, 3, 2, 1, (0, 1), 4),
    (8, 3, 3, 2, (1, 2), 3),    # the dilated kernel spans 5
    (1, 3, 2, 1, (1, 1), 1),
    (10, 1, 3, 1, (0, 0), 4),
])
def test_same_is_keras(h, k, s, d, want_pad, want_out):
    sp = spec(np.ones((1, 1, h, h)), np.ones((1, 1, k, k)), stride=s, dilation=d, padding="same")
    assert sp.padding == (want_pad, want_pad)
    assert sp.out_hw == (want_out, want_out)


def test_output_size_formula():
    sp = spec(np.ones((2, 3, 11, 9)), np.ones((4, 3, 3, 2)), stride=(2, 3), dilation=(2, 1),
              padding=((1, 2), (0, 1)))
    assert sp.out_hw == ((11 + 3 - 2 * 2 - 1) // 2 + 1, (9 + 1 - 1 * 1 - 1) // 3 + 1)
    assert sp.out_shape == (2, 4, *sp.out_hw)
    assert sp.flops == 2 * 2 * 4 * 3 * 3 * 2 * sp.out_hw[0] * sp.out_hw[1]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(padding="foo"), ValueError, r"padding='foo' is not one of \('valid', 'same', 'full'\)"),
    (dict(padding=-1), ValueError, "padding must be >= 0, got -1"),
    (dict(padding=1.5), TypeError, "padding must be an int, a pair"),
    (dict(padding=((1, 2), (3,))), TypeError, "padding must be"),
    (dict(stride=0), ValueError, "stride must be >= 1, got 0"),
    (dict(stride=1.5), TypeError, "stride must be an int or a pair of ints, got 1.5"),
    (dict(stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair of ints, got \(1, 2"),
    (dict(stride="2"), TypeError, "stride must be an int or a pair"),
    (dict(stride=True), TypeError, "stride must be an int or a pair"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (dict(groups=0), ValueError, "groups must be >= 1, got 0"),
    (dict(groups=2.0), TypeError, "groups must be an int, got 2.0"),
    (dict(groups=2), ValueError, r"groups=2 must divide the output channels, got weight of "
                                 r"shape \(3, 3, 3, 3\)"),
])
def test_conv_option_errors(kwargs, exc, match):
    w = np.ones((3, 3, 3, 3)) if kwargs.get("groups") == 2 else W
    with pytest.raises(exc, match=match):
        fc.conv2d(X, w, **kwargs)


def test_groups_channel_mismatch_message():
    with pytest.raises(ValueError, match=r"groups=2 and weight of shape \(4, 3, 3, 3\) expect x "
                                         r"with 6 channels, got x of shape \(1, 3, 5, 5\)"):
        fc.conv2d(X, W, groups=2)


@pytest.mark.parametrize("x,w,b,exc,match", [
    (np.ones((3, 5, 5)), W, None, ValueError, r"x must be 4-D, got x of shape \(3, 5, 5\)"),
    (X, np.ones((4, 3, 3)), None, ValueError, r"w must be 4-D, got w of shape \(4, 3, 3\)"),
    (X, W, np.ones(3), ValueError, r"b must have shape \(4,\) for weight of shape"),
    (X, W, np.ones((4, 1)), ValueError, r"b must be 1-D"),
    (X, np.ones((4, 2, 3, 3)), None, ValueError, r"groups=1 and weight of shape \(4, 2, 3, 3\) "
                                                 r"expect x with 2 channels"),
    (X, np.ones((4, 3, 7, 3)), None, ValueError, "output would be empty"),
    (np.ones((1, 0, 5, 5)), W, None, ValueError, "has an empty dimension"),
    (X.astype(complex), W, None, TypeError, "x has dtype complex128; fastconv computes in"),
    (X, W.astype(object), None, TypeError, "w has dtype object"),
    (X, W, np.array(["a"] * 4), TypeError, "b has dtype <U1"),
    (X, W.astype(np.longdouble), None, TypeError, "w has dtype float128"),
    ("x", W, None, TypeError, "x must be an array, got str"),
    (None, W, None, TypeError, "x must be an array, got NoneType"),
])
def test_array_errors(x, w, b, exc, match):
    with pytest.raises(exc, match=match):
        fc.conv2d(x, w, b)


def test_backward_errors():
    g = np.ones((1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape "
                                         r"\(1, 4, 3, 3\) .* got grad_output of shape \(1, 4, 5, 5\)"):
        fc.conv2d_backward(np.ones((1, 4, 5, 5)), X, W)
    with pytest.raises(TypeError, match="grad_output has dtype complex128"):
        fc.conv2d_backward(g.astype(complex), X, W)
    with pytest.raises(ValueError, match="padding='nope'"):
        fc.conv2d_backward(g, X, W, padding="nope")


def test_method_errors():
    with pytest.raises(ValueError, match=r"method='fft' is not one of \('auto', 'naive'"):
        fc.conv2d(X, W, method="fft")
    with pytest.raises(TypeError, match="method must be a string"):
        fc.conv2d(X, W, method=None)
    with pytest.raises(ValueError, match="method='bogus'"):
        fc.max_pool2d(X, 2, method="bogus")


def test_unavailable_method_raises_backend_error(monkeypatch):
    _registry.register("conv2d", "test-missing", "fastconv.kernels.naive:conv2d_forward",
                       unavailable=lambda: "no such hardware")
    try:
        assert "test-missing" not in fc.methods()
        with pytest.raises(fc.BackendUnavailableError,
                           match=r"method='test-missing' cannot run here: no such hardware; see "
                                 r"`python -m fastconv info`"):
            fc.conv2d(X, W, method="test-missing")
        assert issubclass(fc.BackendUnavailableError, RuntimeError)
    finally:
        _registry.unregister("conv2d", "test-missing")


def test_methods_lists_naive_and_auto_never_comes_up_empty():
    assert "naive" in fc.methods()
    for op in _registry.OPS:
        assert "naive" in fc.methods(op)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=2.5), TypeError, "kernel_size must be an int or a pair of ints, got 2.5"),
    (dict(kernel_size=2, stride=0), ValueError, "stride must be >= 1, got 0"),
    (dict(kernel_size=2, padding=2), ValueError, r"padding=\(2, 2\) must be at most half of "
                                                 r"kernel_size=\(2, 2\)"),
    (dict(kernel_size=2, padding=-1), ValueError, "padding must be >= 0"),
    (dict(kernel_size=2, dilation=0), ValueError, "dilation must be >= 1"),
    (dict(kernel_size=2, ceil_mode="yes"), TypeError, "ceil_mode must be a bool, got 'yes'"),
    (dict(kernel_size=7), ValueError, r"kernel_size=\(7, 7\) with dilation=\(1, 1\) does not fit "
                                      r"x of shape \(1, 3, 5, 5\)"),
])
def test_pool_option_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fc.max_pool2d(X, **kwargs)


def test_pool_backward_errors():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    out, idx = fc.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape "
                                         r"\(1, 2, 2, 2\)"):
        fc.max_pool2d_backward(np.ones((1, 2, 3, 3)), idx, x.shape, 2)
    with pytest.raises(ValueError, match=r"indices must have grad_output's shape"):
        fc.max_pool2d_backward(out, idx[:, :1], x.shape, 2)
    with pytest.raises(TypeError, match="indices must be an integer array, got dtype float64"):
        fc.max_pool2d_backward(out, idx.astype(float), x.shape, 2)
    bad = idx.copy()
    bad[0, 0, 0, 0] = 16
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        fc.max_pool2d_backward(out, bad, x.shape, 2)
    bad[0, 0, 0, 0] = -1
    for dt in (np.int64, np.int32, np.int8):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\).*\[-1, "):
            fc.max_pool2d_backward(out, bad.astype(dt), x.shape, 2)
    big = idx.astype(np.uint64)
    big[0, 0, 0, 0] = 2**63 + 1  # negative once cast to int64: must still be refused
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        fc.max_pool2d_backward(out, big, x.shape, 2)
    for dt in (np.int32, np.uint16):  # other integer dtypes in range are accepted
        np.testing.assert_array_equal(fc.max_pool2d_backward(out, idx.astype(dt), x.shape, 2),
                                      fc.max_pool2d_backward(out, idx, x.shape, 2))
    with pytest.raises(ValueError, match="input_shape must have 4 entries"):
        fc.max_pool2d_backward(out, idx, (2, 4, 4), 2)
    with pytest.raises(TypeError, match="input_shape must be a tuple of 4 ints"):
        fc.max_pool2d_backward(out, idx, (1, 2, 4.0, 4), 2)


def test_pool_stride_defaults_to_kernel():
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 6))
    assert fc.max_pool2d(x, 3).shape == (1, 1, 2, 2)
    assert fc.max_pool2d(x, (3, 2)).shape == (1, 1, 2, 3)


def test_specs_are_frozen_and_hashable():
    sp = spec(padding="same")
    assert hash(sp) == hash(spec(padding="same"))
    with pytest.raises(AttributeError):
        sp.groups = 2


def test_set_num_threads():
    n = fc.get_num_threads()
    try:
        fc.set_num_threads(1)
        assert fc.get_num_threads() == 1
        x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
        np.testing.assert_allclose(fc.conv2d(x, W), fc.conv2d(x, W, method="naive"))
    finally:
        fc.set_num_threads(n)
    assert fc.get_num_threads() == n
    with pytest.raises(ValueError, match="n must be in"):
        fc.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        fc.set_num_threads(1.5)


def test_public_names():
    for name in ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "methods",
                 "set_num_threads", "get_num_threads", "BackendUnavailableError"]:
        assert name in fc.__all__ and hasattr(fc, name)


@pytest.mark.parametrize("x,w,b,match", [
    (np.ones((8, 32, 32, 3)), np.ones((16, 3, 3, 3)), None,
     r"expect x with 3 channels, got x of shape \(8, 32, 32, 3\); x looks channels-last "
     r"\(N, H, W, C\): pass layout='NHWC' or x.transpose\(0, 3, 1, 2\)"),
    (np.ones((8, 3, 32, 32)), np.ones((3, 3, 3, 16)), np.ones(16),
     r"b must have shape \(3,\) for weight of shape \(3, 3, 3, 16\), got \(16,\); weight of "
     r"shape \(3, 3, 3, 16\) looks like \(R, S, C // groups, K\) .*HWIO"),
    (np.ones((2, 28, 28, 1)), np.ones((3, 3, 1, 8)), None,
     r"x and the weight look channels-last, \(N, H, W, C\) and \(R, S, C // groups, K\)"),
    (np.ones((1, 3, 5, 5)), np.ones((4, 2, 3, 3)), None,
     r"expect x with 2 channels, got x of shape \(1, 3, 5, 5\)$"),  # no hint: not a layout
])
def test_layout_mistakes_get_a_hint(x, w, b, match):
    with pytest.raises(ValueError, match=match):
        fc.conv2d(x, w, b)


def test_groups_that_do_not_divide_the_channels_say_so():
    with pytest.raises(ValueError, match=r"expect x with 6 channels, got x of shape "
                                         r"\(1, 3, 5, 5\): groups=2 must divide x's 3 channels"):
        fc.conv2d(X, W, groups=2)


@pytest.mark.parametrize("mode", ["SAME", "Valid", "FULL"])
def test_padding_strings_in_any_case(mode):
    np.testing.assert_array_equal(fc.conv2d(X, W, padding=mode),
                                  fc.conv2d(X, W, padding=mode.lower()))
