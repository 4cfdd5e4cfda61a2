"""Device-array helpers the layout and conv_transpose2d adapters need on the GPU: permuted
copies, adding a bias, and channel sums (all from the memory pool, on the default stream)."""

from __future__ import annotations

import numpy as np

from ._common import _bias_grad, _elementwise, _launch_flat
from ._memory import _empty, _Io


class _Like:
    """The bits of a spec `_Io` reads, for an array already on the device."""

    def __init__(self, dtype):
        self.on_device, self.dtype = True, dtype


def permute(a, axes):
    """A C-contiguous device copy of the 4-D device array ``a`` with its axes in ``axes``
    order, as ``np.transpose(a, axes)``."""
    dst = _empty(tuple(a.shape[k] for k in axes), np.dtype(a.dtype))
    _launch_flat(_elementwise().permute4, dst.size, a, dst, *axes)
    return dst


def add_bias(out, b):
    """``out[:, k] += b[k]`` in place, on the device."""
    (bd,) = _Io(_Like(np.dtype(out.dtype))).inputs(b)
    _launch_flat(_elementwise().add_bias, out.size, out, bd)
    return out


def channel_sums(g):
    """The sums over (N, H, W) of each channel of the 4-D device array ``g`` (any
    ``__cuda_array_interface__`` array)."""
    io = _Io(_Like(np.dtype(g.dtype)))
    (gd,) = io.inputs(g)
    return _bias_grad(gd, None, io)
