"""conv_transpose2d on any method: it is the grad-input of a conv2d (the spec describes that
conv, see fastconv._validate), and its backward is that conv's forward and grad-weight. Each
method's own conv2d kernels do the work, in the layouts they read; nothing here is a kernel of
its own. On the GPU (device arrays) only NCHW comes here: cuda.arrays adds the bias along
axis 1."""

from __future__ import annotations

from . import _reduce

__all__ = ["forward", "backward"]


def forward(conv2d_backward):
    """The conv_transpose2d entry point ``fn(x, w, b, spec) -> out`` over a method's
    conv2d_backward."""

    def conv_transpose2d(x, w, b, spec):
        out = conv2d_backward(x, None, w, spec, True, False, False)[0]
        if b is not None:
            out = _add_bias(out, b, spec)
        return out

    return conv_transpose2d


def backward(conv2d_forward, conv2d_backward):
    """The conv_transpose2d_backward entry point ``fn(grad_out, x, w, spec, need_input,
    need_weight, need_bias)`` over a method's conv2d forward and backward: the conv's input is
    the grad-output here, its grad-output the transposed convolution's input."""

    def conv_transpose2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
        dx = conv2d_forward(g, w, None, spec) if need_input else None
        dw = conv2d_backward(x, g, w, spec, False, True, False)[1] if need_weight else None
        db = _channel_sums(g, spec) if need_bias else None
        return dx, dw, db

    return conv_transpose2d_backward


def _add_bias(out, b, spec):
    if spec.on_device:
        from .cuda import arrays

        return arrays.add_bias(out, b)
    out += b if spec.layout == "NHWC" else b.reshape(-1, 1, 1)
    return out


def _channel_sums(g, spec):
    if spec.on_device:
        from .cuda import arrays

        return arrays.channel_sums(g)
    return _reduce.channel_sums(g, channels_last=spec.layout == "NHWC")
