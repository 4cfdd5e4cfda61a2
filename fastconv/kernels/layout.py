"""Channels-last (NHWC, with HWIO filters) for kernels written for NCHW: transpose the
arguments in, run the NCHW kernel, transpose the results back. Kernels that read NHWC natively
are registered as such and never come here (see fastconv._registry)."""

from __future__ import annotations

import numpy as np

__all__ = ["adapt"]

# For each op: the kind of each positional argument of its entry point and of each result.
# "x": an activation (N, H, W, C) <-> (N, C, H, W); "w": filters (R, S, I, O) <-> (O, I, R, S);
# "spec": the spec; None: passed through (bias, flags, bias gradient).
_ARGS = {
    "conv2d": (("x", "w", None, "spec"), "x"),
    "conv2d_backward": (("x", "x", "w", "spec", None, None, None), ("x", "w", None)),
    "conv_transpose2d": (("x", "w", None, "spec"), "x"),
    "conv_transpose2d_backward": (("x", "x", "w", "spec", None, None, None), ("x", "w", None)),
    "max_pool2d": (("x", "spec", None), ("x", "x")),
    "max_pool2d_backward": (("x", "x", "spec"), "x"),
    "avg_pool2d": (("x", "spec"), "x"),
    "avg_pool2d_backward": (("x", "spec"), "x"),
    "adaptive_avg_pool2d": (("x", "spec"), "x"),
    "adaptive_avg_pool2d_backward": (("x", "spec"), "x"),
}

_IN = {"x": (0, 3, 1, 2), "w": (3, 2, 0, 1)}
_OUT = {"x": (0, 2, 3, 1), "w": (2, 3, 1, 0)}


def adapt(op, fn):
    """``fn`` (an NCHW entry point of ``op``) as an entry point for NHWC arguments and specs."""
    kinds, results = _ARGS[op]

    def channels_last(*args):
        spec = args[kinds.index("spec")]
        inner = spec._replace(layout="NCHW")
        moved = [inner if kind == "spec" else _permute(a, _IN.get(kind), spec)
                 for a, kind in zip(args, kinds)]
        out = fn(*moved)
        if isinstance(results, str):
            return _permute(out, _OUT[results], spec)
        return tuple(_permute(o, _OUT.get(kind), spec) for o, kind in zip(out, results))

    channels_last.__name__ = f"{getattr(fn, '__name__', op)}_nhwc"
    return channels_last


def _permute(a, axes, spec):
    if a is None or axes is None:
        return a
    if spec.on_device:
        from .cuda import arrays

        return arrays.permute(a, axes)
    return np.ascontiguousarray(np.transpose(a, axes))
