"""CI: fastconv installed without a C compiler still works, and says why im2col is missing."""

import subprocess
import sys
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np

    import fastconv as fc

assert any("compiled core was not built" in str(w.message) for w in caught), caught
assert "im2col" not in fc.methods() and {"naive", "direct"} <= set(fc.methods()), fc.methods()
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
np.testing.assert_allclose(fc.conv2d(x, w), fc.conv2d(x, w, method="naive"), rtol=1e-10)
try:
    fc.conv2d(x, w, method="im2col")
except fc.BackendUnavailableError as e:
    assert "could not be built when fastconv was installed" in str(e), e
else:
    raise AssertionError("im2col ran without its compiled core")
info = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastconv", "info"],
                      capture_output=True, text=True, check=True).stdout
assert "WARNING: method 'im2col' cannot run here: the compiled core could not be built" in info
print("fastconv without a C compiler: OK", fc.methods())
