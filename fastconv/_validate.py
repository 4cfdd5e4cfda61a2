"""Every argument check and normalization of fastconv.

Each public entry point calls one function here first. It returns the arrays, converted once to
the common compute dtype and made C-contiguous (host arrays; device arrays pass through), and a
frozen spec (`ConvSpec`, `PoolSpec`) holding the normalized options and output sizes. Kernels
trust what they receive, so nothing unchecked may get past this module.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import numpy as np

__all__ = [
    "ConvSpec",
    "PoolSpec",
    "AvgPoolSpec",
    "LAYOUTS",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "layout",
    "pair",
    "is_device_array",
]

PADDING_MODES = ("valid", "same", "full")
LAYOUTS = ("NCHW", "NHWC")

#: Every integer option (stride, padding, dilation, kernel size, groups) must lie below this:
#: the compiled kernels take them as C ints, and nothing sensible needs more.
OPTION_LIMIT = 2**31


class ConvSpec(NamedTuple):
    """A validated conv2d problem: shapes, dtype and normalized options."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W)
    w_shape: tuple[int, int, int, int]  # (K, C // groups, R, S)
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    groups: int
    out_hw: tuple[int, int]
    dtype: str  # "float32" or "float64"
    has_bias: bool = False
    on_device: bool = False
    layout: str = "NCHW"  # of the arrays; the shapes above are always NCHW / OIHW

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """The output's shape in NCHW order (whatever the layout of the arrays)."""
        return (self.x_shape[0], self.w_shape[0], *self.out_hw)

    @property
    def loop_args(self) -> tuple[int, ...]:
        """(stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups): the scalars
        the loop kernels take (the bottom/right padding follows from ``out_hw``)."""
        (pt, _), (pl, _) = self.padding
        return (*self.stride, pt, pl, *self.dilation, self.groups)

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (the backward counts twice this)."""
        n, k, oh, ow = self.out_shape
        _, cg, r, s = self.w_shape
        return 2 * n * k * cg * r * s * oh * ow


class PoolSpec(NamedTuple):
    """A validated max-pool problem."""

    x_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]  # symmetric (h, w), padded with -inf
    dilation: tuple[int, int]
    ceil_mode: bool
    out_hw: tuple[int, int]
    dtype: str
    on_device: bool = False
    layout: str = "NCHW"

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (*self.x_shape[:2], *self.out_hw)

    @property
    def loop_args(self) -> tuple[int, ...]:
        """(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w): the
        scalars the loop kernels take."""
        return (*self.kernel, *self.stride, *self.padding, *self.dilation)


class AvgPoolSpec(NamedTuple):
    """A validated average pool (``adaptive``: PyTorch's adaptive windows for ``out_hw``)."""

    x_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]  # (0, 0) when adaptive
    stride: tuple[int, int]
    padding: tuple[int, int]  # symmetric (h, w); padded with zeros
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None
    adaptive: bool
    out_hw: tuple[int, int]
    dtype: str
    on_device: bool = False
    layout: str = "NCHW"

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (*self.x_shape[:2], *self.out_hw)


# ---------------------------------------------------------------------------------------------
# scalars and tuples


