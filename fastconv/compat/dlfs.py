"""Drop-in `Convolution` and `Pooling` layers for "Deep Learning from Scratch" nets.

The book (Koki Saitoh, O'Reilly Japan 2016; code in ``common/layers.py``) builds its
``SimpleConvNet`` from layer objects with ``forward(x)`` and ``backward(dout)`` that keep their
parameters and gradients as attributes. The two classes here have the same constructors,
attributes and results, so a net written for the book changes only an import::

    from fastconv.compat.dlfs import Convolution, Pooling   # instead of common.layers

and its ``SimpleConvNet``, optimizers and training scripts run unchanged, with the same numbers up
to floating-point rounding. The work is done by the public functions of fastconv
(``method="auto"`` by default), not by im2col matrices: the layers keep no ``col`` / ``col_W``.

Two deliberate differences from the book: results keep the caller's dtype (the book's im2col
allocates float64, so its layers return float64 even for float32 input; here float32 in gives
float32 out), and outputs are C-contiguous arrays rather than transposed views.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _registry, _validate
from ..functional import max_pool2d, max_pool2d_backward
from ..layers import Conv2D

__all__ = ["Convolution", "Pooling"]


class Convolution(Conv2D):
    """The book's convolution layer: ``Convolution(W, b, stride=1, pad=0)``.

    Parameters
    ----------
    W : ndarray, shape (FN, C, FH, FW)
        Filters. Kept by reference and read at every `forward`, so the book's optimizers, which
        update ``params[key]`` in place, train this layer.
    b : ndarray, shape (FN,)
        Bias.
    stride : int
    pad : int
        Zero padding on every side (as the book's ``im2col``).
    method : str, keyword-only
        The fastconv method (see `fastconv.conv2d`); ``"auto"`` picks the fastest.

    Attributes
    ----------
    W, b, stride, pad
        As given.
    x : ndarray
        The input of the last `forward` (a reference, not a copy).
    dW, db : ndarray
        Gradients set by `backward`, shaped like ``W`` and ``b``.

    Notes
    -----
    ``forward`` returns ``out[n, f] = b[f] + sum_c correlate2d(pad(x)[n, c], W[f, c])`` sampled
    every ``stride`` pixels: the book's ``im2col(x) @ W.reshape(FN, -1).T + b``, with output size
    ``1 + (H + 2*pad - FH) // stride``. ``backward`` returns ``dx`` and sets ``dW``, ``db``: the
    book's ``col2im(dout @ col_W.T)``, ``col.T @ dout`` and ``dout.sum()``.
    """

    def __init__(self, W, b, stride=1, pad=0, *, method="auto"):
        super().__init__(W, b, stride=stride, padding=pad, method=method)

    @property
    def pad(self):
        return self.padding

    @pad.setter
    def pad(self, value):
        self.padding = value


def _check_pad(p):
    """The book's ``pad``: one int >= 0."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)):
        raise TypeError(f"pad must be an int, got {p!r}")
    if p < 0:
        raise ValueError(f"pad must be >= 0, got {p!r}")
    return int(p)


class Pooling:
    """The book's max-pooling layer: ``Pooling(pool_h, pool_w, stride=1, pad=0)``.

    Reproduces the book exactly, including two points where it differs from
    `fastconv.MaxPool2D` and PyTorch:

    - **padding is zeros, not -inf**: the book's ``im2col`` pads with ``0``, so a window that
      overlaps the border of an all-negative input has maximum ``0``, taken from the padding
      (whose gradient is then dropped). This layer pads with zeros explicitly and pools the
      padded array.
    - the maximum of a window is ``numpy.argmax`` over it in row-major order, so a tie goes to the
      first maximum, and `backward` routes the whole gradient there (adding where windows
      overlap, as the book's ``col2im``).

    Note that the default ``stride=1`` is the book's (overlapping windows); its ``SimpleConvNet``
    passes ``stride=2``.

    Parameters
    ----------
    pool_h, pool_w : int
        Window size.
    stride : int
    pad : int
        Zero padding on every side.
    method : str, keyword-only
        The fastconv method for `fastconv.max_pool2d`.

    Attributes
    ----------
    x : ndarray
        The input of the last `forward` (a reference, not a copy).
    arg_max : ndarray of int64, shape (N * OH * OW * C,)
        As the book's: the row-major position of each maximum inside its window, in the order
        ``(n, oh, ow, c)``; computed when read.

    Notes
    -----
    The output size is ``1 + (H + 2*pad - pool_h) // stride``, that of the book's ``im2col``. The
    book's ``forward`` computes ``1 + (H - pool_h) / stride`` (without ``pad``) for its final
    reshape, which fails whenever padding changes the size; wherever the book runs, the two agree.
    """

    def __init__(self, pool_h, pool_w, stride=1, pad=0, *, method="auto"):
        _validate.pair((pool_h, pool_w), "(pool_h, pool_w)", 1)
        _validate.pair(stride, "stride", 1)
        _check_pad(pad)
        _registry.check_method("max_pool2d", method)
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self.method = method
        self.x: Any = None
        self._indices: Any = None  # flat positions of the maxima in the zero-padded plane
        self._padded_shape: Any = None

    def forward(self, x):
        """Max-pool ``x`` of shape (N, C, H, W) over zero-padded windows."""
        x = x if isinstance(x, np.ndarray) else np.asarray(x)
        xp = self._zero_pad(x)
        out, idx = max_pool2d(xp, (self.pool_h, self.pool_w), self.stride, return_indices=True,
                              method=self.method)
        self.x, self._indices, self._padded_shape = x, idx, xp.shape
        return out

    def backward(self, dout):
        """Route ``dout`` to the maxima; return the gradient with respect to the last input."""
        if self._indices is None:
            raise RuntimeError("Pooling.backward called before forward")
        dxp = max_pool2d_backward(dout, self._indices, self._padded_shape,
                                  (self.pool_h, self.pool_w), self.stride, method=self.method)
        p = self.pad
        if p:
            h, w = self.x.shape[2:]
            dxp = np.ascontiguousarray(dxp[:, :, p:p + h, p:p + w])
        return dxp

    @property
    def arg_max(self):
        if self._indices is None:
            return None
        wp = self._padded_shape[3]
        oh, ow = self._indices.shape[2:]
        row, col = np.divmod(self._indices, wp)
        p = row - (np.arange(oh) * self.stride)[:, None]
        q = col - (np.arange(ow) * self.stride)[None, :]
        return (p * self.pool_w + q).transpose(0, 2, 3, 1).reshape(-1)

    def _zero_pad(self, x):
        p = _check_pad(self.pad)
        if p == 0:
            return x
        if x.ndim != 4:
            raise ValueError(f"x must be 4-D, got x of shape {x.shape}")
        return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))

    def __repr__(self):
        return (f"Pooling(pool_h={self.pool_h!r}, pool_w={self.pool_w!r}, stride={self.stride!r}, "
                f"pad={self.pad!r}, method={self.method!r})")
