"""The public functions: validate, choose the method, call the kernel, return."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _registry, _validate

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "Conv2dGrads"]


class Conv2dGrads(NamedTuple):
    """Gradients of a conv2d; a field that was not asked for is None."""

    grad_input: object
    grad_weight: object
    grad_bias: object


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, method="auto"):
    """2-D cross-correlation of a batch of images with a bank of filters (NCHW).

    Computes ``out[n, k] = b[k] + sum_c correlate2d(x[n, g*Cg + c], w[k, c])`` over the ``Cg = C //
    groups`` channels of the group ``g = k // (K // groups)`` of output channel ``k``, which is what
    deep-learning libraries call convolution.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
        Input batch. A device array (``__cuda_array_interface__``) runs on the GPU.
    w : array_like, shape (K, C // groups, R, S)
        Filters.
    b : array_like, shape (K,), optional
        Bias added to each output channel.
    stride, dilation : int or (int, int)
        Step between windows and between kernel taps (``dilation=1`` is none).
    padding : int, (int, int), ((top, bottom), (left, right)) or str
        Zero padding of the input. The strings are:

        ``valid``
            No padding.
        ``same``
            Output size ``ceil(H / stride)``; the odd pixel goes bottom/right (Keras).
        ``full``
            ``dilation * (R - 1)`` on every side (``scipy.signal.correlate2d(mode="full")``).
    groups : int
        Split channels into this many groups; ``groups == C`` is depthwise convolution.
    method : str
        ``"auto"`` (the fastest known here for this problem), ``"naive"``, ``"im2col"``,
        ``"direct"``, or a GPU method ``"cuda-naive"``, ``"cuda-im2col"``, ``"cuda-direct"``.
        ``fastconv.methods()`` lists those usable here.

    Returns
    -------
    out : ndarray, shape (N, K, H_out, W_out)
        A new C-contiguous array in the promoted dtype (float32 or float64); a Numba device array
        when the inputs were device arrays.

    Raises
    ------
    ValueError
        Shapes that do not fit together, bad option values, an unknown method.
    TypeError
        Non-array inputs or dtypes other than bool, integer and float; non-integer options.
    BackendUnavailableError
        ``method`` names an algorithm that cannot run here.

    See Also
    --------
    conv2d_backward, scipy.signal.correlate2d

    Notes
    -----
    ``H_out = (H + top + bottom - dilation_h * (R - 1) - 1) // stride_h + 1`` (likewise W).
    Arguments are promoted together with ``np.result_type``; integers and bool compute in float64,
    float16 in float32. Every method supports stride, padding, dilation and groups. The inputs are
    never modified.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    >>> w = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    >>> fc.conv2d(x, w, padding="same").shape
    (2, 4, 8, 8)
    """
    x, w, b, spec = _validate.conv2d(x, w, b, stride, padding, dilation, groups)
    impl = _registry.resolve("conv2d", method, spec)
    if spec.x_shape[0] == 0:
        return _empty(spec.out_shape, spec)
    return impl.fn(x, w, b, spec)


def conv2d_backward(grad_output, x, w, stride=1, padding=0, dilation=1, groups=1, *,
                    method="auto", need_input=True, need_weight=True, need_bias=True):
    """Gradients of `conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : array_like, shape (N, K, H_out, W_out)
        Gradient of the loss with respect to the output of ``conv2d(x, w, ...)``.
    x, w, stride, padding, dilation, groups, method
        As given to `conv2d`.
    need_input, need_weight, need_bias : bool
        Which gradients to compute; the others are returned as None.

    Returns
    -------
    Conv2dGrads
        A named tuple ``(grad_input, grad_weight, grad_bias)`` with the shapes of ``x``, ``w`` and
        ``(K,)``, in the promoted dtype of ``grad_output``, ``x`` and ``w``.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    >>> g = fc.conv2d_backward(np.ones((2, 4, 6, 6)), x, w)
    >>> g.grad_input.shape, g.grad_weight.shape, g.grad_bias.shape
    ((2, 3, 8, 8), (4, 3, 3, 3), (4,))
    """
    need = (_validate.flag(need_input, "need_input"), _validate.flag(need_weight, "need_weight"),
            _validate.flag(need_bias, "need_bias"))
    g, x, w, spec = _validate.conv2d_backward(grad_output, x, w, stride, padding, dilation, groups)
    impl = _registry.resolve("conv2d_backward", method, spec)
    if spec.x_shape[0] == 0:  # no images: the sums over the batch are zero
        shapes = (spec.x_shape, spec.w_shape, spec.w_shape[:1])
        return Conv2dGrads(*(_empty(s, spec, zero=True) if want else None
                             for s, want in zip(shapes, need)))
    return Conv2dGrads(*impl.fn(g, x, w, spec, *need))


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, method="auto"):
    """2-D max pooling over the H and W axes of an NCHW batch (PyTorch semantics).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit ``-inf`` padding on both sides, at most half the kernel.
    dilation : int or (int, int)
    ceil_mode : bool
        Round the output size up, as PyTorch (a last window must start inside the input or the
        left padding).
    return_indices : bool
        Also return the position of each maximum.
    method : str
        As for `conv2d`.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out)
    indices : ndarray of int64, shape (N, C, H_out, W_out)
        Only with ``return_indices``: the flat index ``h * W + w`` of each window's maximum in
        the unpadded input plane. Ties go to the first maximum in row-major window order; a NaN
        in a window is its maximum, and with several NaNs the first one's index (PyTorch's CPU
        kernel takes the last). A window lying wholly in the padding gives ``-inf`` and an index
        outside the plane, as PyTorch.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> fc.max_pool2d(x, 2)[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """
    return_indices = _validate.flag(return_indices, "return_indices")
    x, spec = _validate.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    impl = _registry.resolve("max_pool2d", method, spec)
    if spec.x_shape[0] == 0:
        out, idx = _empty(spec.out_shape, spec), _empty(spec.out_shape, spec, dtype=np.int64)
    else:
        out, idx = impl.fn(x, spec, return_indices)
    return (out, idx) if return_indices else out


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0,
                        dilation=1, ceil_mode=False, *, method="auto"):
    """Gradient of `max_pool2d` with respect to its input.

    Each output gradient is added at its index (``indices`` from ``max_pool2d(...,
    return_indices=True)``, or any flat positions in ``[0, H*W)``): where windows overlap, or
    indices repeat, the gradients add. A window lying wholly in the padding routes nothing,
    whatever its index.

    Returns
    -------
    grad_input : ndarray, shape ``input_shape``
    """
    g, idx, spec = _validate.max_pool2d_backward(
        grad_output, indices, input_shape, kernel_size, stride, padding, dilation, ceil_mode
    )
    impl = _registry.resolve("max_pool2d_backward", method, spec)
    if spec.x_shape[0] == 0:
        return _empty(spec.x_shape, spec)
    return impl.fn(g, idx, spec)


def _empty(shape, spec, *, zero=False, dtype=None):
    """A result for an empty batch, on the arrays' side: kernels never see N = 0."""
    dtype = spec.dtype if dtype is None else dtype
    if spec.on_device:
        from numba import cuda

        return cuda.to_device(np.zeros(shape, dtype))
    return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
