"""The register-tile micro-kernel (fastconv.kernels._simd.tile4) against NumPy, in both dtypes,
on unaligned bases, odd strides and offset tables, and an empty reduction."""

import numpy as np
import pytest
from numba import njit

from fastconv.kernels._simd import lanes, tile4


@njit
def _call(src, ts, off, r0, r1, w, wb, ws, out, qs):
    tile4(src, ts[0], ts[1], ts[2], ts[3], off, r0, r1, w, wb, ws, out, qs[0], qs[1], qs[2],
          qs[3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r0,r1", [(0, 7), (2, 5), (3, 3)])
def test_tile4_matches_numpy(dtype, r0, r1):
    rng = np.random.default_rng(r1)
    nl = lanes(np.dtype(dtype))
    src = rng.standard_normal(300).astype(dtype)
    off = rng.integers(0, 200, 7).astype(np.uint64)
    ts, qs = np.array([1, 13, 40, 77]), np.array([3, 3 + nl + 5, 90, 150])
    wb, ws = 5, nl + 3
    w = rng.standard_normal(wb + 7 * ws + nl).astype(dtype)
    out = rng.standard_normal(200).astype(dtype)
    want = out.copy()
    for t, q in zip(ts, qs):
        for r in range(r0, r1):
            want[q:q + nl] += src[t + int(off[r])] * w[wb + r * ws:wb + r * ws + nl]
    untouched = np.ones(200, bool)
    for q in qs:
        untouched[q:q + nl] = False
    before = out.copy()
    _call(src, ts, off, r0, r1, w, wb, ws, out, qs)
    np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-5 if dtype == np.float32 else 1e-13)
    np.testing.assert_array_equal(out[untouched], before[untouched])
