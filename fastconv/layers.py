"""Layer objects over the public functions: ``forward`` keeps what ``backward`` needs.

A layer here is the plain forward/backward object of NumPy nets (the "Deep Learning from Scratch"
and CS231n style): ``out = layer.forward(x)``, then ``dx = layer.backward(dout)`` returns the
gradient with respect to the input and leaves the parameter gradients on the layer. The layers
call only the public functions (`fastconv.conv2d`, `fastconv.conv2d_backward`, ...), so every
method (and ``method="auto"``) and both layouts work here.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike

from . import _registry, _validate
from .functional import (FloatArray, IntPair, Padding, adaptive_avg_pool2d,
                         adaptive_avg_pool2d_backward, avg_pool2d, avg_pool2d_backward, conv2d,
                         conv2d_backward, conv_transpose2d, conv_transpose2d_backward, max_pool2d,
                         max_pool2d_backward)

__all__ = ["Conv2D", "ConvTranspose2D", "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D"]


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
    layout : {"NCHW", "NHWC"}
        Keyword-only. ``"NHWC"``: inputs and outputs channels-last and ``w`` of shape
        ``(R, S, C // groups, K)`` (Keras).

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

    _forward: Any = staticmethod(conv2d)
    _backward: Any = staticmethod(conv2d_backward)

    def __init__(self, w: Any, b: Any, stride: IntPair = 1, padding: Padding = 0,
                 dilation: IntPair = 1, groups: int = 1, method: str = "auto", *,
                 layout: str = "NCHW") -> None:
        _validate.conv_options(stride, padding, dilation, groups)
        self._setup(w, b, method, layout, stride=stride, padding=padding, dilation=dilation,
                    groups=groups)

    def _setup(self, w, b, method, layout, **options):
        _registry.check_method(self._forward.__name__, method)
        self.W = w
        self.b = b
        for name, value in options.items():
            setattr(self, name, value)
        self._names = tuple(options)
        self.method = method
        self.layout = _validate.layout(layout)
        self.dW: Optional[FloatArray] = None
        self.db: Optional[FloatArray] = None
        self.x: Any = None
        self._w: Any = None  # the weight array the last forward used

    def _options(self):
        return dict({n: getattr(self, n) for n in self._names}, method=self.method,
                    layout=self.layout)

    def forward(self, x: ArrayLike) -> FloatArray:
        """Convolve ``x`` (N, C, H, W) (or NHWC); keep ``x`` (not a copy) for `backward`."""
        x = _as_kept(x)
        out = self._forward(x, self.W, self.b, **self._options())
        self.x, self._w = x, self.W
        return out

    def backward(self, dout: ArrayLike) -> FloatArray:
        """Return the gradient with respect to the last input; set ``dW`` and ``db``."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        g = self._backward(dout, self.x, self._w, **self._options(),
                           need_bias=self.b is not None)
        self.dW, self.db = g.grad_weight, g.grad_bias
        assert g.grad_input is not None
        return g.grad_input

    def __repr__(self):
        shape = getattr(self.W, "shape", None)
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}(W of shape {shape}, {options})"


