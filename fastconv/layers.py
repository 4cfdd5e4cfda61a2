"""Layer objects over the public functions: ``forward`` keeps what ``backward`` needs.

A layer here is the plain forward/backward object of NumPy nets (the "Deep Learning from Scratch"
and CS231n style): ``out = layer.forward(x)``, then ``dx = layer.backward(dout)`` returns the
gradient with respect to the input and leaves the parameter gradients on the layer. The layers
call only `fastconv.conv2d`, `fastconv.conv2d_backward`, `fastconv.max_pool2d` and
`fastconv.max_pool2d_backward`, so every method (and ``method="auto"``) works here.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from . import _registry, _validate
from .functional import (FloatArray, IntPair, Padding, conv2d, conv2d_backward, max_pool2d,
                         max_pool2d_backward)

__all__ = ["Conv2D", "MaxPool2D"]


def _as_kept(x: ArrayLike) -> Any:
    """The input as the layer keeps it: arrays (host or device) as given, anything else asarray."""
    if isinstance(x, np.ndarray) or hasattr(x, "__cuda_array_interface__"):
        return x
    return np.asarray(x)


class Conv2D:
    """A 2-D convolution layer (cross-correlation, NCHW) holding its weights and gradients.

    The layer keeps references, never copies: ``W`` and ``b`` are the arrays given (read again at
    every `forward`, so an optimizer that updates them in place, ``layer.W -= lr * layer.dW``, or
    that assigns new arrays to ``layer.W``, is seen), and `forward` keeps the input it was given
    for `backward`, without copying it.

    Parameters
    ----------
    w : ndarray, shape (K, C // groups, R, S)
        Filters, stored as ``W``.
    b : ndarray, shape (K,), or None
        Bias, stored as ``b``.
    stride, padding, dilation, groups, method
        As for `fastconv.conv2d`; ``method="auto"`` picks the fastest method for each shape.

    Attributes
    ----------
    W, b : ndarray
        The parameters (the arrays passed in, not copies).
    dW, db : ndarray or None
        Gradients of the loss with respect to ``W`` and ``b``, set by `backward`; ``db`` stays
        None when ``b`` is None.
    x : ndarray or None
        The input of the last `forward` (a reference).

    See Also
    --------
    fastconv.conv2d, fastconv.conv2d_backward, MaxPool2D

    Notes
    -----
    The output and gradients have the dtype `fastconv.conv2d` gives: the arguments promoted
    together (float32 stays float32 when ``x``, ``W`` and ``b`` are all float32).

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> rng = np.random.default_rng(0)
    >>> conv = fc.Conv2D(0.1 * rng.standard_normal((4, 3, 3, 3)), np.zeros(4), padding=1)
    >>> out = conv.forward(rng.standard_normal((2, 3, 8, 8)))
    >>> dx = conv.backward(np.ones_like(out))
    >>> out.shape, dx.shape, conv.dW.shape, conv.db.shape
    ((2, 4, 8, 8), (2, 3, 8, 8), (4, 3, 3, 3), (4,))
    """

    def __init__(self, w: Any, b: Any, stride: IntPair = 1, padding: Padding = 0,
                 dilation: IntPair = 1, groups: int = 1, method: str = "auto") -> None:
        _validate.conv_options(stride, padding, dilation, groups)
        _registry.check_method("conv2d", method)
        self.W = w
        self.b = b
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.method = method
        self.dW: Optional[FloatArray] = None
        self.db: Optional[FloatArray] = None
        self.x: Any = None
        self._w: Any = None  # the weight array the last forward used

    def _options(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, method=self.method)

    def forward(self, x: ArrayLike) -> FloatArray:
        """Convolve ``x`` of shape (N, C, H, W); keep ``x`` (not a copy) for `backward`."""
        x = _as_kept(x)
        out = conv2d(x, self.W, self.b, **self._options())
        self.x, self._w = x, self.W
        return out

    def backward(self, dout: ArrayLike) -> FloatArray:
        """Return the gradient with respect to the last input; set ``dW`` and ``db``."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        g = conv2d_backward(dout, self.x, self._w, **self._options(),
                            need_bias=self.b is not None)
        self.dW, self.db = g.grad_weight, g.grad_bias
        assert g.grad_input is not None
        return g.grad_input

    def __repr__(self):
        shape = getattr(self.W, "shape", None)
        return (f"{type(self).__name__}(W of shape {shape}, stride={self.stride!r}, "
                f"padding={self.padding!r}, dilation={self.dilation!r}, groups={self.groups!r}, "
                f"method={self.method!r})")


class MaxPool2D:
    """A 2-D max-pool layer (NCHW) that routes gradients through the indices of the maxima.

    `forward` keeps only the input's shape and the int64 indices of each window's maximum, and
    `backward` sends each output gradient to that position (adding where windows overlap).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit ``-inf`` padding, at most half the kernel.
    method : str
        As for `fastconv.max_pool2d`.
    dilation, ceil_mode
        Keyword-only, as for `fastconv.max_pool2d`.

    See Also
    --------
    fastconv.max_pool2d, fastconv.max_pool2d_backward, Conv2D

    Notes
    -----
    Ties go to the first maximum in row-major window order (as PyTorch and ``numpy.argmax``).

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> pool = fc.MaxPool2D(2)
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> pool.forward(x)[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    >>> pool.backward(np.ones((1, 1, 2, 2)))[0, 0]
    array([[0., 0., 0., 0.],
           [0., 1., 0., 1.],
           [0., 0., 0., 0.],
           [0., 1., 0., 1.]])
    """

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None,
                 padding: IntPair = 0, method: str = "auto", *, dilation: IntPair = 1,
                 ceil_mode: bool = False) -> None:
        _validate.pool_options(kernel_size, stride, padding, dilation, ceil_mode)
        _registry.check_method("max_pool2d", method)
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.method = method
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.x_shape: Any = None  # a tuple of 4 ints after forward
        self.indices: Any = None

    def _options(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    ceil_mode=self.ceil_mode, method=self.method)

    def forward(self, x: ArrayLike) -> FloatArray:
        """Max-pool ``x`` of shape (N, C, H, W); keep the indices of the maxima."""
        kept = _as_kept(x)
        out, idx = max_pool2d(kept, self.kernel_size, return_indices=True, **self._options())
        self.x_shape, self.indices = tuple(int(d) for d in kept.shape), idx
        return out

    def backward(self, dout: ArrayLike) -> FloatArray:
        """Return the gradient with respect to the last input."""
        if self.indices is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return max_pool2d_backward(dout, self.indices, self.x_shape, self.kernel_size,
                                   **self._options())

    def __repr__(self):
        return (f"{type(self).__name__}(kernel_size={self.kernel_size!r}, stride={self.stride!r}, "
                f"padding={self.padding!r}, method={self.method!r})")
