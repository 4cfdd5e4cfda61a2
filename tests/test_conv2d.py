"""conv2d forward: every registered method against scipy.signal, over dtypes and options."""

import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastconv as fc
from helpers import (CONV_CASES, DTYPES, checked, einsum_conv2d, is_cuda, method_case_params,
                     method_params, scipy_conv2d, takes, to_host, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,case", method_case_params("conv2d"))
def test_forward_matches_scipy(method, case, dtype):
    x, w, b = case.arrays(dtype, n=1 if is_cuda(method) else None)
    got = to_host(checked(fc.conv2d, x, w, b, **case.conf, method=method))
    want = scipy_conv2d(x, w, b, **case.conf)
    assert got.shape == want.shape
    assert got.dtype == dtype
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, want, **tol(dtype, case.reduction))


@pytest.mark.parametrize("method", method_params("conv2d"))
def test_forward_matches_convolve_of_flipped_kernel(method):
    case = next(c for c in CONV_CASES[1:] + CONV_CASES[:1]
                if takes("conv2d", method, c.x_shape, c.w_shape, c.conf))
    x, w, b = case.arrays(np.float64, seed=3, n=1)
    want = scipy_conv2d(x, w, b, **case.conf, flip=True)
    got = to_host(fc.conv2d(x, w, b, **case.conf, method=method))
    np.testing.assert_allclose(got, want, **tol(np.float64))


@pytest.mark.parametrize("mode", ["valid", "same", "full"])
@pytest.mark.parametrize("method", method_params("conv2d"))
def test_single_channel_is_scipy_correlate2d(method, mode):
    from scipy import signal

    rng = np.random.default_rng(5)
    img, ker = rng.standard_normal((7, 6)), rng.standard_normal((3, 3))
    got = to_host(fc.conv2d(img[None, None], ker[None, None], padding=mode, method=method))
    np.testing.assert_allclose(got[0, 0], signal.correlate2d(img, ker, mode), **tol(np.float64))


def test_einsum_reference_agrees_with_scipy():
    """The fast reference used for numerical gradients is itself checked against scipy."""
    for case in CONV_CASES:
        x, w, b = case.arrays(np.float64)
        np.testing.assert_allclose(einsum_conv2d(x, w, b, **case.conf),
                                   scipy_conv2d(x, w, b, **case.conf), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", method_params("conv2d"))
def test_methods_agree_with_naive_on_random_problems(method):
    rng = np.random.default_rng(11)
    done = 0
    while done < (3 if is_cuda(method) else 8):  # problems the method takes (all, mostly)
        n, groups = int(rng.integers(1, 3)), int(rng.choice([1, 2]))
        cg, kg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        h, w_ = (int(v) for v in rng.integers(4, 9, 2))
        r, s = (int(v) for v in rng.integers(1, 4, 2))
        conf = dict(stride=tuple(int(v) for v in rng.integers(1, 3, 2)), padding=int(r // 2),
                    groups=groups)
        if not takes("conv2d", method, (n, cg * groups, h, w_), (kg * groups, cg, r, s), conf):
            continue
        done += 1
        x = rng.standard_normal((n, cg * groups, h, w_))
        w = rng.standard_normal((kg * groups, cg, r, s))
        want = fc.conv2d(x, w, **conf, method="naive")
        np.testing.assert_allclose(to_host(fc.conv2d(x, w, **conf, method=method)), want,
                                   **tol(np.float64))


# ---------------------------------------------------------------------------------------------
# dtypes, layouts and the caller's arrays


@pytest.mark.parametrize("method", method_params("conv2d"))
@pytest.mark.parametrize("xdt,wdt,want", [
    (np.int32, np.int64, np.float64),
    (np.bool_, np.float32, np.float32),
    (np.float16, np.float16, np.float32),
    (np.float16, np.float64, np.float64),
    (np.uint8, np.float32, np.float32),  # np.result_type: uint8 fits in float32
    (np.int32, np.float32, np.float64),
], ids=["int-int", "bool-f32", "f16-f16", "f16-f64", "u8-f32", "i32-f32"])
def test_dtype_promotion(method, xdt, wdt, want):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 2, 6, 5)) * 3).astype(xdt)
    w = (rng.standard_normal((3, 2, 3, 3)) * 3).astype(wdt)
    got = to_host(fc.conv2d(x, w, padding=1, method=method))
    assert got.dtype == want
    np.testing.assert_allclose(got, scipy_conv2d(x.astype(np.float64), w.astype(np.float64),
                                                 padding=1), **tol(want, 18))


