"""Make `python -m pytest` in a checkout test the installed fastconv.

`python -m` puts the checkout first on sys.path. Without an in-place build its fastconv has no
compiled Cython core, so after `pip install .` (the README's way) the installed copy is the one to
test. A checkout built in place (`pip install -e .`) is tested as it is.
"""

import glob
import importlib.util
import os
import sys

_root = os.path.dirname(os.path.abspath(__file__))
_built = glob.glob(os.path.join(_root, "fastconv", "kernels", "_im2col.*.so")) + glob.glob(
    os.path.join(_root, "fastconv", "kernels", "_im2col.*.pyd"))
if not _built:
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    if importlib.util.find_spec("fastconv") is None:  # not installed: test the checkout itself
        sys.path[:] = _saved
