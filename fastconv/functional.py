"""The public functions: validate, choose the method, call the kernel, return."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _policy, _registry, _validate
from .kernels import IndicesOutsidePlane

__all__ = ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
           "avg_pool2d_backward", "adaptive_avg_pool2d", "adaptive_avg_pool2d_backward",
           "conv_transpose2d", "conv_transpose2d_backward", "choose_method", "Conv2dGrads"]

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
           layout: str = "NCHW", method: str = "auto") -> FloatArray:
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
    layout : {"NCHW", "NHWC"}
        ``"NHWC"``: channels-last, as Keras and TensorFlow: x is ``(N, H, W, C)``, w is
        ``(R, S, C // groups, K)`` (HWIO) and the result ``(N, H_out, W_out, K)``.
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
    return _run("conv2d", locals())


def conv2d_backward(grad_output: ArrayLike, x: ArrayLike, w: ArrayLike, stride: IntPair = 1,
                    padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, *,
                    layout: str = "NCHW", method: str = "auto", need_input: bool = True,
                    need_weight: bool = True, need_bias: bool = True) -> Conv2dGrads:
    """Gradients of `conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : array_like, shape (N, K, H_out, W_out)
        Gradient of the loss with respect to the output of ``conv2d(x, w, ...)``.
    x, w, stride, padding, dilation, groups, layout, method
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
    return Conv2dGrads(*_run("conv2d_backward", locals()))


def max_pool2d(x: ArrayLike, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, dilation: IntPair = 1, ceil_mode: bool = False,
               return_indices: bool = False, *, layout: str = "NCHW", method: str = "auto"
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
    layout : {"NCHW", "NHWC"}
        ``"NHWC"``: x is ``(N, H, W, C)`` and the results ``(N, H_out, W_out, C)``; indices are
        still flat ``h * W + w`` positions in a channel's plane.
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
    out, idx = _run("max_pool2d", locals())
    return (out, idx) if return_indices else out  # validated by _run


def max_pool2d_backward(grad_output: ArrayLike, indices: ArrayLike,
                        input_shape: tuple[int, int, int, int], kernel_size: IntPair,
                        stride: Optional[IntPair] = None, padding: IntPair = 0,
                        dilation: IntPair = 1, ceil_mode: bool = False, *,
                        layout: str = "NCHW", method: str = "auto") -> FloatArray:
    """Gradient of `max_pool2d` with respect to its input.

    Each output gradient is added at its index (``indices`` from ``max_pool2d(...,
    return_indices=True)``, or any flat positions in ``[0, H*W)``): where windows overlap, or
    indices repeat, the gradients add. A window lying wholly in the padding routes nothing,
    whatever its index.

    Returns
    -------
    grad_input : ndarray, shape ``input_shape``
    """
    return _run("max_pool2d_backward", locals())


def avg_pool2d(x: ArrayLike, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None, *, layout: str = "NCHW",
               method: str = "auto") -> FloatArray:
    """2-D average pooling over the H and W axes (PyTorch semantics).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit zero padding on both sides, at most half the kernel.
    ceil_mode : bool
        Round the output size up, as PyTorch (a last window must start inside the input or the
        left padding).
    count_include_pad : bool
        Divide by the window's size including the padding it covers (PyTorch's default);
        ``False``: by the number of input pixels it covers. A window that ``ceil_mode`` lets
        run past the padding divides by its part inside input and padding, as PyTorch.
    divisor_override : int, optional
        Divide every window's sum by this instead.
    layout, method : str
        As for `conv2d`.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out) (or NHWC)
        ``H_out`` as for `max_pool2d` with dilation 1.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> fc.avg_pool2d(x, 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    return _run("avg_pool2d", locals())


def avg_pool2d_backward(grad_output: ArrayLike, x_shape: tuple[int, int, int, int],
                        kernel_size: IntPair, stride: Optional[IntPair] = None,
                        padding: IntPair = 0, ceil_mode: bool = False,
                        count_include_pad: bool = True, divisor_override: Optional[int] = None,
                        *, layout: str = "NCHW", method: str = "auto") -> FloatArray:
    """Gradient of `avg_pool2d` with respect to its input (of shape ``x_shape``): each output
    gradient, divided as in the forward pass, is added to every pixel of its window.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (1, 1, 4, 4), 2)[0, 0, 0]
    array([0.25, 0.25, 0.25, 0.25])
    """
    return _run("avg_pool2d_backward", locals())


def adaptive_avg_pool2d(x: ArrayLike, output_size: Union[int, tuple[Optional[int], Optional[int]]],
                        *, layout: str = "NCHW", method: str = "auto") -> FloatArray:
    """Average pooling to a given output size (PyTorch's ``adaptive_avg_pool2d``).

    Output row ``i`` averages input rows ``floor(i * H / OH)`` to ``ceil((i + 1) * H / OH)``
    (exclusive), likewise for columns, so windows may differ in size and overlap.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``
    output_size : int or (int or None, int or None)
        ``(OH, OW)``; ``None`` keeps that input size. ``1`` is global average pooling.
    layout, method : str
        As for `conv2d`.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> fc.adaptive_avg_pool2d(x, 1)[0, 0]
    array([[7.5]])
    """
    return _run("adaptive_avg_pool2d", locals())


def adaptive_avg_pool2d_backward(grad_output: ArrayLike, x_shape: tuple[int, int, int, int],
                                 output_size: Union[int, tuple[Optional[int], Optional[int]]],
                                 *, layout: str = "NCHW", method: str = "auto") -> FloatArray:
    """Gradient of `adaptive_avg_pool2d` with respect to its input (of shape ``x_shape``).

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> fc.adaptive_avg_pool2d_backward(np.ones((1, 1, 1, 1)), (1, 1, 2, 2), 1)[0, 0]
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    return _run("adaptive_avg_pool2d_backward", locals())


def conv_transpose2d(x: ArrayLike, w: ArrayLike, b: Optional[ArrayLike] = None,
                     stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0,
                     groups: int = 1, dilation: IntPair = 1, *, layout: str = "NCHW",
                     method: str = "auto") -> FloatArray:
    """2-D transposed convolution (PyTorch's ``conv_transpose2d``): the gradient of `conv2d`
    with respect to its input, applied to ``x``.

    Parameters
    ----------
    x : array_like, shape (N, C_in, H, W)
    w : array_like, shape (C_in, C_out // groups, R, S)
        PyTorch's layout; ``(R, S, C_out // groups, C_in)`` with ``layout="NHWC"``.
    b : array_like, shape (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int or (int, int)
        Rows and columns cut from each side of the full result (PyTorch's meaning): it undoes a
        conv2d's ``padding``.
    output_padding : int or (int, int)
        Extra rows and columns at the bottom and right, smaller than the stride or the
        dilation: it picks which input size of the matching conv2d the result has.
    groups : int
        Divides ``C_in`` and ``C_out``.
    layout, method : str
        As for `conv2d`.

    Returns
    -------
    out : ndarray, shape (N, C_out, H_out, W_out) (or NHWC)
        ``H_out = (H - 1) * stride - 2 * padding + dilation * (R - 1) + output_padding + 1``.

    Notes
    -----
    Every method runs this with its own conv2d grad-input kernel, and its backward with its
    conv2d forward and grad-weight kernels.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x, w = np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2))
    >>> fc.conv_transpose2d(x, w, stride=2)[0, 0]
    array([[1., 1., 1., 1.],
           [1., 1., 1., 1.],
           [1., 1., 1., 1.],
           [1., 1., 1., 1.]])
    """
    return _run("conv_transpose2d", locals())


def conv_transpose2d_backward(grad_output: ArrayLike, x: ArrayLike, w: ArrayLike,
                              stride: IntPair = 1, padding: IntPair = 0,
                              output_padding: IntPair = 0, groups: int = 1,
                              dilation: IntPair = 1, *, layout: str = "NCHW",
                              method: str = "auto", need_input: bool = True,
                              need_weight: bool = True, need_bias: bool = True) -> Conv2dGrads:
    """Gradients of `conv_transpose2d` with respect to its input, weight and bias.

    Returns
    -------
    Conv2dGrads
        ``(grad_input, grad_weight, grad_bias)`` with the shapes of ``x``, ``w`` and
        ``(C_out,)``; a field not asked for is None.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x, w = np.ones((1, 2, 3, 3)), np.ones((2, 4, 2, 2))
    >>> g = fc.conv_transpose2d_backward(np.ones((1, 4, 6, 6)), x, w, stride=2)
    >>> g.grad_input.shape, g.grad_weight.shape, g.grad_bias.shape
    ((1, 2, 3, 3), (2, 4, 2, 2), (4,))
    """
    return Conv2dGrads(*_run("conv_transpose2d_backward", locals()))


def _empty(shape, spec, *, zero=False, dtype=None, kind="x"):
    """A result for an empty batch (``shape`` in NCHW / OIHW order), in the spec's layout and on
    the arrays' side: kernels never see N = 0."""
    dtype = spec.dtype if dtype is None else dtype
    if len(shape) == 4:
        shape = _validate._shown(shape, spec.layout, kind)
    if spec.on_device:
        from numba import cuda

        return cuda.to_device(np.zeros(shape, dtype))
    return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)


def _empty_grads(spec, need, x_shape, channels):
    """Gradients for an empty batch: the sums over the batch are zero."""
    shapes = ((x_shape, "x"), (spec.w_shape, "w"), ((channels,), "x"))
    return Conv2dGrads(*(_empty(s, spec, zero=True, kind=kind) if want else None
                         for (s, kind), want in zip(shapes, need)))


def _args(op, a):
    """(spec, kernel arguments) for ``op`` from the arguments ``a`` of its public function: the
    one mapping from public arguments to validated ones, for the functions and `choose_method`."""
    v = _validate
    lay = a.get("layout", "NCHW")
    geometry: tuple
    if op in ("conv2d", "conv2d_backward"):
        geometry = (a["stride"], a["padding"], a["dilation"], a["groups"], lay)
    elif op.startswith("conv_transpose2d"):
        geometry = (a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"],
                    lay)
    elif op.startswith("max_pool2d"):
        geometry = (a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                    lay)
    elif op.startswith("avg_pool2d"):
        geometry = (a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                    a["count_include_pad"], a["divisor_override"], lay)
    else:
        geometry = (a["output_size"], lay)
    if op.endswith("_backward") and "conv" in op:
        need = tuple(v.flag(a[f"need_{n}"], f"need_{n}") for n in ("input", "weight", "bias"))
        check = v.conv2d_backward if op == "conv2d_backward" else v.conv_transpose2d_backward
        g, x, w, spec = check(a["grad_output"], a["x"], a["w"], *geometry)
        return spec, (g, x, w, spec, *need)
    if "conv" in op:
        x, w, b, spec = getattr(v, op)(a["x"], a["w"], a["b"], *geometry)
        return spec, (x, w, b, spec)
    if op == "max_pool2d":
        x, spec = v.max_pool2d(a["x"], *geometry)
        return spec, (x, spec, v.flag(a["return_indices"], "return_indices"))
    if op == "max_pool2d_backward":
        g, idx, spec = v.max_pool2d_backward(a["grad_output"], a["indices"], a["input_shape"],
                                             *geometry)
        return spec, (g, idx, spec)
    if op.endswith("_backward"):
        g, spec = getattr(v, op)(a["grad_output"], a["x_shape"], *geometry)
        return spec, (g, spec)
    x, spec = getattr(v, op)(a["x"], *geometry)
    return spec, (x, spec)


def _run(op, a):
    """Validate, resolve ``a["method"]``, run: the body of every public function."""
    spec, args = _args(op, a)
    impl = _registry.resolve(op, a["method"], spec)
    if spec.x_shape[0] == 0:
        return _empty_result(op, spec, args)
    if op != "max_pool2d_backward" or spec.on_device:
        return impl.kernel(spec)(*args)
    if not impl.checks_indices:  # the range check validation left for after dispatch
        _validate.indices_in_plane(args[1], spec)
        return impl.kernel(spec)(*args)
    try:  # the kernel checks each index in its own pass (it skipped the bad ones)
        return impl.kernel(spec)(*args)
    except IndicesOutsidePlane:
        _validate.indices_in_plane(args[1], spec)  # raises, with the validator's message
        raise


def _empty_result(op, spec, args):
    """The result for an empty batch (kernels never see N = 0); the sums over a batch are 0."""
    if op == "conv2d":
        return _empty(spec.out_shape, spec)
    if op == "conv_transpose2d":
        return _empty(spec.x_shape, spec)
    if op == "conv2d_backward":
        return _empty_grads(spec, args[-3:], spec.x_shape, spec.w_shape[0])
    if op == "conv_transpose2d_backward":
        return _empty_grads(spec, args[-3:], spec.out_shape, spec.x_shape[1])
    if op == "max_pool2d":
        return _empty(spec.out_shape, spec), _empty(spec.out_shape, spec, dtype=np.int64)
    return _empty(spec.x_shape if op.endswith("_backward") else spec.out_shape, spec)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (conv2d, conv2d_backward, max_pool2d, max_pool2d_backward, avg_pool2d,
                            avg_pool2d_backward, adaptive_avg_pool2d,
                            adaptive_avg_pool2d_backward, conv_transpose2d,
                            conv_transpose2d_backward)}


def choose_method(op: str, *args: Any, measure: bool = False,
                  **options: Any) -> Union[str, tuple[str, dict[str, float]]]:
    """The method ``method="auto"`` would run for these arguments, as SciPy's
    ``choose_conv_method``.

    Parameters
    ----------
    op : str
        The function's name: ``"conv2d"``, ``"conv2d_backward"``, ``"max_pool2d"``,
        ``"avg_pool2d_backward"``, ``"conv_transpose2d"``, ... (any public conv or pool
        function).
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
    spec, kernel_args = _args(op, {**bound.arguments, "method": "auto"})
    impl = _registry.resolve(op, "auto", spec)
    if not measure:
        return impl.method
    cands = _registry.candidates(op, spec)
    if spec.x_shape[0] == 0:  # nothing to time: kernels never see an empty batch
        return impl.method, {}
    times = _policy.time_candidates(op, spec, cands, args=kernel_args)
    return min(times, key=times.get), times