@pytest.mark.parametrize("method", method_params("conv2d"))
def test_noncontiguous_and_fortran_inputs(method):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((2, 6, 9, 14))
    x = base[:, ::2, :, ::2]  # strided view
    wf = np.asfortranarray(rng.standard_normal((4, 3, 3, 3)))
    b = rng.standard_normal(8)[::2]
    conf = dict(stride=(1, 2), padding="same")
    if not takes("conv2d", method, x.shape, wf.shape, conf):
        conf["stride"] = 1  # winograd: stride 1 only
    got = to_host(checked(fc.conv2d, x, wf, b, **conf, method=method))
    np.testing.assert_allclose(got, scipy_conv2d(x, wf, b, **conf), **tol(np.float64))
    assert got.flags.c_contiguous


@pytest.mark.parametrize("method", method_params("conv2d"))
def test_list_inputs_are_accepted(method):
    x = np.arange(2 * 5 * 5, dtype=float).reshape(1, 2, 5, 5) / 7
    w = np.linspace(-1, 1, 2 * 2 * 9).reshape(2, 2, 3, 3)
    got = to_host(fc.conv2d(x.tolist(), w.tolist(), [0.5, -0.5], method=method))
    np.testing.assert_allclose(got, scipy_conv2d(x, w, [0.5, -0.5]), **tol(np.float64))


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, kg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same", "full"]),
        st.integers(0, 2),
        st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                  st.tuples(st.integers(0, 2), st.integers(0, 2))),
    ))
    seed = draw(st.integers(0, 2**16))
    return (draw(st.integers(1, 2)), cg * groups, h, w), (kg * groups, cg, r, s), dict(
        stride=stride, dilation=dilation, padding=padding, groups=groups), seed


def _fits(x_shape, w_shape, conf):
    from helpers import ref_padding

    pad = ref_padding(conf["padding"], x_shape[2:], w_shape[2:], conf["stride"],
                      conf["dilation"])
    return all(size + lo + hi >= d * (k - 1) + 1 for size, (lo, hi), k, d in
               zip(x_shape[2:], pad, w_shape[2:], conf["dilation"]))


_CPU_METHODS = [m for m in fc.methods("conv2d") if not m.startswith("cuda")]


@settings(deadline=None, max_examples=40)
@given(problem=conv_problems(), method=st.sampled_from(_CPU_METHODS))
def test_property_matches_scipy(problem, method):
    x_shape, w_shape, conf, seed = problem
    assume(_fits(x_shape, w_shape, conf))
    assume(takes("conv2d", method, x_shape, w_shape, conf))
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    np.testing.assert_allclose(fc.conv2d(x, w, **conf, method=method),
                               scipy_conv2d(x, w, **conf), **tol(np.float64))


@settings(deadline=None, max_examples=40)
@given(h=st.integers(1, 4), w=st.integers(1, 4), extra=st.integers(1, 3),
       dilation=st.integers(1, 2), padding=st.integers(0, 1), axis=st.integers(0, 1))
def test_property_kernel_larger_than_input_raises(h, w, extra, dilation, padding, axis):
    """A kernel whose dilated span exceeds the padded input along one axis gives no output."""
    size = (h, w)[axis] + 2 * padding + extra  # the span it must reach
    k = -(-(size - 1) // dilation) + 1          # smallest kernel spanning at least `size`
    kshape = (k, 1) if axis == 0 else (1, k)
    with pytest.raises(ValueError, match="output would be empty"):
        fc.conv2d(np.ones((1, 1, h, w)), np.ones((1, 1, *kshape)), padding=padding,
                  dilation=dilation)


# ---------------------------------------------------------------------------------------------
# threads


@pytest.mark.parametrize("method", [m for m in method_params("conv2d") if "cuda" not in m.id])
def test_concurrent_calls_from_python_threads(method):
    """Several Python threads calling at once (needs a thread-safe Numba threading layer)."""
    rng = np.random.default_rng(8)
    problems = [(rng.standard_normal((4, 6, 16, 16)).astype(np.float32),
                 rng.standard_normal((8, 6, 3, 3)).astype(np.float32)) for _ in range(4)]
    want = [fc.conv2d(x, w, padding=1, method=method) for x, w in problems]
    got = [[None] * 5 for _ in problems]
    errors = []

    def work(i):
        try:
            for rep in range(5):
                got[i][rep] = fc.conv2d(*problems[i], padding=1, method=method)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(problems)):
        for rep in range(5):
            np.testing.assert_array_equal(got[i][rep], want[i])
