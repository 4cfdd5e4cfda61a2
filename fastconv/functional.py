"""The public functions: validate, choose the method, call the kernel, return."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _policy, _registry, _validate

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "choose_method",
           "Conv2dGrads"]

#: An int or an (h, w) pair of ints.
IntPair = Union[int, tuple[int, int]]
#: What ``padding`` accepts (see `conv2d`).
Padding = Union[int, tuple[int, int], tuple[tuple[int, int], tuple[int, int]],
                Literal["valid", "same", "full"], str]
#: A result: a new float32 or float64 array (a Numba device array when the inputs were on the
#: GPU, which NumPy's types cannot name).
FloatArray = NDArray[np.floating[Any]]



class Conv2dGrads(NamedTuple):
    """Gradients of a conv2d; a field that was not asked for is None."""

    grad_input: Optional[FloatArray]
    grad_weight: Optional[FloatArray]
    grad_bias: Optional[FloatArray]


def conv2d(x: ArrayLike, w: ArrayLike, b: Optional[ArrayLike] = None, stride: IntPair = 1,
           padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, *,
           method: str = "auto") -> FloatArray:
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


def conv2d_backward(grad_output: ArrayLike, x: ArrayLike, w: ArrayLike, stride: IntPair = 1,
                    padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, *,
                    method: str = "auto", need_input: bool = True, need_weight: bool = True,
                    need_bias: bool = True) -> Conv2dGrads:
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


def max_pool2d(x: ArrayLike, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, dilation: IntPair = 1, ceil_mode: bool = False,
               return_indices: bool = False, *, method: str = "auto"
               ) -> Union[FloatArray, tuple[FloatArray, NDArray[np.int64]]]:
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


def max_pool2d_backward(grad_output: ArrayLike, indices: ArrayLike,
                        input_shape: tuple[int, int, int, int], kernel_size: IntPair,
                        stride: Optional[IntPair] = None, padding: IntPair = 0,
                        dilation: IntPair = 1, ceil_mode: bool = False, *,
                        method: str = "auto") -> FloatArray:
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


def _kernel_arguments(op, a):
    """(spec, kernel arguments) for ``op`` from the bound arguments ``a`` of its function."""
    if op in ("conv2d", "conv2d_backward"):
        geometry = (a["stride"], a["padding"], a["dilation"], a["groups"])
    if op == "conv2d":
        x, w, b, spec = _validate.conv2d(a["x"], a["w"], a["b"], *geometry)
        return spec, (x, w, b, spec)
    if op == "conv2d_backward":
        need = tuple(_validate.flag(a[f"need_{n}"], f"need_{n}")
                     for n in ("input", "weight", "bias"))
        g, x, w, spec = _validate.conv2d_backward(a["grad_output"], a["x"], a["w"], *geometry)
        return spec, (g, x, w, spec, *need)
    pool = (a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    if op == "max_pool2d":
        x, spec = _validate.max_pool2d(a["x"], *pool)
        return spec, (x, spec, _validate.flag(a["return_indices"], "return_indices"))
    g, idx, spec = _validate.max_pool2d_backward(a["grad_output"], a["indices"],
                                                 a["input_shape"], *pool)
    return spec, (g, idx, spec)


_FUNCTIONS: dict[str, Callable[..., Any]] = {"conv2d": conv2d, "conv2d_backward": conv2d_backward, "max_pool2d": max_pool2d,
              "max_pool2d_backward": max_pool2d_backward}


def choose_method(op: str, *args: Any, measure: bool = False,
                  **options: Any) -> Union[str, tuple[str, dict[str, float]]]:
    """The method ``method="auto"`` would run for these arguments, as SciPy's
    ``choose_conv_method``.

    Parameters
    ----------
    op : {"conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward"}
        The function.
    *args, **options
        Its arguments, as they would be passed to it (without ``method``).
    measure : bool
        Time every method that can run the problem, on these very arrays, instead of
        predicting from the measured table, and also return the times.

    Returns
    -------
    method : str
        The method's name.
    times : dict of str to float
        Only with ``measure=True``: the best of a few calls of each candidate, in seconds.

    Notes
    -----
    Without ``measure`` this is exactly auto's choice (a pure function of the problem, the
    methods usable here and the measured table; see ``python -m fastconv info``). With
    ``measure`` the fastest measured method is returned; auto itself is unchanged (see
    `fastconv.autotune` to make it measure).

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    >>> fc.choose_method("conv2d", x, w, padding=1) in fc.methods("conv2d")
    True
    >>> method, times = fc.choose_method("conv2d", x, w, padding=1, measure=True)
    >>> method == min(times, key=times.get)
    True
    """
    fn = _FUNCTIONS.get(op) if isinstance(op, str) else None
    if fn is None:
        raise ValueError(f"op={op!r} is not one of {tuple(_FUNCTIONS)}")
    if "method" in options:
        raise TypeError("choose_method() chooses the method: do not pass method=")
    measure = _validate.flag(measure, "measure")
    bound = inspect.signature(fn).bind(*args, **options)
    bound.apply_defaults()
    spec, kernel_args = _kernel_arguments(op, bound.arguments)
    impl = _registry.resolve(op, "auto", spec)
    if not measure:
        return impl.method
    cands = _registry.candidates(op, spec)
    if spec.x_shape[0] == 0:  # nothing to time: kernels never see an empty batch
        return impl.method, {}
    times = _policy.time_candidates(op, spec, cands, args=kernel_args)
    return min(times, key=times.get), times