class ConvTranspose2D(Conv2D):
    """A 2-D transposed convolution layer (PyTorch's ``ConvTranspose2d``), holding its weights
    and gradients as `Conv2D` does.

    Parameters
    ----------
    w : ndarray, shape (C_in, C_out // groups, R, S)
        Filters (PyTorch's layout; ``(R, S, C_out // groups, C_in)`` with ``layout="NHWC"``).
    b : ndarray, shape (C_out,), or None
    stride, padding, output_padding, groups, dilation, method
        As for `fastconv.conv_transpose2d`.
    layout : {"NCHW", "NHWC"}
        Keyword-only.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> up = fc.ConvTranspose2D(np.ones((4, 2, 2, 2)), np.zeros(2), stride=2)
    >>> out = up.forward(np.ones((1, 4, 3, 3)))
    >>> dx = up.backward(np.ones_like(out))
    >>> out.shape, dx.shape, up.dW.shape
    ((1, 2, 6, 6), (1, 4, 3, 3), (4, 2, 2, 2))
    """

    _forward = staticmethod(conv_transpose2d)
    _backward = staticmethod(conv_transpose2d_backward)

    def __init__(self, w: Any, b: Any, stride: IntPair = 1, padding: IntPair = 0,
                 output_padding: IntPair = 0, groups: int = 1, dilation: IntPair = 1,
                 method: str = "auto", *, layout: str = "NCHW") -> None:
        _validate.transpose_options(stride, padding, output_padding, groups, dilation)
        self._setup(w, b, method, layout, stride=stride, padding=padding,
                    output_padding=output_padding, groups=groups, dilation=dilation)


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
    dilation, ceil_mode, layout
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
                 ceil_mode: bool = False, layout: str = "NCHW") -> None:
        _validate.pool_options(kernel_size, stride, padding, dilation, ceil_mode)
        _registry.check_method("max_pool2d", method)
        self.layout = _validate.layout(layout)
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
                    ceil_mode=self.ceil_mode, method=self.method, layout=self.layout)

    def forward(self, x: ArrayLike) -> FloatArray:
        """Max-pool ``x`` (N, C, H, W) (or NHWC); keep the indices of the maxima."""
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
                f"padding={self.padding!r}, method={self.method!r}, layout={self.layout!r})")


class _AvgPool:
    """What the average-pool layers share: `forward` keeps only the input's shape."""

    _forward: Any
    _backward: Any

    def __init__(self, method, layout, **options):
        _registry.check_method(self._forward.__name__, method)
        for name, value in options.items():
            setattr(self, name, value)
        self._names = tuple(options)
        self.method = method
        self.layout = _validate.layout(layout)
        self.x_shape: Any = None  # a tuple of 4 ints after forward

    def _options(self):
        return dict({n: getattr(self, n) for n in self._names}, method=self.method,
                    layout=self.layout)

    def forward(self, x: ArrayLike) -> FloatArray:
        """Pool ``x`` (N, C, H, W) (or NHWC); keep its shape for `backward`."""
        kept = _as_kept(x)
        out = self._forward(kept, **self._options())
        self.x_shape = tuple(int(d) for d in kept.shape)
        return out

    def backward(self, dout: ArrayLike) -> FloatArray:
        """Return the gradient with respect to the last input."""
        if self.x_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._backward(dout, self.x_shape, **self._options())

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"


class AvgPool2D(_AvgPool):
    """A 2-D average-pool layer (PyTorch's ``AvgPool2d``).

    Parameters
    ----------
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, method
        As for `fastconv.avg_pool2d`.
    layout : {"NCHW", "NHWC"}
        Keyword-only.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> pool = fc.AvgPool2D(2)
    >>> pool.forward(np.arange(16.0).reshape(1, 1, 4, 4))[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    >>> float(pool.backward(np.ones((1, 1, 2, 2))).sum())
    4.0
    """

    _forward = staticmethod(avg_pool2d)
    _backward = staticmethod(avg_pool2d_backward)

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None,
                 padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Optional[int] = None, method: str = "auto", *,
                 layout: str = "NCHW") -> None:
        _validate.avg_options(kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override)
        super().__init__(method, layout, kernel_size=kernel_size, stride=stride,
                         padding=padding, ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad, divisor_override=divisor_override)


class AdaptiveAvgPool2D(_AvgPool):
    """Average pooling to a fixed output size (PyTorch's ``AdaptiveAvgPool2d``);
    ``AdaptiveAvgPool2D(1)`` is global average pooling.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> gap = fc.AdaptiveAvgPool2D(1)
    >>> gap.forward(np.ones((2, 8, 7, 7))).shape
    (2, 8, 1, 1)
    """

    _forward = staticmethod(adaptive_avg_pool2d)
    _backward = staticmethod(adaptive_avg_pool2d_backward)

    def __init__(self, output_size: Any, method: str = "auto", *,
                 layout: str = "NCHW") -> None:
        _validate.output_size(output_size)
        super().__init__(method, layout, output_size=output_size)
