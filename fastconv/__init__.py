"""fastconv: fast 2-D convolution and pooling kernels for NumPy neural nets."""

import os as _os
import sys as _sys

# Before anything loads NumPy: its OpenBLAS keeps its threads spinning for about 0.1 s after
# every call (2**28 cycles), which on few cores takes a core from the fastconv call that follows
# (README, "Threads"). OpenBLAS reads this once, when it is loaded, so it only takes effect when
# fastconv is imported before NumPy; a value the user set is kept.
_SET_BLAS_TIMEOUT = "numpy" not in _sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in _os.environ
if _SET_BLAS_TIMEOUT:
    _os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"

from ._policy import autotune
from ._registry import BackendUnavailableError, methods
from ._threads import get_num_threads, set_num_threads
from ._version import __version__
from .functional import (adaptive_avg_pool2d, adaptive_avg_pool2d_backward, avg_pool2d,
                         avg_pool2d_backward, choose_method, conv2d, conv2d_backward,
                         conv_transpose2d, conv_transpose2d_backward, max_pool2d,
                         max_pool2d_backward)
from .layers import AdaptiveAvgPool2D, AvgPool2D, Conv2D, ConvTranspose2D, MaxPool2D

__all__ = [
    "AdaptiveAvgPool2D",
    "AvgPool2D",
    "BackendUnavailableError",
    "Conv2D",
    "ConvTranspose2D",
    "MaxPool2D",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "autotune",
    "avg_pool2d",
    "avg_pool2d_backward",
    "choose_method",
    "conv2d",
    "conv2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "get_num_threads",
    "max_pool2d",
    "max_pool2d_backward",
    "methods",
    "set_num_threads",
    "__version__",
]
