"""The one registry of algorithms: (op, method) -> implementation, availability and limits.

Implementations are named as ``"module:function"`` strings and imported on first use, so that
``import fastconv`` stays cheap and a method whose backend is missing (no compiled core, no GPU)
fails only when it is asked for. Every kernel entry point has one of these signatures:

    conv2d               fn(x, w, b, spec) -> out
    conv2d_backward      fn(grad_out, x, w, spec, need_input, need_weight, need_bias)
                             -> (grad_input, grad_weight, grad_bias), None where not needed
    max_pool2d           fn(x, spec, return_indices) -> (out, indices or None)
    max_pool2d_backward  fn(grad_out, indices, spec) -> grad_input
    avg_pool2d, adaptive_avg_pool2d                    fn(x, spec) -> out
    avg_pool2d_backward, adaptive_avg_pool2d_backward  fn(grad_out, spec) -> grad_input
    conv_transpose2d, conv_transpose2d_backward  as conv2d and conv2d_backward; the spec is
                         that of the conv2d whose grad-input the transposed convolution is

Arrays come in the spec's layout. An implementation that reads only NCHW is run on NHWC
arguments through fastconv.kernels.layout (`Impl.kernel`); one registered with
``layouts=("NCHW", "NHWC")`` reads both. conv_transpose2d is registered over each method's
conv2d kernels (``over``), see fastconv.kernels.transpose.

Readers (bench, info, tests) use the read API: `implementations`, `describe`, `known`,
`methods`, `missing`, `candidates`. "auto" is `resolve(op, "auto", spec)`: the policy of
fastconv._policy over `candidates`, remembered per problem.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from typing import Callable, NamedTuple

from . import _policy
from .kernels import _parallel

__all__ = ["BackendUnavailableError", "register", "resolve", "methods", "known",
           "implementations", "implementation", "describe", "candidates", "missing", "OPS"]

OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d",
       "avg_pool2d_backward", "adaptive_avg_pool2d", "adaptive_avg_pool2d_backward",
       "conv_transpose2d", "conv_transpose2d_backward")


class BackendUnavailableError(RuntimeError):
    """A method the caller asked for cannot run here (no GPU, compiled core not built)."""


class Impl(NamedTuple):
    """One registered implementation (read-only)."""

    op: str
    method: str
    target: str  # "package.module:function"
    device: str  # "cpu" or "cuda"
    unavailable: Callable[[], str | None]  # None when usable here, else the reason
    unsupported: Callable[[object], str | None]  # spec -> None when handled, else the reason
    priority: int
    layouts: tuple[str, ...] = ("NCHW",)  # the layouts it reads natively
    over: tuple[str, ...] = ()  # targets that ``target`` is a factory over
    checks_indices: bool = False  # max_pool2d_backward: range-checks the indices it reads

    @property
    def fn(self):
        """The entry point, for arguments in one of ``layouts``."""
        return _built(self.target, self.over)

    def kernel(self, spec):
        """The entry point for arguments in ``spec.layout``."""
        if spec.layout in self.layouts:
            return self.fn
        return _adapted(self.op, self.target, self.over)

    def supports(self, spec) -> bool:
        return self.unsupported(spec) is None


@functools.cache
def _load(target):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _built(target, over):
    fn = _load(target)
    return fn(*map(_load, over)) if over else fn


@functools.cache
def _adapted(op, target, over):
    from .kernels import layout

    return layout.adapt(op, _built(target, over))


_REGISTRY: dict[tuple[str, str], Impl] = {}
_memo: dict = {}  # auto's choices: (op, spec, threads, auto state) -> Impl


def _changed():
    _memo.clear()


def register(op, method, target, *, device="cpu", unavailable=lambda: None,
             unsupported=lambda spec: None, priority=0, layouts=("NCHW",), over=(),
             checks_indices=False):
    """Add (or replace) an implementation of ``op`` under the name ``method``.

    ``unavailable()`` says why the method cannot run on this machine (None when it can);
    ``unsupported(spec)`` why it cannot run this problem (None when it can): every limit an
    implementation has belongs there, so that "auto" never picks a method that then refuses.
    Either may name a ``"module:function"`` target, imported when first called.
    ``layouts``: the layouts the entry point reads (others are transposed for it). With
    ``over``, ``target`` names a factory called once with the functions ``over`` names.
    ``checks_indices`` (max_pool2d_backward): the kernel tests every index against the plane
    in its own pass and raises fastconv.kernels.IndicesOutsidePlane before returning, so
    validation may skip its separate pass over the indices (fastconv.functional._run).
    """
    assert op in OPS, op
    _REGISTRY[op, method] = Impl(
        op, method, target, device, functools.cache(_lazy(unavailable)), _lazy(unsupported),
        priority, tuple(layouts), tuple(over), bool(checks_indices),
    )
    _changed()


def unregister(op, method) -> None:
    """Remove an implementation (KeyError if there is none)."""
    del _REGISTRY[op, method]
    _changed()


@contextlib.contextmanager
def scoped():
    """Undo every registration made inside the block (tests, experiments)."""
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
        _changed()


def reprobe() -> None:
    """Ask every availability probe again (their answers are kept: the machine rarely
    changes; tests that fake a GPU's absence do)."""
    for impl in _REGISTRY.values():
        impl.unavailable.cache_clear()  # type: ignore[attr-defined]  # a functools.cache
    _changed()


def _lazy(fn):
    if not isinstance(fn, str):
        return fn
    return lambda *args: _load(fn)(*args)


def implementations(op=None) -> tuple[Impl, ...]:
    """The registered implementations (of ``op``, or of every op), in registration order."""
    return tuple(i for (o, _), i in _REGISTRY.items() if op is None or o == op)


def implementation(op, method) -> Impl:
    """The implementation registered as ``method`` for ``op`` (ValueError if there is none)."""
    check_method(op, method)
    return _REGISTRY[op, method]


def describe(method, op=None) -> dict:
    """What the registry knows of ``method``: per op, its device, priority and availability."""
    out = {}
    for impl in implementations(op):
        if impl.method == method:
            reason = impl.unavailable()
            out[impl.op] = {"device": impl.device, "priority": impl.priority,
                            "target": impl.target, "usable": reason is None, "reason": reason}
    if not out:
        raise ValueError(f"method={method!r} is not one of {known(op)}")
    return out


def known(op=None):
    """Registered method names (usable here or not), in registration order."""
    return tuple(dict.fromkeys(i.method for i in implementations(op)))


def methods(op=None):
    """The method names usable on this machine: for ``op``, or, without it, those whose every
    registered op is usable."""
    if op is not None:
        return tuple(i.method for i in implementations(op) if i.unavailable() is None)
    broken = {i.method for i in implementations() if i.unavailable() is not None}
    return tuple(m for m in known() if m not in broken)


def missing(device="cpu"):
    """(method, reason) for each method of ``device`` that cannot run some op here."""
    out: dict[str, str] = {}
    for impl in implementations():
        reason = impl.unavailable() if impl.device == device else None
        if reason is not None:
            out.setdefault(impl.method, reason)
    return list(out.items())


def candidates(op, spec):
    """Implementations that can run ``spec`` here, on the spec's side (host or device)."""
    device = "cuda" if spec.on_device else "cpu"
    return [impl for impl in implementations(op)
            if impl.device == device and impl.unavailable() is None and impl.supports(spec)]


def _auto(op, spec):
    """The method="auto" choice: always one of `candidates` (usable, right side, supports the
    problem); which one, see fastconv._policy. Remembered, since small GPU calls are short
    enough for a few microseconds to show."""
    threads = _parallel.count
    key = (op, spec, threads, _policy.AUTO.state())
    impl = _memo.get(key)
    if impl is not None:
        return impl
    ok = candidates(op, spec)
    if not ok:  # only possible for device arrays without a usable CUDA method
        raise BackendUnavailableError(
            f"no method can run {op} on {'device' if spec.on_device else 'host'} arrays here; "
            "see `python -m fastconv info`"
        )
    impl = _policy.AUTO.choose(op, spec, ok, threads)
    if len(_memo) > 4096:
        _memo.clear()
    _memo[key] = impl
    return impl


def check_method(op, method) -> None:
    """Raise unless ``method`` names "auto" or a registered method of ``op``."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {method!r}")
    if method != "auto" and (op, method) not in _REGISTRY:
        raise ValueError(f"method={method!r} is not one of {('auto', *known(op))}")


def resolve(op, method, spec) -> Impl:
    """The implementation to run ``op`` with ``method`` on ``spec``."""
    check_method(op, method)
    if method == "auto":
        return _auto(op, spec)
    impl = _REGISTRY[op, method]
    reason = impl.unavailable()
    if reason is not None:
        raise BackendUnavailableError(
            f"method={method!r} cannot run here: {reason}; see `python -m fastconv info`"
        )
    if spec.on_device and impl.device == "cpu":
        raise ValueError(
            f"method={method!r} runs on the CPU but the arrays are on the GPU; use one of "
            f"{tuple(i.method for i in implementations(op) if i.device == 'cuda')} "
            "or copy the arrays to the host"
        )
    reason = impl.unsupported(spec)
    if reason is not None:
        raise ValueError(f"method={method!r} cannot run this problem: {reason}")
    return impl


# ---------------------------------------------------------------------------------------------
# availability probes


def _cython_missing():
    try:
        importlib.import_module("fastconv.kernels._im2col")
        importlib.import_module("fastconv.kernels._pool")
    except ImportError as e:
        kernels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
        try:
            with open(os.path.join(kernels, "BUILD_FAILED.txt")) as f:
                return (f"the compiled core could not be built when fastconv was installed "
                        f"({f.read().strip()}); install a C compiler and reinstall")
        except OSError:
            pass
        return (f"the fastconv imported from {os.path.dirname(os.path.dirname(kernels))} has "
                f"no compiled Cython core ({e}); build it with `pip install .` run in the "
                "checkout (or `pip install -e .`)")
    return None


def _blas_missing():
    reason = _cython_missing()
    if reason is None:
        reason = importlib.import_module("fastconv.kernels._im2col").BLAS_UNAVAILABLE
    return reason


def cuda_missing():
    """None when a CUDA method can run here (a GPU, or the simulator), else the reason."""
    try:
        with warnings.catch_warnings():  # numba-cuda's import warns under newer NumPy
            warnings.simplefilter("ignore", DeprecationWarning)
            from numba import cuda
    except Exception as e:  # numba without its CUDA target
        return f"numba.cuda cannot be imported ({e})"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as e:
        return f"no usable CUDA GPU ({e})"
    return "no CUDA GPU was found (set NUMBA_ENABLE_CUDASIM=1 to use the simulator)"


# ---------------------------------------------------------------------------------------------
# the registrations: one line per (op, method)

_NAIVE = "fastconv.kernels.naive"
_IM2COL = "fastconv.kernels.im2col"
_DIRECT = "fastconv.kernels.direct"
_POOL = "fastconv.kernels.pool"
_CUDA = "fastconv.kernels.cuda"
_GEMM = dict(unavailable=_blas_missing, unsupported=f"{_IM2COL}:unsupported", priority=5,
             layouts=("NCHW", "NHWC"))
_CY = dict(unavailable=_cython_missing, priority=5)
_LOOPS = dict(unsupported=f"{_DIRECT}:unsupported", priority=10, layouts=("NCHW", "NHWC"))
_GPU = dict(device="cuda", unavailable=cuda_missing)
_AVG = ("avg_pool2d", "adaptive_avg_pool2d")  # one kernel pair: the spec holds the windows

register("conv2d", "naive", f"{_NAIVE}:conv2d_forward")
register("conv2d_backward", "naive", f"{_NAIVE}:conv2d_backward")
register("max_pool2d", "naive", f"{_NAIVE}:max_pool2d_forward")
register("max_pool2d_backward", "naive", f"{_NAIVE}:max_pool2d_backward")
register("conv2d", "im2col", f"{_IM2COL}:conv2d_forward", **_GEMM)
register("conv2d_backward", "im2col", f"{_IM2COL}:conv2d_backward", **_GEMM)
register("max_pool2d", "im2col", f"{_IM2COL}:max_pool2d_forward", **_CY)
register("max_pool2d_backward", "im2col", f"{_IM2COL}:max_pool2d_backward", **_CY)
register("conv2d", "direct", f"{_DIRECT}:conv2d_forward", **_LOOPS)
register("conv2d_backward", "direct", f"{_DIRECT}:conv2d_backward", **_LOOPS)
register("max_pool2d", "direct", f"{_POOL}:max_pool2d_forward", priority=10)
register("max_pool2d_backward", "direct", f"{_POOL}:max_pool2d_backward", priority=10,
         checks_indices=True)
# Winograd: 3x3 stride-1 only; below im2col's priority, so auto takes it where measured fastest
_WINO = dict(unavailable=_blas_missing, unsupported="fastconv.kernels.winograd:unsupported",
             priority=3, layouts=("NCHW", "NHWC"))
register("conv2d", "winograd", "fastconv.kernels.winograd:conv2d_forward", **_WINO)
register("conv2d_backward", "winograd", "fastconv.kernels.winograd:conv2d_backward", **_WINO)
register("conv2d", "cuda-naive", f"{_CUDA}:conv2d_forward_naive", **_GPU)
register("conv2d_backward", "cuda-naive", f"{_CUDA}:conv2d_backward_naive", **_GPU)
register("max_pool2d", "cuda-naive", f"{_CUDA}:max_pool2d_forward_naive", **_GPU)
register("max_pool2d_backward", "cuda-naive", f"{_CUDA}:max_pool2d_backward_naive", **_GPU)
register("conv2d", "cuda-im2col", f"{_CUDA}:conv2d_forward_im2col", **_GPU, priority=10)
register("conv2d_backward", "cuda-im2col", f"{_CUDA}:conv2d_backward_im2col", **_GPU,
         priority=10)
register("conv2d", "cuda-direct", f"{_CUDA}:conv2d_forward_direct", **_GPU, priority=20)
register("conv2d_backward", "cuda-direct", f"{_CUDA}:conv2d_backward_direct", **_GPU,
         priority=20)
register("max_pool2d", "cuda-direct", f"{_CUDA}:max_pool2d_forward_direct", **_GPU,
         priority=10)
register("max_pool2d_backward", "cuda-direct", f"{_CUDA}:max_pool2d_backward_direct", **_GPU,
         priority=10)

for _op in _AVG:
    register(_op, "naive", f"{_NAIVE}:avg_pool2d_forward")
    register(f"{_op}_backward", "naive", f"{_NAIVE}:avg_pool2d_backward")
    register(_op, "im2col", f"{_IM2COL}:avg_pool2d_forward", **_CY)
    register(f"{_op}_backward", "im2col", f"{_IM2COL}:avg_pool2d_backward", **_CY)
    register(_op, "direct", f"{_POOL}:avg_pool2d_forward", priority=10)
    register(f"{_op}_backward", "direct", f"{_POOL}:avg_pool2d_backward", priority=10)
    register(_op, "cuda-naive", f"{_CUDA}:avg_pool2d_forward_naive", **_GPU)
    register(f"{_op}_backward", "cuda-naive", f"{_CUDA}:avg_pool2d_backward", **_GPU)
    register(_op, "cuda-direct", f"{_CUDA}:avg_pool2d_forward_direct", **_GPU, priority=10)
    register(f"{_op}_backward", "cuda-direct", f"{_CUDA}:avg_pool2d_backward", **_GPU,
             priority=10)

# conv_transpose2d over each method's conv2d kernels, with that method's limits
_TRANSPOSE = "fastconv.kernels.transpose"
for _impl in implementations("conv2d_backward"):
    _m, _limits = _impl.method, dict(device=_impl.device, unavailable=_impl.unavailable,
                                     unsupported=_impl.unsupported, priority=_impl.priority,
                                     layouts=_impl.layouts)
    register("conv_transpose2d", _m, f"{_TRANSPOSE}:forward", over=(_impl.target,), **_limits)
    register("conv_transpose2d_backward", _m, f"{_TRANSPOSE}:backward",
             over=(_REGISTRY["conv2d", _m].target, _impl.target), **_limits)
del _op, _impl, _m, _limits
