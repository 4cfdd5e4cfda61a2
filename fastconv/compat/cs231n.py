"""Drop-in CS231n layer functions: the ``(out, cache)`` forward / backward contract.

Stanford's CS231n assignments build nets from function pairs such as
``out, cache = conv_forward_fast(x, w, b, conv_param)`` and
``dx, dw, db = conv_backward_fast(dout, cache)`` (``cs231n/fast_layers.py``), with the naive
versions in ``cs231n/layers.py``. The functions here have the same names, arguments, dictionary
keys, shapes and results, so a solver or ``layer_utils`` written for the course changes only an
import::

    from fastconv.compat.cs231n import (conv_forward_fast, conv_backward_fast,
                                        max_pool_forward_fast, max_pool_backward_fast)

``conv_param`` holds ``stride`` and ``pad`` (zero padding on every side); ``pool_param`` holds
``pool_height``, ``pool_width`` and ``stride`` (no padding). Output sizes are
``1 + (H + 2 * pad - HH) // stride`` and ``1 + (H - pool_height) // stride``.

Differences from the course's code: the fast functions accept any stride (the course's im2col
version asserts that the stride tiles the padded input exactly); results keep the caller's
dtype; and where a pooling window has tied maxima, the gradient goes to the first one (as the
naive version and ``numpy.argmax``), while the course's ``reshape`` fast path splits it between
them. On inputs without tied maxima the numbers are the same to rounding.

The ``*_fast`` functions use ``method="auto"`` (the fastest fastconv method for the shape) and
the ``*_naive`` ones fastconv's ``"naive"`` loops; the fast caches record the method, so the
backward pass runs the one the forward pass was asked for.
"""

from __future__ import annotations

import numpy as np

from ..functional import conv2d, conv2d_backward, max_pool2d, max_pool2d_backward

__all__ = [
    "conv_forward_fast",
    "conv_backward_fast",
    "conv_forward_naive",
    "conv_backward_naive",
    "max_pool_forward_fast",
    "max_pool_backward_fast",
    "max_pool_forward_naive",
    "max_pool_backward_naive",
]


def _conv(x, w, b, conv_param, method):
    return conv2d(x, w, b, conv_param["stride"], conv_param["pad"], method=method)


def _conv_grads(dout, x, w, conv_param, method):
    g = conv2d_backward(dout, x, w, conv_param["stride"], conv_param["pad"], method=method)
    return g.grad_input, g.grad_weight, g.grad_bias


def _pool(x, pool_param, method):
    return max_pool2d(x, (pool_param["pool_height"], pool_param["pool_width"]),
                      pool_param["stride"], return_indices=True, method=method)


def _pool_grad(dout, x, idx, pool_param, method):
    return max_pool2d_backward(dout, idx, np.shape(x),
                               (pool_param["pool_height"], pool_param["pool_width"]),
                               pool_param["stride"], method=method)


def conv_forward_fast(x, w, b, conv_param, *, method="auto"):
    """Forward pass of a convolutional layer.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    w : ndarray, shape (F, C, HH, WW)
    b : ndarray, shape (F,)
    conv_param : dict
        ``stride``: pixels between adjacent receptive fields; ``pad``: zeros added on every side.
    method : str, keyword-only
        The fastconv method; see `fastconv.conv2d`.

    Returns
    -------
    out : ndarray, shape (N, F, H', W')
        ``H' = 1 + (H + 2 * pad - HH) // stride``, likewise ``W'``.
    cache : tuple
        ``(x, w, b, conv_param, method)``, references only, for `conv_backward_fast`.
    """
    out = _conv(x, w, b, conv_param, method)
    return out, (x, w, b, conv_param, method)


def conv_backward_fast(dout, cache):
    """Backward pass of a convolutional layer: ``(dx, dw, db)`` from `conv_forward_fast`'s cache.

    Also accepts the four-item cache of `conv_forward_naive` (and then runs ``"auto"``).
    """
    x, w, _, conv_param = cache[:4]
    method = cache[4] if len(cache) > 4 else "auto"
    return _conv_grads(dout, x, w, conv_param, method)


def conv_forward_naive(x, w, b, conv_param):
    """`conv_forward_fast` with fastconv's ``"naive"`` loops; cache ``(x, w, b, conv_param)``.

    The cache is the course's, so the course's own ``conv_backward_naive`` can consume it.
    """
    out = _conv(x, w, b, conv_param, "naive")
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout, cache):
    """`conv_backward_fast` with fastconv's ``"naive"`` loops: ``(dx, dw, db)``."""
    x, w, _, conv_param = cache[:4]
    return _conv_grads(dout, x, w, conv_param, "naive")


def max_pool_forward_fast(x, pool_param, *, method="auto"):
    """Forward pass of a max-pooling layer.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    pool_param : dict
        ``pool_height``, ``pool_width``: the window; ``stride``: pixels between windows.
    method : str, keyword-only
        The fastconv method; see `fastconv.max_pool2d`.

    Returns
    -------
    out : ndarray, shape (N, C, H', W')
        ``H' = 1 + (H - pool_height) // stride``, likewise ``W'``.
    cache : tuple
        ``(method, (x, indices, pool_param))``, as the course's ``(method, real_cache)``.
    """
    out, idx = _pool(x, pool_param, method)
    return out, (method, (x, idx, pool_param))


def max_pool_backward_fast(dout, cache):
    """Backward pass of a max-pooling layer: ``dx`` from `max_pool_forward_fast`'s cache.

    Each upstream gradient goes to the position of its window's (first) maximum; overlapping
    windows add.
    """
    method, real_cache = cache
    x, idx, pool_param = real_cache
    return _pool_grad(dout, x, idx, pool_param, method)


def max_pool_forward_naive(x, pool_param):
    """`max_pool_forward_fast` with the ``"naive"`` loops; cache ``(x, pool_param)``.

    The cache is the course's; `max_pool_backward_naive` finds the maxima again from ``x``.
    """
    out, _ = _pool(x, pool_param, "naive")
    return out, (x, pool_param)


def max_pool_backward_naive(dout, cache):
    """`max_pool_backward_fast` with the ``"naive"`` loops, from the naive forward's cache."""
    x, pool_param = cache
    _, idx = _pool(x, pool_param, "naive")
    return _pool_grad(dout, x, idx, pool_param, "naive")
