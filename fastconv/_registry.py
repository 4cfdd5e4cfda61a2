"""The one registry of algorithms: (op, method) -> implementation, availability, the "auto" policy.

Implementations are named as ``"module:function"`` strings and imported on first use, so that
``import fastconv`` stays cheap and a method whose backend is missing (no compiled core, no GPU)
fails only when it is asked for. Every kernel entry point has one of these signatures:

    conv2d               fn(x, w, b, spec) -> out
    conv2d_backward      fn(grad_out, x, w, spec, need_input, need_weight, need_bias)
                             -> (grad_input, grad_weight, grad_bias), None where not needed
    max_pool2d           fn(x, spec, return_indices) -> (out, indices or None)
    max_pool2d_backward  fn(grad_out, indices, spec) -> grad_input
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable, NamedTuple

from . import _autotune

__all__ = ["BackendUnavailableError", "register", "resolve", "methods", "OPS"]

OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward")


class BackendUnavailableError(RuntimeError):
    """A method the caller asked for cannot run here (no GPU, compiled core not built)."""


class Impl(NamedTuple):
    op: str
    method: str
    target: str  # "package.module:function"
    device: str  # "cpu" or "cuda"
    unavailable: Callable[[], str | None]  # None when usable here, else the reason
    unsupported: Callable[[object], str | None]  # spec -> None when handled, else the reason
    priority: int

    @property
    def fn(self):
        return _load(self.target)

    def supports(self, spec) -> bool:
        return self.unsupported(spec) is None


@functools.cache
def _load(target):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[tuple[str, str], Impl] = {}
_generation = 0  # bumped by register(): auto's remembered choices are made again


def register(op, method, target, *, device="cpu", unavailable=lambda: None,
             unsupported=lambda spec: None, priority=0):
    """Add an implementation of ``op`` under the name ``method``.

    ``unavailable()`` says why the method cannot run on this machine (None when it can);
    ``unsupported(spec)`` why it cannot run this problem (None when it can): every limit an
    implementation has belongs there, so that "auto" never picks a method that then refuses.
    Either may name a ``"module:function"`` target, imported when first called.
    """
    global _generation
    assert op in OPS, op
    _generation += 1
    _REGISTRY[op, method] = Impl(
        op, method, target, device, functools.cache(_lazy(unavailable)), _lazy(unsupported),
        priority,
    )


def _lazy(fn):
    if not isinstance(fn, str):
        return fn
    return lambda *args: _load(fn)(*args)


def known(op=None):
    """Registered method names (usable here or not), in registration order."""
    return tuple(dict.fromkeys(m for o, m in _REGISTRY if op is None or o == op))


def methods(op=None):
    """The method names usable on this machine: for ``op``, or, without it, those whose every
    registered op is usable."""
    if op is not None:
        return tuple(m for (o, m), impl in _REGISTRY.items()
                     if o == op and impl.unavailable() is None)
    broken = {m for (_, m), impl in _REGISTRY.items() if impl.unavailable() is not None}
    return tuple(m for m in known() if m not in broken)


def missing(device="cpu"):
    """(method, reason) for each method of ``device`` that cannot run some op here."""
    out = {}
    for (_, m), impl in _REGISTRY.items():
        reason = impl.unavailable() if impl.device == device else None
        if reason is not None:
            out.setdefault(m, reason)
    return list(out.items())


def candidates(op, spec):
    """Implementations that can run ``spec`` here, on the spec's side (host or device)."""
    device = "cuda" if spec.on_device else "cpu"
    return [
        impl for (o, _), impl in _REGISTRY.items()
        if o == op and impl.device == device and impl.unavailable() is None and impl.supports(spec)
    ]


_auto_memo: dict = {}


def _auto(op, spec):
    """The method="auto" choice: always one of `candidates` (usable, right side, supports the
    problem); which one comes from measured times, see fastconv._autotune. Remembered, since
    small GPU calls are short enough for a few microseconds to show."""
    key = (op, spec, _generation, len(_REGISTRY), _autotune.state())
    impl = _auto_memo.get(key)
    if impl is not None and _REGISTRY.get((op, impl.method)) is impl:
        return impl
    ok = candidates(op, spec)
    if not ok:  # only possible for device arrays without a usable CUDA method
        raise BackendUnavailableError(
            f"no method can run {op} on {'device' if spec.on_device else 'host'} arrays here; "
            "see `python -m fastconv info`"
        )
    impl = _autotune.choose(op, spec, ok)
    if len(_auto_memo) > 4096:
        _auto_memo.clear()
    _auto_memo[key] = impl
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
            f"{tuple(m for (o, m), i in _REGISTRY.items() if o == op and i.device == 'cuda')} "
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
        where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return (f"the fastconv imported from {where} has no compiled Cython core ({e}); build "
                f"it with `pip install .` run in the checkout (or `pip install -e .`)")
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
register("conv2d", "naive", f"{_NAIVE}:conv2d_forward")
register("conv2d_backward", "naive", f"{_NAIVE}:conv2d_backward")
register("max_pool2d", "naive", f"{_NAIVE}:max_pool2d_forward")
register("max_pool2d_backward", "naive", f"{_NAIVE}:max_pool2d_backward")
_IM2COL = "fastconv.kernels.im2col"
_GEMM = dict(unavailable=_blas_missing, unsupported=f"{_IM2COL}:unsupported", priority=5)
register("conv2d", "im2col", f"{_IM2COL}:conv2d_forward", **_GEMM)
register("conv2d_backward", "im2col", f"{_IM2COL}:conv2d_backward", **_GEMM)
register("max_pool2d", "im2col", f"{_IM2COL}:max_pool2d_forward", unavailable=_cython_missing,
         priority=5)
register("max_pool2d_backward", "im2col", f"{_IM2COL}:max_pool2d_backward",
         unavailable=_cython_missing, priority=5)
_DIRECT = "fastconv.kernels.direct"
_LOOPS = dict(unsupported=f"{_DIRECT}:unsupported", priority=10)
register("conv2d", "direct", f"{_DIRECT}:conv2d_forward", **_LOOPS)
register("conv2d_backward", "direct", f"{_DIRECT}:conv2d_backward", **_LOOPS)
register("max_pool2d", "direct", "fastconv.kernels.pool:max_pool2d_forward", priority=10)
register("max_pool2d_backward", "direct", "fastconv.kernels.pool:max_pool2d_backward",
         priority=10)
_CUDA = "fastconv.kernels.cuda"
_GPU = dict(device="cuda", unavailable=cuda_missing)
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
