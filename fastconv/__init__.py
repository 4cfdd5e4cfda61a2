"""fastconv: fast 2-D convolution and max-pool kernels for NumPy neural nets."""

from ._policy import autotune
from ._registry import BackendUnavailableError, methods
from ._threads import get_num_threads, set_num_threads
from ._version import __version__
from .functional import (choose_method, conv2d, conv2d_backward, max_pool2d,
                         max_pool2d_backward)
from .layers import Conv2D, MaxPool2D

__all__ = [
    "BackendUnavailableError",
    "Conv2D",
    "MaxPool2D",
    "autotune",
    "choose_method",
    "conv2d",
    "conv2d_backward",
    "get_num_threads",
    "max_pool2d",
    "max_pool2d_backward",
    "methods",
    "set_num_threads",
    "__version__",
]