def _pair_of_any(value, name: str) -> tuple[int, int]:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        a, b = (value, value) if np.ndim(value) == 0 else value
        if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
            raise TypeError
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from e


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a tuple (torch's ``_pair``)."""
    if type(value) is int:  # the common cases first: np.ndim costs microseconds a call
        a = b = value
    elif (type(value) is tuple and len(value) == 2 and type(value[0]) is int
          and type(value[1]) is int):
        a, b = value
    else:
        a, b = _pair_of_any(value, name)
    if min(a, b) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(a, b) >= OPTION_LIMIT:
        raise ValueError(f"{name}={value!r} is too large: each value must be < 2**31")
    return a, b


def positive_int(value, name: str) -> int:
    """An int >= 1 (not a bool), below `OPTION_LIMIT`."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError as e:
        raise TypeError(f"{name} must be an int, got {value!r}") from e
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    if v >= OPTION_LIMIT:
        raise ValueError(f"{name}={value!r} is too large: it must be < 2**31")
    return v


def flag(value, name: str) -> bool:
    """A bool (or ``numpy.bool_``): no truthy strings or numbers."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _resolve_padding(padding, k_eff, size, stride):
    """Normalize ``padding`` to ((top, bottom), (left, right)).

    ``k_eff``, ``size`` and ``stride`` are (h, w) pairs: the dilated kernel extent, the input size
    and the stride, needed by the string modes.
    """
    if isinstance(padding, str):
        if padding.lower() not in PADDING_MODES:
            raise ValueError(f"padding={padding!r} is not one of {PADDING_MODES} (in any case)")
        padding = padding.lower()
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "full":
            return tuple((k - 1, k - 1) for k in k_eff)
        out = []
        for k, n, s in zip(k_eff, size, stride):  # Keras "same": output ceil(n / s)
            total = max((-(-n // s) - 1) * s + k - n, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    try:
        nested = np.ndim(padding) == 2 and np.shape(padding) == (2, 2)
    except ValueError:  # ragged, like ((1, 2), (3,))
        nested = False
    if nested:
        try:
            return tuple(pair(p, "padding", 0) for p in padding)
        except TypeError as e:
            raise TypeError(
                f"padding must be an int, a pair, ((top, bottom), (left, right)) or one of "
                f"{PADDING_MODES}, got {padding!r}"
            ) from e
    try:
        ph, pw = pair(padding, "padding", 0)
    except TypeError as e:
        raise TypeError(
            f"padding must be an int, a pair, ((top, bottom), (left, right)) or one of "
            f"{PADDING_MODES}, got {padding!r}"
        ) from e
    return ((ph, ph), (pw, pw))


def conv_options(stride, padding, dilation, groups) -> None:
    """Check the forms of conv options before any array is seen (layer constructors)."""
    pair(stride, "stride", 1)
    pair(dilation, "dilation", 1)
    positive_int(groups, "groups")
    _resolve_padding(padding, (1, 1), (1, 1), (1, 1))


def pool_options(kernel_size, stride, padding, dilation, ceil_mode) -> None:
    """Check the forms of pool options before any array is seen (layer constructors)."""
    kernel = pair(kernel_size, "kernel_size", 1)
    if stride is not None:
        pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    pair(dilation, "dilation", 1)
    flag(ceil_mode, "ceil_mode")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding={padding} must be at most half of kernel_size={kernel}")


def transpose_options(stride, padding, output_padding, groups, dilation):
    """Normalized conv_transpose2d options (stride, padding, output_padding, groups,
    dilation), checked before any array is seen."""
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    groups = positive_int(groups, "groups")
    if isinstance(padding, str):
        raise TypeError(f"padding={padding!r}: conv_transpose2d takes an int or a pair "
                        "(PyTorch's), not a mode string")
    pad = pair(padding, "padding", 0)
    opad = pair(output_padding, "output_padding", 0)
    for o, st, d in zip(opad, stride, dilation):
        if o >= st and o >= d:
            raise ValueError(f"output_padding={opad} must be smaller than the stride "
                             f"{stride} or the dilation {dilation} (as PyTorch)")
    return stride, pad, opad, groups, dilation


def avg_options(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Normalized avg_pool2d options (kernel, stride, padding, ceil_mode, count_include_pad,
    divisor), checked before any array is seen."""
    kernel = pair(kernel_size, "kernel_size", 1)
    stride = kernel if stride is None else pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding={padding} must be at most half of kernel_size={kernel}")
    return (kernel, stride, padding, flag(ceil_mode, "ceil_mode"),
            flag(count_include_pad, "count_include_pad"), _divisor(divisor_override))


def output_size(value) -> tuple:
    """adaptive_avg_pool2d's ``output_size`` as a pair of positive ints or None."""
    if value is None or isinstance(value, (str, bytes)) or np.ndim(value) > 1:
        raise TypeError(f"output_size must be an int or a pair (of ints or None), got "
                        f"{value!r}")
    sizes = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(sizes) != 2:
        raise TypeError(f"output_size must be an int or a pair (of ints or None), got "
                        f"{value!r}")
    return tuple(None if o is None else positive_int(o, "output_size") for o in sizes)


def layout(value) -> str:
    """``"NCHW"`` or ``"NHWC"`` (any case)."""
    if not isinstance(value, str) or value.upper() not in LAYOUTS:
        raise ValueError(f"layout={value!r} is not one of {LAYOUTS}")
    return value.upper()


def _nchw(shape, lay):
    """An (N, H, W, C) shape as (N, C, H, W) for layout NHWC."""
    return shape if lay == "NCHW" else (shape[0], shape[3], shape[1], shape[2])


def _oihw(shape, lay):
    """A filter bank given as (R, S, in, out) for layout NHWC, as (out, in, R, S)."""
    return shape if lay == "NCHW" else (shape[3], shape[2], shape[0], shape[1])


def _shown(shape, lay, kind="x"):
    """A normalized shape as the caller gave it, for messages."""
    if lay == "NCHW":
        return shape
    if kind == "x":
        return (shape[0], shape[2], shape[3], shape[1])
    return (shape[2], shape[3], shape[1], shape[0])


# ---------------------------------------------------------------------------------------------
# arrays


def is_device_array(a) -> bool:
    """True for arrays living on a GPU: anything exporting ``__cuda_array_interface__``, and
    Numba's device arrays (whose simulator versions export no interface)."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _device_dtype(a) -> np.dtype:
    if hasattr(a, "__cuda_array_interface__"):
        return np.dtype(a.__cuda_array_interface__["typestr"])
    return np.dtype(a.dtype)


def _device_shape(a) -> tuple[int, ...]:
    if hasattr(a, "__cuda_array_interface__"):
        return tuple(a.__cuda_array_interface__["shape"])
    return tuple(a.shape)


def _as_array(a, name: str, ndim: int):
    """np.asarray for host data; device arrays pass through. Checks ndim and dtype kind."""
    if is_device_array(a):
        shape, dtype = _device_shape(a), _device_dtype(a)
    else:
        if isinstance(a, (str, bytes)) or a is None:
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        try:
            a = np.asarray(a)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name} must be an array, got {type(a).__name__}") from e
        shape, dtype = a.shape, a.dtype
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise TypeError(
            f"{name} has dtype {dtype}; fastconv computes in float32 or float64 "
            "(bool, integer and float16 inputs are promoted)"
        )
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name} of shape {tuple(shape)}")
    return a, tuple(int(d) for d in shape), dtype


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> str:
    """str(dtype), remembered: NumPy builds the name anew in every call (~5 us)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        return _DTYPE_NAMES.setdefault(dtype, str(dtype))


def _compute_dtype(*dtypes) -> np.dtype:
    dt = np.result_type(*dtypes)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    if dt == np.float16:
        return np.dtype(np.float32)
    return dt


def _prepare(arrays, dtype, on_device):
    """Cast host arrays once to dtype, C-contiguous (a copy only when needed: never in place)."""
    if on_device:
        for a in arrays:
            if a is not None and _device_dtype(a) != dtype:
                raise TypeError(
                    f"device arrays must share one float dtype (float32 or float64); got "
                    f"{sorted({str(_device_dtype(b)) for b in arrays if b is not None})}"
                )
        return arrays
    return tuple(None if a is None else np.ascontiguousarray(a, dtype=dtype) for a in arrays)


def _placement(named):
    """Whether the arrays are on the device; they must not be mixed host and device."""
    where = {n: is_device_array(a) for n, a in named.items() if a is not None}
    if len(set(where.values())) > 1:
        dev = [n for n, d in where.items() if d]
        host = [n for n, d in where.items() if not d]
        raise TypeError(
            f"{', '.join(dev)} on the GPU but {', '.join(host)} on the host; "
            "pass all arrays on one side"
        )
    return any(where.values())


def _layout_hint(x_shape, w_shape, groups, b_shape=None):
    """A hint when x or the weight look channels-last, as TensorFlow/Keras hold them: x
    (N, H, W, C), weight (R, S, C // groups, K) (HWIO); a bias with the last axis's length
    tells too."""
    _, c, _, c_last = x_shape
    r, s, cin, k_last = w_shape
    hwio = r == s and cin * groups in (c, c_last) and (
        w_shape[1] * groups != cin * groups or b_shape == (k_last,) != (w_shape[0],))
    nhwc_x = c_last != c and c_last in (w_shape[1] * groups, cin * groups if hwio else -1)
    if nhwc_x and hwio:
        return ("; x and the weight look channels-last, (N, H, W, C) and (R, S, C // groups, "
                "K) as TensorFlow/Keras hold them: pass layout='NHWC', or "
                "x.transpose(0, 3, 1, 2) and w.transpose(3, 2, 0, 1)")
    if nhwc_x:
        return ("; x looks channels-last (N, H, W, C): pass layout='NHWC' or "
                "x.transpose(0, 3, 1, 2)")
    if hwio:
        return (f"; weight of shape {w_shape} looks like (R, S, C // groups, K) as "
                "TensorFlow/Keras hold it (HWIO): pass w.transpose(3, 2, 0, 1)")
    return ""


def _check_batch_shape(shape, label):
    """An empty batch (N = 0) is allowed; an empty channel or plane dimension is not."""
    if min(shape[1:]) < 1 or shape[0] < 0:
        raise ValueError(f"{label} has an empty dimension (only the batch, N, may be 0)")


def _check_output_size(shape, dtype, cause):
    """A result NumPy could not even describe (more than the address space) is an argument
    error: name the options that made it."""
    count = 1
    for d in shape:
        count *= d
    if count * np.dtype(dtype).itemsize > np.iinfo(np.intp).max:
        raise ValueError(f"{cause} give an output of shape {tuple(shape)}, too large to exist")


# ---------------------------------------------------------------------------------------------
# conv2d


def _conv_spec(x_shape, w_shape, has_bias, b_shape, stride, padding, dilation, groups, dtype, dev,
               lay="NCHW", w_name="weight"):
    """The spec of a conv with x (N, C, H, W) and weight (K, C // groups, R, S); ``lay`` is the
    layout the caller gave them in, for messages."""
    n, c, h, w = x_shape
    k, cg, r, s = w_shape
    xg, wg = f"x of shape {_shown(x_shape, lay)}", f"{w_name} of shape {_shown(w_shape, lay, 'w')}"
    stride = pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    groups = positive_int(groups, "groups")
    if min(w_shape) < 1:
        raise ValueError(f"{wg} has an empty dimension")
    _check_batch_shape(x_shape, xg)
    hint = _layout_hint(x_shape, w_shape, groups, b_shape if has_bias else None) \
        if lay == "NCHW" and w_name == "weight" else ""
    if k % groups:
        raise ValueError(f"groups={groups} must divide the output channels, got {wg}" + hint)
    if c != cg * groups:
        divide = f": groups={groups} must divide x's {c} channels" if c % groups else ""
        raise ValueError(
            f"groups={groups} and {wg} expect x with {cg * groups} channels, got {xg}"
            + divide + hint)
    if has_bias and b_shape != (k,):
        raise ValueError(f"b must have shape ({k},) for {wg}, got {b_shape}" + hint)
    k_eff = (dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1)
    pad = _resolve_padding(padding, k_eff, (h, w), stride)
    out_hw = tuple(
        (size + lo + hi - ke) // st + 1
        for size, (lo, hi), ke, st in zip((h, w), pad, k_eff, stride)
    )
    if min(out_hw) < 1 or any(size + lo + hi < ke for size, (lo, hi), ke in zip((h, w), pad, k_eff)):
        raise ValueError(
            f"kernel of shape {w_shape[2:]} with dilation={dilation} spans {k_eff}, larger than "
            f"{xg} with padding={pad}: the output would be empty" + hint
        )
    _check_output_size((n, k, *out_hw), dtype, f"padding={padding!r} and stride={stride}")
    return ConvSpec(x_shape, w_shape, stride, dilation, pad, groups, out_hw, _dtype_name(dtype),
                    has_bias, dev, lay)


def conv2d(x, w, b, stride, padding, dilation, groups, lay="NCHW"):
    """Validate conv2d arguments; return (x, w, b, spec) with arrays in the compute dtype
    (in the caller's layout ``lay``; the spec's shapes are NCHW / OIHW)."""
    lay = layout(lay)
    dev = _placement({"x": x, "w": w, "b": b})
    x, xs, xd = _as_array(x, "x", 4)
    w, ws, wd = _as_array(w, "w", 4)
    dts = [xd, wd]
    bs = None
    if b is not None:
        b, bs, bd = _as_array(b, "b", 1)
        dts.append(bd)
    dtype = _compute_dtype(*dts)
    spec = _conv_spec(_nchw(xs, lay), _oihw(ws, lay), b is not None, bs, stride, padding,
                      dilation, groups, dtype, dev, lay)
    x, w, b = _prepare((x, w, b), dtype, dev)
    return x, w, b, spec


def _check_grad_output(gs, want, lay, xs, ws, w_name="weight"):
    if gs != want:
        raise ValueError(
            f"grad_output must have the forward output's shape {want} for x of shape {xs} and "
            f"{w_name} of shape {ws}, got grad_output of shape {gs}"
        )


def conv2d_backward(grad_output, x, w, stride, padding, dilation, groups, lay="NCHW"):
    """Validate conv2d_backward arguments; return (grad_output, x, w, spec)."""
    lay = layout(lay)
    dev = _placement({"grad_output": grad_output, "x": x, "w": w})
    g, gs, gd = _as_array(grad_output, "grad_output", 4)
    x, xs, xd = _as_array(x, "x", 4)
    w, ws, wd = _as_array(w, "w", 4)
    dtype = _compute_dtype(gd, xd, wd)
    spec = _conv_spec(_nchw(xs, lay), _oihw(ws, lay), False, None, stride, padding, dilation,
                      groups, dtype, dev, lay)
    _check_grad_output(gs, _shown(spec.out_shape, lay), lay, xs, ws)
    g, x, w = _prepare((g, x, w), dtype, dev)
    return g, x, w, spec


# ---------------------------------------------------------------------------------------------
# conv_transpose2d: the adjoint of a conv2d, whose spec describes it


def _transpose_spec(x_shape, w_shape, has_bias, b_shape, stride, padding, output_padding,
                    groups, dilation, dtype, dev, lay):
    """The ConvSpec of the conv2d whose grad-input is this transposed convolution: its input is
    the transposed convolution's output (N, C_out, H_out, W_out), its output the transposed
    convolution's input, its weight the same (C_in, C_out // groups, R, S)."""
    n, cin, h, w = x_shape
    k, cog, r, s = w_shape
    xg = f"x of shape {_shown(x_shape, lay)}"
    wg = f"weight of shape {_shown(w_shape, lay, 'w')}"
    stride, pad, opad, groups, dilation = transpose_options(stride, padding, output_padding,
                                                            groups, dilation)
    if min(w_shape) < 1:
        raise ValueError(f"{wg} has an empty dimension")
    _check_batch_shape(x_shape, xg)
    if cin % groups or k % groups:
        raise ValueError(f"groups={groups} must divide the input channels of {xg} and the "
                         f"first axis of {wg}")
    if k != cin:
        raise ValueError(f"{wg} expects x with {k} channels (weight: (C_in, C_out // groups, "
                         f"R, S)), got {xg}")
    cout = cog * groups
    if has_bias and b_shape != (cout,):
        raise ValueError(f"b must have shape ({cout},) for {wg} and groups={groups}, got "
                         f"{b_shape}")
    out_hw = tuple((size - 1) * st - 2 * p + d * (kk - 1) + o + 1
                   for size, st, p, d, kk, o in zip((h, w), stride, pad, dilation, (r, s), opad))
    if min(out_hw) < 1:
        raise ValueError(f"{xg} with stride={stride}, padding={pad}, dilation={dilation} and "
                         f"output_padding={opad} gives an empty output {out_hw}")
    _check_output_size((n, cout, *out_hw), dtype, f"stride={stride} and output_padding={opad}")
    # the conv's bottom padding: p - output_padding, or none (the extra rows it would give are
    # cut: out_hw below is the transposed convolution's input size)
    (ph, pw), (oh, ow) = pad, opad
    conv_pad = ((ph, max(0, ph - oh)), (pw, max(0, pw - ow)))
    return ConvSpec((n, cout, *out_hw), w_shape, stride, dilation, conv_pad, groups, (h, w),
                    _dtype_name(dtype), has_bias, dev, lay)


def conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation, lay="NCHW"):
    """Validate conv_transpose2d arguments; return (x, w, b, spec): spec is the ConvSpec of
    the conv2d it is the grad-input of (`_transpose_spec`)."""
    lay = layout(lay)
    dev = _placement({"x": x, "w": w, "b": b})
    x, xs, xd = _as_array(x, "x", 4)
    w, ws, wd = _as_array(w, "w", 4)
    dts = [xd, wd]
    bs = None
    if b is not None:
        b, bs, bd = _as_array(b, "b", 1)
        dts.append(bd)
    dtype = _compute_dtype(*dts)
    spec = _transpose_spec(_nchw(xs, lay), _oihw(ws, lay), b is not None, bs, stride, padding,
                           output_padding, groups, dilation, dtype, dev, lay)
    x, w, b = _prepare((x, w, b), dtype, dev)
    return x, w, b, spec


def conv_transpose2d_backward(grad_output, x, w, stride, padding, output_padding, groups,
                              dilation, lay="NCHW"):
    """Validate conv_transpose2d_backward arguments; return (grad_output, x, w, spec)."""
    lay = layout(lay)
    dev = _placement({"grad_output": grad_output, "x": x, "w": w})
    g, gs, gd = _as_array(grad_output, "grad_output", 4)
    x, xs, xd = _as_array(x, "x", 4)
    w, ws, wd = _as_array(w, "w", 4)
    dtype = _compute_dtype(gd, xd, wd)
    spec = _transpose_spec(_nchw(xs, lay), _oihw(ws, lay), False, None, stride, padding,
                           output_padding, groups, dilation, dtype, dev, lay)
    _check_grad_output(gs, _shown(spec.x_shape, lay), lay, xs, ws)
    g, x, w = _prepare((g, x, w), dtype, dev)
    return g, x, w, spec


# ---------------------------------------------------------------------------------------------
# max-pool


def _pool_sizes(x_shape, kernel, stride, padding, dilation, ceil_mode, label):
    """Output sizes of a pool (PyTorch's rule; ``ceil_mode``: a last window must start inside
    the input or the left padding)."""
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding={padding} must be at most half of kernel_size={kernel}")
    out = []
    for size, k, s, p, d in zip(x_shape[2:], kernel, stride, padding, dilation):
        span = size + 2 * p - d * (k - 1) - 1
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    if min(out) < 1:
        raise ValueError(
            f"kernel_size={kernel} with dilation={dilation} does not fit {label} "
            f"with padding={padding}: the output would be empty"
        )
    return tuple(out)


def _pool_spec(x_shape, kernel_size, stride, padding, dilation, ceil_mode, dtype, dev,
               label=None, lay="NCHW"):
    kernel = pair(kernel_size, "kernel_size", 1)
    stride = kernel if stride is None else pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    ceil_mode = flag(ceil_mode, "ceil_mode")
    label = label or f"x of shape {_shown(x_shape, lay)}"
    _check_batch_shape(x_shape, label)
    out = _pool_sizes(x_shape, kernel, stride, padding, dilation, ceil_mode, label)
    return PoolSpec(x_shape, kernel, stride, padding, dilation, ceil_mode, out,
                    _dtype_name(dtype), dev, lay)


def _input_shape(input_shape, lay):
    """``input_shape`` (of the caller's layout) as 4 ints in NCHW order."""
    if isinstance(input_shape, (str, bytes)) or np.ndim(input_shape) != 1:
        raise TypeError(f"input_shape must be a tuple of 4 ints, got {input_shape!r}")
    try:
        xs = tuple(operator.index(d) for d in input_shape)
    except TypeError as e:
        raise TypeError(f"input_shape must be a tuple of 4 ints, got {input_shape!r}") from e
    if len(xs) != 4:
        raise ValueError(f"input_shape must have 4 entries ({', '.join(lay)}), got "
                         f"{input_shape!r}")
    return _nchw(xs, lay)


def _host_or_device(x, name="x"):
    dev = _placement({name: x})
    x, xs, xd = _as_array(x, name, 4)
    return x, xs, _compute_dtype(xd), dev


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, lay="NCHW"):
    """Validate max_pool2d arguments; return (x, spec)."""
    lay = layout(lay)
    x, xs, dtype, dev = _host_or_device(x)
    spec = _pool_spec(_nchw(xs, lay), kernel_size, stride, padding, dilation, ceil_mode, dtype,
                      dev, lay=lay)
    (x,) = _prepare((x,), dtype, dev)
    return x, spec


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding,
                        dilation, ceil_mode, lay="NCHW"):
    """Validate max_pool2d_backward arguments; return (grad_output, indices, spec).

    Host indices come back as int64; their range, ``[0, H*W)``, is checked here or, for the
    caller's own int64 indices, by `indices_in_plane` or the kernel (see `_routable`). A window
    lying wholly in the padding has no input pixel; whatever index it carries (forward gives one outside the plane, as
    PyTorch) is accepted, and the returned copies route nothing from it: its index becomes 0
    and its gradient 0.
    """
    lay = layout(lay)
    dev = _placement({"grad_output": grad_output, "indices": indices})
    g, gs, gd = _as_array(grad_output, "grad_output", 4)
    if dev:
        ishape, idt = _device_shape(indices), _device_dtype(indices)
    else:
        indices = np.asarray(indices)
        ishape, idt = indices.shape, indices.dtype
    if idt.kind not in "iu":
        raise TypeError(f"indices must be an integer array, got dtype {idt}")
    xs = _input_shape(input_shape, lay)
    dtype = _compute_dtype(gd)
    spec = _pool_spec(xs, kernel_size, stride, padding, dilation, ceil_mode, dtype, dev,
                      label=f"input_shape={_shown(xs, lay)}", lay=lay)
    want = _shown(spec.out_shape, lay)
    if gs != want:
        raise ValueError(
            f"grad_output must have the forward output's shape {want} for "
            f"input_shape={_shown(xs, lay)}, got grad_output of shape {gs}"
        )
    if tuple(ishape) != gs:
        raise ValueError(
            f"indices must have grad_output's shape {gs}, got indices of shape {tuple(ishape)}"
        )
    (g,) = _prepare((g,), dtype, dev)
    if not dev:
        g, indices = _routable(g, indices, spec)
    return g, indices, spec


# ---------------------------------------------------------------------------------------------
# average pools


def _divisor(value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"divisor_override must be an int or None, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError as e:
        raise TypeError(f"divisor_override must be an int or None, got {value!r}") from e
    if v == 0 or abs(v) >= OPTION_LIMIT:
        raise ValueError(f"divisor_override must be a nonzero int below 2**31, got {value!r}")
    return v


def _avg_spec(xs, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
              dtype, dev, lay, label):
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = avg_options(
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    _check_batch_shape(xs, label)
    out = _pool_sizes(xs, kernel, stride, padding, (1, 1), ceil_mode, label)
    return AvgPoolSpec(xs, kernel, stride, padding, ceil_mode, count_include_pad, divisor, False,
                       out, _dtype_name(dtype), dev, lay)


def _adaptive_spec(xs, sizes_given, dtype, dev, lay, label):
    sizes = output_size(sizes_given)
    _check_batch_shape(xs, label)
    out = tuple(size if o is None else o for o, size in zip(sizes, xs[2:]))
    return AvgPoolSpec(xs, (0, 0), (0, 0), (0, 0), False, True, None, True, out,
                       _dtype_name(dtype), dev, lay)


def avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
               lay="NCHW"):
    """Validate avg_pool2d arguments; return (x, spec)."""
    lay = layout(lay)
    x, xs, dtype, dev = _host_or_device(x)
    xs = _nchw(xs, lay)
    spec = _avg_spec(xs, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override, dtype, dev, lay, f"x of shape {_shown(xs, lay)}")
    (x,) = _prepare((x,), dtype, dev)
    return x, spec


def adaptive_avg_pool2d(x, output_size, lay="NCHW"):
    """Validate adaptive_avg_pool2d arguments; return (x, spec)."""
    lay = layout(lay)
    x, xs, dtype, dev = _host_or_device(x)
    xs = _nchw(xs, lay)
    spec = _adaptive_spec(xs, output_size, dtype, dev, lay, f"x of shape {_shown(xs, lay)}")
    (x,) = _prepare((x,), dtype, dev)
    return x, spec


def _pool_grad(grad_output, input_shape, lay, make):
    """(grad_output, spec) of an average pool's backward: ``make(xs, dtype, dev, label)``."""
    lay = layout(lay)
    g, gs, dtype, dev = _host_or_device(grad_output, "grad_output")
    xs = _input_shape(input_shape, lay)
    spec = make(xs, dtype, dev, lay, f"input_shape={_shown(xs, lay)}")
    want = _shown(spec.out_shape, lay)
    if gs != want:
        raise ValueError(
            f"grad_output must have the forward output's shape {want} for "
            f"input_shape={_shown(xs, lay)}, got grad_output of shape {gs}"
        )
    (g,) = _prepare((g,), dtype, dev)
    return g, spec


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override, lay="NCHW"):
    """Validate avg_pool2d_backward arguments; return (grad_output, spec)."""
    return _pool_grad(grad_output, input_shape, lay, lambda xs, dt, dev, lay_, label: _avg_spec(
        xs, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, dt,
        dev, lay_, label))


def adaptive_avg_pool2d_backward(grad_output, input_shape, output_size, lay="NCHW"):
    """Validate adaptive_avg_pool2d_backward arguments; return (grad_output, spec)."""
    return _pool_grad(grad_output, input_shape, lay, lambda xs, dt, dev, lay_, label:
                      _adaptive_spec(xs, output_size, dt, dev, lay_, label))


# ---------------------------------------------------------------------------------------------
# max-pool backward: indices a kernel can scatter


def _routable(g, indices, spec):
    """Host gradients and int64 indices that a kernel can scatter. Their range is checked
    here, except for the common case of the caller's own int64 indices with no empty window:
    those are checked by `indices_in_plane` after the method is known, or by the kernel itself
    where it is registered with ``checks_indices`` (fastconv.functional._run), which saves a
    pass over them."""
    rows, cols = empty_windows(spec)
    if rows or cols:  # rare: copies, never the caller's arrays
        g, indices = g.copy(), np.array(indices)
        h_axis = 2 if spec.layout == "NCHW" else 1
        for a in (g, indices):
            a[(slice(None),) * h_axis + (list(rows),)] = 0
            a[(slice(None),) * (h_axis + 1) + (list(cols),)] = 0
    elif indices.dtype == np.int64:
        return g, np.ascontiguousarray(indices)
    indices_in_plane(indices, spec)
    return g, np.ascontiguousarray(indices, dtype=np.int64)


def indices_in_plane(indices, spec) -> None:
    """ValueError unless every index is a flat position in the input plane (host indices of
    max_pool2d_backward, after `_routable`)."""
    plane = spec.x_shape[2] * spec.x_shape[3]
    # one pass instead of min() and max(): negative values are huge seen as unsigned
    flat = indices.reshape(-1)
    if flat.size and (flat if indices.dtype.kind == "u" else flat.view(
            np.dtype(f"u{indices.dtype.itemsize}"))).max() >= plane:
        lo, hi = int(flat.min()), int(flat.max())
        raise ValueError(
            f"indices must lie in [0, {plane}) (flat positions in the {spec.x_shape[2]}x"
            f"{spec.x_shape[3]} input plane) outside windows lying wholly in the padding, got "
            f"values in [{lo}, {hi}]"
        )


@functools.lru_cache(maxsize=256)
def empty_windows(spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The output rows and columns of a pool whose windows hold no input pixel (every tap in
    the padding): possible with dilation or ``ceil_mode``."""
    rows, cols = (tuple(i for i in range(o)
                        if not any(0 <= i * s - p + t * d < size for t in range(k)))
                  for o, size, k, s, p, d in zip(spec.out_hw, spec.x_shape[2:], spec.kernel,
                                                 spec.stride, spec.padding, spec.dilation))
    return rows, cols
