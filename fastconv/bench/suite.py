"""The benchmark's problems: the shape suite (DESIGN.md section 4), a held-out set, the inputs
of each (op, shape, dtype), its float64 NumPy reference, and the calls of fastconv and its peers.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np

from .. import _validate
from . import peers as _peers

__all__ = ["ConvShape", "PoolShape", "BoxShape", "TransposeShape", "CONV_SHAPES", "POOL_SHAPES",
           "BOX_SHAPES", "TRANSPOSE_SHAPES", "HELDOUT_SHAPES", "SHAPES", "QUICK_SHAPES", "OPS",
           "DEFAULT_OPS", "PEERS", "Problem", "peer_call", "max_error", "select_shapes"]


# ---------------------------------------------------------------------------------------------
# the shape suite (DESIGN.md section 4)


class _Shape:
    name: str

    @property
    def held_out(self):
        """Kept out of the policy table (see HELDOUT_SHAPES): named "held-..."."""
        return self.name.startswith("held-")


@dataclass(frozen=True)
class ConvShape(_Shape):
    name: str
    n: int
    c: int
    hw: int
    k: int
    r: int
    stride: int = 1
    pad: int = 0
    groups: int = 1
    hidden: bool = False  # not part of the suite: tiny shapes for tests

    kind = "conv"

    @property
    def x_shape(self):
        return (self.n, self.c, self.hw, self.hw)

    @property
    def w_shape(self):
        return (self.k, self.c // self.groups, self.r, self.r)

    @property
    def conf(self):
        return dict(stride=self.stride, padding=self.pad, groups=self.groups)

    def describe(self):
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"x {self.x_shape}, w {self.w_shape}, stride {self.stride}, pad {self.pad}{g}")


@dataclass(frozen=True)
class PoolShape(_Shape):
    name: str
    x_shape: tuple
    kernel: int
    stride: int
    hidden: bool = False

    kind = "pool"

    @property
    def conf(self):
        return dict(kernel_size=self.kernel, stride=self.stride)

    def describe(self):
        return f"x {self.x_shape}, {self.kernel}x{self.kernel} stride {self.stride}"


@dataclass(frozen=True)
class BoxShape(_Shape):
    """Global (adaptive) average pooling of ``x_shape`` to ``output_size``."""

    name: str
    x_shape: tuple
    output_size: int = 1
    hidden: bool = False

    kind = "box"

    @property
    def conf(self):
        return dict(output_size=self.output_size)

    def describe(self):
        return f"x {self.x_shape} to {self.output_size}x{self.output_size}"


@dataclass(frozen=True)
class TransposeShape(ConvShape):
    """A transposed convolution: x (n, c, hw, hw), w (c, k, r, r) (one group)."""

    kind = "transpose"

    @property
    def w_shape(self):
        return (self.c, self.k, self.r, self.r)

    @property
    def conf(self):
        return dict(stride=self.stride, padding=self.pad)

    def describe(self):
        return f"x {self.x_shape}, w {self.w_shape}, stride {self.stride}, pad {self.pad}"


CONV_SHAPES = [
    ConvShape("lenet-c1", 64, 1, 28, 30, 5),
    ConvShape("keras-c1", 64, 1, 28, 64, 3),
    ConvShape("keras-c2", 64, 64, 13, 64, 3),
    ConvShape("cifar-c1", 128, 3, 32, 32, 3, pad=1),
    ConvShape("vgg-64", 8, 64, 56, 64, 3, pad=1),
    ConvShape("vgg-256", 8, 256, 28, 256, 3, pad=1),
    ConvShape("resnet-1x1", 8, 256, 28, 64, 1),
    ConvShape("alexnet-c1", 8, 3, 224, 96, 11, stride=4, pad=2),
    ConvShape("mobilenet-dw", 8, 128, 56, 128, 3, pad=1, groups=128),
    ConvShape("tiny", 2, 3, 10, 4, 3, pad=1, hidden=True),
]


POOL_SHAPES = [  # named by kernel and (N, C, H) with H = W
    PoolShape("pool2-64x30x24", (64, 30, 24, 24), 2, 2),  # after LeNet's first conv
    PoolShape("pool2-64x64x26", (64, 64, 26, 26), 2, 2),  # after the Keras MNIST convs
    PoolShape("pool2-8x64x112", (8, 64, 112, 112), 2, 2),  # VGG
    PoolShape("pool2-8x256x56", (8, 256, 56, 56), 2, 2),  # VGG
    PoolShape("pool3-8x96x55", (8, 96, 55, 55), 3, 2),  # AlexNet: 3x3 stride 2, overlapping
    PoolShape("tiny-pool", (2, 3, 10, 10), 3, 2, hidden=True),
]
BOX_SHAPES = [  # global average pooling at the end of ResNet and MobileNet (issue 14)
    BoxShape("gap-resnet", (8, 64, 28, 28)),  # the resnet-1x1 output
    BoxShape("gap-mobilenet", (8, 128, 56, 56)),  # the mobilenet-dw output
    BoxShape("tiny-gap", (2, 3, 6, 6), hidden=True),
]
TRANSPOSE_SHAPES = [  # a decoder's 2x2 stride-2 upsampling: 8x64x28x28 -> 8x32x56x56
    TransposeShape("decoder-2x2", 8, 64, 28, 32, 2, stride=2),
    TransposeShape("tiny-decoder", 2, 4, 5, 3, 2, stride=2, hidden=True),
]
#: Shapes of neither the suite nor the policy table: "auto within 10% of the fastest" is also
#: checked on these, so that it tests the policy and not its training data.
HELDOUT_SHAPES = [
    ConvShape("held-lenet-c2", 32, 20, 12, 50, 5),
    ConvShape("held-vgg-128", 4, 128, 40, 128, 3, pad=1),
    ConvShape("held-resnet-s2", 16, 64, 28, 128, 3, stride=2, pad=1),
    ConvShape("held-dw-s2", 16, 64, 30, 64, 3, stride=2, pad=1, groups=64),
    ConvShape("held-1x1-512", 4, 512, 14, 128, 1),
    ConvShape("held-cifar-5x5", 64, 16, 16, 32, 5, pad=2),
    PoolShape("held-pool2-32x48x40", (32, 48, 40, 40), 2, 2),
    PoolShape("held-pool3-16x64x27", (16, 64, 27, 27), 3, 2),
]
SHAPES = {s.name: s for s in
          CONV_SHAPES + POOL_SHAPES + BOX_SHAPES + TRANSPOSE_SHAPES + HELDOUT_SHAPES}
QUICK_SHAPES = ("lenet-c1", "keras-c2", "mobilenet-dw", "pool2-64x30x24", "pool3-8x96x55")


OPS = {  # bench op -> (fastconv function, shape kind)
    "conv-fwd": ("conv2d", "conv"),
    "conv-bwd": ("conv2d_backward", "conv"),
    "pool-fwd": ("max_pool2d", "pool"),
    "pool-bwd": ("max_pool2d_backward", "pool"),
    "gap-fwd": ("adaptive_avg_pool2d", "box"),
    "gap-bwd": ("adaptive_avg_pool2d_backward", "box"),
    "convT-fwd": ("conv_transpose2d", "transpose"),
    "convT-bwd": ("conv_transpose2d_backward", "transpose"),
    "conv-fwd-nhwc": ("conv2d", "conv"),  # the conv suite again, channels-last (HWIO)
    "conv-bwd-nhwc": ("conv2d_backward", "conv"),
}
#: What `bench` runs without --ops: the channels-last run of the conv suite is asked for.
DEFAULT_OPS = tuple(op for op in OPS if not op.endswith("-nhwc"))


PEERS = ("numpy", "scipy", "torch", "torch-cuda")


# ---------------------------------------------------------------------------------------------
# one problem: an op on a shape in a dtype


class Problem:
    """Inputs, reference, work and the fastconv call of one (op, shape, dtype)."""

    def __init__(self, op, shape, dtype):
        self.op, self.shape, self.dtype = op, shape, np.dtype(dtype)
        self.fc_op = OPS[op][0]
        self.layout = "NHWC" if op.endswith("-nhwc") else "NCHW"
        self._inputs = None

    def __repr__(self):
        return f"{self.op} {self.shape.name} {self.dtype}"

    @property
    def key(self):
        return (self.op, self.shape.name, str(self.dtype))

    def inputs(self):
        """The arguments of fastconv's function (arrays in ``dtype``, in the op's layout), the
        same in every process: seeded by the problem's name."""
        if self._inputs is None:
            seed = sum(map(ord, f"{self.op}/{self.shape.name}"))
            rng = np.random.default_rng(seed)
            dt = self.dtype

            def rand(shape):
                return rng.standard_normal(shape).astype(dt)

            s, op = self.shape, self.op.removesuffix("-nhwc")
            if op == "conv-fwd":
                a = (rand(s.x_shape), rand(s.w_shape), rand(s.k))
            elif op == "conv-bwd":
                x, w = rand(s.x_shape), rand(s.w_shape)
                spec = _validate.conv2d(x, w, None, s.stride, s.pad, 1, s.groups)[-1]
                a = (rand(spec.out_shape), x, w)
            elif op == "pool-fwd" or op == "gap-fwd":
                a = (rand(s.x_shape),)
            elif op == "gap-bwd":
                a = (rand((*s.x_shape[:2], s.output_size, s.output_size)), s.x_shape)
            elif op == "convT-fwd":
                a = (rand(s.x_shape), rand(s.w_shape), rand(s.k))
            elif op == "convT-bwd":
                x, w = rand(s.x_shape), rand(s.w_shape)
                spec = _validate.conv_transpose2d(x, w, None, s.stride, s.pad, 0, 1, 1)[-1]
                a = (rand(spec.x_shape), x, w)
            else:
                x = rand(s.x_shape)
                _, idx = _peers.im2col_max_pool2d(x, **s.conf)
                a = (rand(idx.shape), np.ascontiguousarray(idx), s.x_shape)
            if self.layout == "NHWC":  # the same numbers, channels-last, filters HWIO
                a = _channels_last(a)
            self._inputs = a
        return self._inputs

    def spec(self, on_device=False):
        from ..functional import _FUNCTIONS, _args

        a = self.inputs()
        bound = inspect.signature(_FUNCTIONS[self.fc_op]).bind(*a, **self.shape.conf,
                                                               layout=self.layout)
        bound.apply_defaults()
        spec = _args(self.fc_op, bound.arguments)[0]
        return spec._replace(on_device=on_device)

    @property
    def flops(self):
        """Floating-point operations (convolutions only; the backward counts twice the
        forward), or None."""
        if self.shape.kind not in ("conv", "transpose"):
            return None
        f = self.spec().flops
        return 2 * f if "bwd" in self.op else f

    @property
    def nbytes(self):
        """Bytes a pool must move at least (inputs read, outputs written), or None."""
        if self.shape.kind not in ("pool", "box"):
            return None
        spec = self.spec()
        n_out = int(np.prod(spec.out_shape))
        n_in = int(np.prod(spec.x_shape))
        it = self.dtype.itemsize
        if self.shape.kind == "box":
            return (n_in + n_out) * it
        return n_in * it + n_out * (it + 8)  # x and dx; out or grad, and int64 indices

    @property
    def reduction(self):
        """Longest sum behind one output value (scales the error tolerance)."""
        if self.shape.kind == "pool":
            return 16
        spec = self.spec()
        if self.shape.kind == "box":
            return int(np.prod(spec.x_shape[2:]))
        n, _, oh, ow = spec.out_shape
        k, cg, r, s = spec.w_shape
        if self.shape.kind == "transpose":  # the grad-input of a conv: sums over K/g * R*S
            return max(k // spec.groups * r * s, n * oh * ow)
        return max(cg * r * s, n * oh * ow) if "bwd" in self.op else cg * r * s

    def reference(self):
        """The NumPy result in float64 (from the same inputs, upcast exactly)."""
        a = [np.asarray(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
             else v for v in self.inputs()]
        return tuple(np.ascontiguousarray(r) for r in _numpy_peer(self.op, a, self.shape.conf))

    def fastconv_call(self, method, device="cpu"):
        """(call, finish): a zero-argument callable running fastconv and a function turning
        its result into a tuple of NumPy arrays. device: "cpu", "gpu" (device arrays) or
        "gpu+copy" (host arrays, transfers included)."""
        import fastconv as fc

        a = self.inputs()
        sync = None
        if device.startswith("gpu"):
            from numba import cuda

            sync = cuda.synchronize
            if device == "gpu":
                a = tuple(cuda.to_device(v) if isinstance(v, np.ndarray) else v for v in a)
        fn = getattr(fc, self.fc_op)
        conf = dict(self.shape.conf, method=method)
        if self.layout != "NCHW":
            conf["layout"] = self.layout
        if self.op == "pool-fwd":
            conf["return_indices"] = True

        def call():
            return fn(*a, **conf)

        if sync is not None:
            inner = call

            def call():
                r = inner()
                sync()
                return r

        def finish(r):
            r = tuple(r) if isinstance(r, tuple) else (r,)
            return tuple(v.copy_to_host() if hasattr(v, "copy_to_host") else np.asarray(v)
                         for v in r)

        return call, finish


def _relayout(args, x_axes, w_axes, filters=True):
    """Conv arguments (or gradients) with their 4-D arrays transposed: with ``filters`` the
    last 4-D one is the filter bank (``w_axes``), the others are activations (``x_axes``);
    shapes (tuples) follow ``x_axes``."""
    four = [i for i, v in enumerate(args) if isinstance(v, np.ndarray) and v.ndim == 4]
    if not filters:
        four.append(-1)
    out = []
    for i, v in enumerate(args):
        if isinstance(v, tuple):
            v = tuple(v[j] for j in x_axes)
        elif i in four:
            v = np.ascontiguousarray(v.transpose(w_axes if i == four[-1] else x_axes))
        out.append(v)
    return tuple(out)


def _channels_last(args, filters=True):
    return _relayout(args, (0, 2, 3, 1), (2, 3, 1, 0), filters)


def _numpy_peer(op, a, conf):
    if op.endswith("-nhwc"):  # the NCHW result of the same numbers, channels-last
        out = _numpy_peer(op.removesuffix("-nhwc"), _relayout(a, (0, 3, 1, 2), (3, 2, 0, 1)),
                          conf)
        return _channels_last(out, filters=len(out) > 1)  # (y,) or (dx, dw, db)
    if op == "conv-fwd":
        return (_peers.im2col_conv2d(*a, **conf),)
    if op == "conv-bwd":
        return _peers.im2col_conv2d_backward(*a, **conf)
    if op == "pool-fwd":
        return _peers.im2col_max_pool2d(*a, **conf)
    if op == "gap-fwd":
        return (_peers.numpy_adaptive_avg_pool2d(*a, **conf),)
    if op == "gap-bwd":
        return (_peers.numpy_adaptive_avg_pool2d_backward(*a, **conf),)
    if op == "convT-fwd":
        return (_peers.im2col_conv_transpose2d(*a, **conf),)
    if op == "convT-bwd":
        return _peers.im2col_conv_transpose2d_backward(*a, **conf)
    return (_peers.im2col_max_pool2d_backward(*a, **conf),)


def peer_call(problem, peer, device="cpu"):
    """(call, finish) for a peer on a problem, like `Problem.fastconv_call`."""
    a, conf = problem.inputs(), problem.shape.conf
    if peer == "numpy":
        return (lambda: _numpy_peer(problem.op, a, conf)), (
            lambda r: tuple(np.asarray(v) for v in r))
    if peer == "scipy":
        return (lambda: _peers.scipy_conv2d(*a, **conf)), (lambda r: (r,))
    if peer in ("torch", "torch-cuda"):
        return _peers.torch_callable(problem.fc_op, a, conf, "cuda" if peer == "torch-cuda"
                                     else "cpu", layout=problem.layout)
    raise ValueError(f"unknown peer {peer!r}")


def max_error(problem, outputs, reference):
    """(relative max error, ok): max |y - ref| / max(1, max |ref|) over the float outputs;
    pool indices must match exactly."""
    err, ok = 0.0, True
    for y, ref in zip(outputs, reference):
        y = np.asarray(y)
        if y.shape != ref.shape:
            return math.inf, False
        if ref.dtype.kind in "iu":
            ok &= bool(np.array_equal(y, ref))
            continue
        scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        e = float(np.max(np.abs(y.astype(np.float64) - ref))) / scale if ref.size else 0.0
        err = max(err, e if np.isfinite(e) else math.inf)
    eps = 1e-5 if problem.dtype == np.float32 else 1e-12
    ok &= err <= eps * math.sqrt(problem.reduction)
    return err, ok


def select_shapes(spec, quick=False):
    """Shapes named by a comma list of names or beginnings of names ("vgg", "pool2")."""
    if not spec:
        names = QUICK_SHAPES if quick else [s.name for s in SHAPES.values()
                                             if not s.hidden and not s.held_out]
        return [SHAPES[n] for n in names]
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [s for s in SHAPES.values() if s.name == part] or [
            s for s in SHAPES.values() if s.name.startswith(part) and not s.hidden]
        if part == "heldout":
            hits = [s for s in SHAPES.values() if s.held_out]
        if not hits:
            raise SystemExit(
                f"--shapes: {part!r} matches none of {', '.join(SHAPES)}")
        chosen += [s for s in hits if s not in chosen]
    return chosen
