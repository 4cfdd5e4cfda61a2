"""The benchmark behind ``python -m fastconv bench``.

It times every method usable here (``fastconv.methods``, CPU and GPU), ``method="auto"``, and
the peers of `fastconv._peers` (a NumPy im2col reference in the style of "Deep Learning from
Scratch", scipy.signal loops on small shapes, PyTorch when installed) on the shape suite of
DESIGN.md section 4, for conv2d forward and backward and max-pool forward and backward. Each
result is checked against the NumPy reference computed in float64, and one table shows the
median time, the rate (GFLOP/s for convolutions, GB/s of memory traffic for max-pool), the
speed-up over the NumPy reference and over PyTorch, and the relative max error.

How the numbers are taken:

- inputs are made once per problem, outside the timed region (seeded, standard normal);
- each method runs once to compile (Numba, CUDA) and touch its buffers, a second time to
  estimate its duration, then ``ceil(budget / estimate)`` times (at least 3, at most 100, or
  ``--repeat``); the median is reported. When that second call takes over 2 s (0.5 s with
  ``--quick``), it is the one time reported;
- the garbage collector is off while timing; GPU calls end with ``cuda.synchronize()``; GPU
  methods are timed twice, on device arrays (``gpu``) and on host arrays with the transfers
  (``gpu+copy``);
- thread pools of other libraries keep spinning for a while after a call and slow the next
  library down many times over, so the runner pauses (``--pause``, 0.3 s) between two methods,
  and PyTorch runs in a separate worker process (``python -m fastconv.bench --worker``) that
  draws the same inputs from the same seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import _peers, _registry, _validate

__all__ = ["CONV_SHAPES", "POOL_SHAPES", "OPS", "Problem", "measure", "run", "main"]

# ---------------------------------------------------------------------------------------------
# the shape suite (DESIGN.md section 4)


@dataclass(frozen=True)
class ConvShape:
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
class PoolShape:
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
SHAPES = {s.name: s for s in CONV_SHAPES + POOL_SHAPES}
QUICK_SHAPES = ("lenet-c1", "keras-c2", "mobilenet-dw", "pool2-64x30x24", "pool3-8x96x55")

# bench name -> (fastconv op, kind of shape)
OPS = {
    "conv-fwd": ("conv2d", "conv"),
    "conv-bwd": ("conv2d_backward", "conv"),
    "pool-fwd": ("max_pool2d", "pool"),
    "pool-bwd": ("max_pool2d_backward", "pool"),
}
PEERS = ("numpy", "scipy", "torch", "torch-cuda")
SLOW_CALL = 2.0  # seconds: an estimating (second) call slower than this is the only sample
CONTENDERS = 1.5  # methods within this factor of a problem's fastest are re-timed together


# ---------------------------------------------------------------------------------------------
# one problem: an op on a shape in a dtype


class Problem:
    """Inputs, reference, work and the fastconv call of one (op, shape, dtype)."""

    def __init__(self, op, shape, dtype):
        self.op, self.shape, self.dtype = op, shape, np.dtype(dtype)
        self.fc_op = OPS[op][0]
        self._inputs = None

    def __repr__(self):
        return f"{self.op} {self.shape.name} {self.dtype}"

    @property
    def key(self):
        return (self.op, self.shape.name, str(self.dtype))

    def inputs(self):
        """The arguments of fastconv's function (arrays in ``dtype``), the same in every
        process: seeded by the problem's name."""
        if self._inputs is None:
            seed = sum(map(ord, f"{self.op}/{self.shape.name}"))
            rng = np.random.default_rng(seed)
            dt = self.dtype

            def rand(shape):
                return rng.standard_normal(shape).astype(dt)

            s = self.shape
            if self.op == "conv-fwd":
                self._inputs = (rand(s.x_shape), rand(s.w_shape), rand(s.k))
            elif self.op == "conv-bwd":
                x, w = rand(s.x_shape), rand(s.w_shape)
                o = (s.hw + 2 * s.pad - s.r) // s.stride + 1
                self._inputs = (rand((s.n, s.k, o, o)), x, w)
            elif self.op == "pool-fwd":
                self._inputs = (rand(s.x_shape),)
            else:
                x = rand(s.x_shape)
                _, idx = _peers.im2col_max_pool2d(x, **s.conf)
                self._inputs = (rand(idx.shape), np.ascontiguousarray(idx), s.x_shape)
        return self._inputs

    def spec(self, on_device=False):
        a, s = self.inputs(), self.shape
        if self.op == "conv-fwd":
            spec = _validate.conv2d(*a, s.stride, s.pad, 1, s.groups)[-1]
        elif self.op == "conv-bwd":
            spec = _validate.conv2d_backward(*a, s.stride, s.pad, 1, s.groups)[-1]
        elif self.op == "pool-fwd":
            spec = _validate.max_pool2d(a[0], s.kernel, s.stride, 0, 1, False)[-1]
        else:
            spec = _validate.max_pool2d_backward(*a, s.kernel, s.stride, 0, 1, False)[-1]
        return spec._replace(on_device=on_device)

    @property
    def flops(self):
        """Floating-point operations (convolutions only; the backward counts twice the
        forward), or None."""
        if self.shape.kind != "conv":
            return None
        f = self.spec().flops
        return 2 * f if self.op == "conv-bwd" else f

    @property
    def nbytes(self):
        """Bytes a max-pool must move at least (inputs read, outputs written), or None."""
        if self.shape.kind != "pool":
            return None
        spec = self.spec()
        n_out = int(np.prod(spec.out_shape))
        n_in = int(np.prod(spec.x_shape))
        it = self.dtype.itemsize
        return n_in * it + n_out * (it + 8)  # x and dx; out or grad, and int64 indices

    @property
    def reduction(self):
        """Longest sum behind one output value (scales the error tolerance)."""
        if self.shape.kind != "conv":
            return 16
        spec = self.spec()
        n, _, oh, ow = spec.out_shape
        _, cg, r, s = spec.w_shape
        return max(cg * r * s, n * oh * ow) if self.op == "conv-bwd" else cg * r * s

    def reference(self):
        """The NumPy im2col result in float64 (from the same inputs, upcast exactly)."""
        a = [np.asarray(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
             else v for v in self.inputs()]
        conf = self.shape.conf
        return tuple(np.asarray(r) for r in _numpy_peer(self.op, a, conf))

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
        conf = self.shape.conf
        if self.op == "conv-fwd":
            def call():
                return fc.conv2d(*a, **conf, method=method)
        elif self.op == "conv-bwd":
            def call():
                return tuple(fc.conv2d_backward(*a, **conf, method=method))
        elif self.op == "pool-fwd":
            def call():
                return fc.max_pool2d(*a, **conf, return_indices=True, method=method)
        else:
            def call():
                return fc.max_pool2d_backward(*a, **conf, method=method)

        if sync is not None:
            inner = call

            def call():
                r = inner()
                sync()
                return r

        def finish(r):
            r = r if isinstance(r, tuple) else (r,)
            return tuple(v.copy_to_host() if hasattr(v, "copy_to_host") else np.asarray(v)
                         for v in r)

        return call, finish


def _numpy_peer(op, a, conf):
    if op == "conv-fwd":
        return (_peers.im2col_conv2d(*a, **conf),)
    if op == "conv-bwd":
        return _peers.im2col_conv2d_backward(*a, **conf)
    if op == "pool-fwd":
        return _peers.im2col_max_pool2d(*a, **conf)
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
                                     else "cpu")
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


# ---------------------------------------------------------------------------------------------
# timing


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection pauses inside timed loops."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _repeats(budget, estimate, min_repeat, max_repeat):
    """Calls that fill ``budget`` seconds at ``estimate`` seconds each, within the bounds."""
    return int(min(max(math.ceil(budget / max(estimate, 1e-9)), min_repeat), max_repeat))


def measure(call, *, repeat=None, budget=1.0, min_repeat=3, max_repeat=100, slow=SLOW_CALL):
    """Time ``call()``: (median seconds, all samples, the first call's result).

    The first call compiles and warms up and is never counted. Unless ``repeat`` is given, a
    second call estimates the duration: over ``slow`` seconds it is the only sample,
    otherwise ``ceil(budget / estimate)`` calls (within [min_repeat, max_repeat]) follow."""
    with _gc_paused():
        result = call()
        samples = []
        if repeat is None:
            t0 = time.perf_counter()
            call()
            est = time.perf_counter() - t0
            if est > slow:
                samples, repeat = [est], 0
            else:
                repeat = _repeats(budget, est, min_repeat, max_repeat)
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
    return float(np.median(samples)), samples, result


# ---------------------------------------------------------------------------------------------
# the PyTorch worker process


class TorchWorker:
    """PyTorch in its own process, so that its OpenMP threads cannot slow fastconv down (nor
    the reverse). Started on first use; it rebuilds each problem's inputs from the seeds."""

    def __init__(self, threads=None):
        self.threads = threads
        self.proc = None
        self.broken = None

    def _start(self):
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastconv.bench", "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def run(self, problem, device, timing):
        """(status, median, samples, outputs): status is "ok", "skip" or "error"."""
        if self.broken:
            return "error", None, [], self.broken
        if self.proc is None:
            self._start()
        job = dict(op=problem.op, shape=problem.shape.name, dtype=str(problem.dtype),
                   device=device, timing=timing, threads=self.threads)
        try:
            pickle.dump(job, self.proc.stdin)
            self.proc.stdin.flush()
            return pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            self.broken = f"the PyTorch worker died ({type(e).__name__})"
            return "error", None, [], self.broken

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
            self.proc = None


def _worker_main():
    """The loop of the PyTorch worker: read jobs from stdin, answer on stdout (pickle)."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    inp = sys.stdin.buffer
    import torch

    threads_set = False
    while True:
        try:
            job = pickle.load(inp)
        except EOFError:
            return 0
        try:
            if job["threads"] and not threads_set:
                torch.set_num_threads(job["threads"])
                threads_set = True
            problem = Problem(job["op"], SHAPES[job["shape"]], job["dtype"])
            if job["device"] == "cuda" and not torch.cuda.is_available():
                answer = ("skip", None, [], "this PyTorch has no CUDA")
            else:
                peer = "torch-cuda" if job["device"] == "cuda" else "torch"
                call, finish = peer_call(problem, peer)
                med, samples, res = measure(call, **job["timing"])
                answer = ("ok", med, samples, finish(res))
        except Exception as e:  # report, keep serving
            answer = ("error", None, [], f"{type(e).__name__}: {e}")
        pickle.dump(answer, out)
        out.flush()


# ---------------------------------------------------------------------------------------------
# what to time


@dataclass
class Entry:
    method: str  # a fastconv method, "auto", or a peer
    kind: str  # "fastconv", "auto" or "peer"
    device: str  # "cpu", "gpu" (device arrays) or "gpu+copy" (host arrays)


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    method: str
    kind: str
    device: str
    label: str
    time: float | None = None
    samples: list = field(default_factory=list)
    gflops: float | None = None
    gbps: float | None = None
    speedup_numpy: float | None = None
    speedup_torch: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    chose: str | None = None
    together: bool = False  # re-timed round-robin with the other contenders (see run)
    note: str = ""

    def as_dict(self):
        return dict(self.__dict__)


def _real_gpu():
    return _registry.cuda_missing() is None and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"


def _has_torch():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def entries_for(problem, *, peers=True):
    """What can be timed for a problem here, in table order."""
    out, skipped = [], []
    host_spec = problem.spec()
    dev_spec = host_spec._replace(on_device=True)
    gpu = False
    for m in _registry.known(problem.fc_op):
        impl = _registry._REGISTRY[problem.fc_op, m]
        reason = impl.unavailable()
        if reason is not None:
            skipped.append((m, reason))
            continue
        if impl.device == "cuda":
            if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
                skipped.append((m, "CUDA simulator: not timed"))
                continue
            gpu = True
            if impl.supports(dev_spec):
                out.append(Entry(m, "fastconv", "gpu"))
            if impl.supports(host_spec):
                out.append(Entry(m, "fastconv", "gpu+copy"))
        elif impl.supports(host_spec):
            out.append(Entry(m, "fastconv", "cpu"))
        else:
            skipped.append((m, "does not support this problem"))
    out.append(Entry("auto", "auto", "cpu"))
    if gpu and _registry.candidates(problem.fc_op, dev_spec):
        out.append(Entry("auto", "auto", "gpu"))
    if peers:
        out.append(Entry("numpy", "peer", "cpu"))
        s = problem.shape
        if problem.op == "conv-fwd" and _peers.scipy_is_small(s.x_shape, s.w_shape, s.groups):
            out.append(Entry("scipy", "peer", "cpu"))
        if _has_torch():
            out.append(Entry("torch", "peer", "cpu"))
            if gpu or _real_gpu():
                out.append(Entry("torch-cuda", "peer", "gpu"))
    return out, skipped


def select_shapes(spec, quick=False):
    """Shapes named by a comma list of names or beginnings of names ("vgg", "pool2")."""
    if not spec:
        names = QUICK_SHAPES if quick else [s.name for s in SHAPES.values() if not s.hidden]
        return [SHAPES[n] for n in names]
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [s for s in SHAPES.values() if s.name == part] or [
            s for s in SHAPES.values() if s.name.startswith(part) and not s.hidden]
        if not hits:
            raise SystemExit(
                f"--shapes: {part!r} matches none of {', '.join(SHAPES)}")
        chosen += [s for s in hits if s not in chosen]
    return chosen


def _split(v):
    return [p.strip() for p in v.split(",") if p.strip()] if v else []


# ---------------------------------------------------------------------------------------------
# the run


class _Progress:
    def __init__(self, total, enabled):
        self.bar, self.n, self.total, self.enabled = None, 0, total, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True,
                                desc="fastconv bench")
            except ImportError:
                pass

    def step(self, what):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update()
        elif self.enabled:
            print(f"[{self.n:>{len(str(self.total))}}/{self.total}] {what}", file=sys.stderr,
                  flush=True)

    def say(self, what):
        """Show what runs now without counting a step."""
        if self.bar is not None:
            self.bar.set_postfix_str(what)
        elif self.enabled:
            print(f"{' ' * (2 * len(str(self.total)) + 3)} {what}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(problems, *, methods=None, exclude=(), repeat=None, budget=1.0, pause=0.3,
        threads=None, progress=True, peers=True, slow=SLOW_CALL, side="all"):
    """Time every entry on every problem; a list of `Result`. ``side``: "all", or only the
    "cpu" or "gpu" entries."""
    plan = []
    for p in problems:
        entries, skipped = entries_for(p, peers=peers)
        entries = [e for e in entries if (not methods or e.method in methods)
                   and e.method not in exclude
                   and side in ("all", "gpu" if e.device.startswith("gpu") else "cpu")]
        plan.append((p, entries, skipped))
    if not any(e for _, e, _ in plan):
        return []
    timing = dict(repeat=repeat, budget=budget, slow=slow)
    bar = _Progress(sum(len(e) for _, e, _ in plan), progress)
    worker = TorchWorker(threads)
    results = []
    try:
        for p, entries, _ in plan:
            ref = p.reference()
            rows = []
            for e in entries:
                bar.step(f"{p.op} {p.shape.name} {p.dtype} {e.method} ({e.device})")
                rows.append(_time_entry(p, e, ref, timing, worker))
                time.sleep(pause)
            if entries:
                bar.say(f"{p.op} {p.shape.name} {p.dtype}: contenders together")
            try:
                _retime_contenders(p, entries, rows, timing)
            except Exception as exc:  # keep the first timings; say why they stand
                for r in rows:
                    if r.kind in ("fastconv", "auto") and r.time:
                        r.note = f"not re-timed: {type(exc).__name__}: {exc}"[:200]
            _compare(p, rows)
            results += rows
            p._inputs = None  # free the arrays
    finally:
        bar.close()
        worker.close()
    return results


def _fastconv_or_peer_call(p, e):
    """(call, finish, chose) for an entry timed in this process."""
    if e.kind == "peer":
        call, finish = peer_call(p, e.method)
        return call, finish, None
    call, finish = p.fastconv_call(e.method, e.device)
    chose = None
    if e.kind == "auto":
        chose = _registry.resolve(p.fc_op, "auto", p.spec(on_device=e.device == "gpu")).method
    return call, finish, chose


def _time_entry(p, e, ref, timing, worker):
    label = e.method if e.device != "gpu+copy" else f"{e.method} (host)"
    r = Result(p.op, p.shape.name, str(p.dtype), e.method, e.kind, e.device, label)
    try:
        if e.method in ("torch", "torch-cuda"):
            status, med, samples, payload = worker.run(
                p, "cuda" if e.method == "torch-cuda" else "cpu", timing)
            if status != "ok":
                r.note = payload
                r.ok = None if status == "skip" else False
                return r
            outputs = payload
        else:
            call, finish, r.chose = _fastconv_or_peer_call(p, e)
            if r.chose:
                r.label = f"auto→{r.chose}"
            med, samples, res = measure(call, **timing)
            outputs = finish(res)
    except Exception as exc:  # a failing method is a row, not the end of the run
        r.note = f"{type(exc).__name__}: {exc}"[:200]
        r.ok = False
        return r
    r.max_err, r.ok = max_error(p, outputs, ref)
    _set_time(p, r, med, samples)
    return r


def _set_time(p, r, med, samples):
    r.time, r.samples = med, [float(s) for s in samples]
    r.gflops = p.flops / med / 1e9 if p.flops else None
    r.gbps = p.nbytes / med / 1e9 if p.nbytes else None


def measure_together(calls, *, rounds=None, budget=1.0, estimates=None, min_repeat=3,
                     max_repeat=100, slow=SLOW_CALL):
    """Time warm ``calls`` round-robin: each round calls every one once, starting one place
    further along each time, so that drifting load on a shared machine (and whatever one call
    leaves behind for the next) falls on all of them alike. The median of each call's samples.

    ``rounds`` defaults to what ``budget`` seconds per call buys at the ``estimates``."""
    n = len(calls)
    if rounds is None:
        per_round = sum(estimates) if estimates else 0.0
        # a round per call's worth of budget: budget*n seconds at per_round seconds a round
        rounds = 1 if per_round > slow * n else _repeats(budget * n, per_round, min_repeat,
                                                           max_repeat)
    samples = [[] for _ in calls]
    with _gc_paused():
        for k in range(rounds):
            for j in range(n):
                i = (j + k) % n
                t0 = time.perf_counter()
                calls[i]()
                samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples], samples


def _retime_contenders(p, entries, rows, timing):
    """Time auto and the methods that could be fastest again, together (`measure_together`),
    so that "auto within 10% of the fastest" compares calls made under the same conditions.
    Contenders: per side, every fastconv method within CONTENDERS times the fastest, and the
    method auto chose."""
    for side in ("cpu", "gpu"):
        mine = [(e, r) for e, r in zip(entries, rows) if e.device == side
                and e.kind in ("fastconv", "auto") and r.time and r.ok is not False]
        methods = [r for _, r in mine if r.kind == "fastconv"]
        if not methods:
            continue
        best = min(r.time for r in methods)
        chose = {r.chose for _, r in mine if r.kind == "auto"}
        keep = [(e, r) for e, r in mine if r.kind == "auto" or r.method in chose
                or r.time <= CONTENDERS * best]
        if len(keep) < 2:
            continue
        calls = [_fastconv_or_peer_call(p, e)[0] for e, _ in keep]
        for c in calls:  # fresh inputs on the device; first calls are never counted
            c()
        rounds = timing.get("repeat")
        meds, samples = measure_together(
            calls, rounds=rounds, budget=timing.get("budget", 1.0), slow=timing.get(
                "slow", SLOW_CALL), estimates=[r.time for _, r in keep])
        for (_, r), med, s in zip(keep, meds, samples):
            _set_time(p, r, med, s)
            r.together = True


def _compare(p, rows):
    """Speed-ups over the NumPy reference and over PyTorch on the same side (CPU or GPU)."""
    t = {(r.method, r.device): r.time for r in rows if r.time}
    numpy_t, torch_cpu, torch_gpu = t.get(("numpy", "cpu")), t.get(("torch", "cpu")), t.get(
        ("torch-cuda", "gpu"))
    for r in rows:
        if not r.time:
            continue
        if numpy_t:
            r.speedup_numpy = numpy_t / r.time
        tt = torch_gpu if r.device.startswith("gpu") else torch_cpu
        if tt:
            r.speedup_torch = tt / r.time


def auto_report(results, tolerance=0.10):
    """How "auto" compares with the fastest fastconv method on the same side, per problem."""
    by = {}
    for r in results:
        if r.time and r.kind in ("fastconv", "auto") and r.device in ("cpu", "gpu"):
            by.setdefault((r.op, r.shape, r.dtype, r.device), []).append(r)
    report = []
    for (op, shape, dtype, device), rows in by.items():
        auto = [r for r in rows if r.kind == "auto"]
        methods = [r for r in rows if r.kind == "fastconv"]
        if not auto or not methods:
            continue
        best = min(methods, key=lambda r: r.time)
        chosen = next((r for r in methods if r.method == auto[0].chose), None)
        report.append(dict(
            op=op, shape=shape, dtype=dtype, device=device, chose=auto[0].chose,
            fastest=best.method, ratio=auto[0].time / best.time,
            choice_ratio=(chosen.time / best.time) if chosen else None,
            within=auto[0].time <= (1 + tolerance) * best.time))
    return report


# ---------------------------------------------------------------------------------------------
# output


def _fmt_time(s):
    if s is None:
        return ""
    for unit, f in (("s", 1), ("ms", 1e3), ("µs", 1e6)):
        if s * f >= 1 or unit == "µs":
            v = s * f
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return ""  # pragma: no cover


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


COLUMNS = ("op", "shape", "dtype", "method", "device", "time", "GFLOP/s", "GB/s", "vs numpy",
           "vs torch", "max err")


def table_rows(results):
    """The table as lists of strings, best time of each problem and side marked with *."""
    best = {}
    for r in results:
        if r.time and r.kind != "auto":
            k = (r.op, r.shape, r.dtype, r.device.startswith("gpu"))
            best[k] = min(best.get(k, math.inf), r.time)
    rows = []
    for r in results:
        star = " *" if r.time and r.kind != "auto" and r.time == best.get(
            (r.op, r.shape, r.dtype, r.device.startswith("gpu"))) else ""
        err = _fmt(r.max_err, ".1e")
        if r.ok is False:
            err = (err + " FAIL").strip() if r.time else ("error: " + r.note)
        elif r.ok is None and r.note:
            err = "skipped: " + r.note
        rows.append([r.op, r.shape, r.dtype, r.label + star, r.device, _fmt_time(r.time),
                     _fmt(r.gflops, ".3g"), _fmt(r.gbps, ".3g"),
                     _fmt(r.speedup_numpy, ".2f") + ("x" if r.speedup_numpy else ""),
                     _fmt(r.speedup_torch, ".2f") + ("x" if r.speedup_torch else ""), err])
    return rows


def format_text(results):
    rows = table_rows(results)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    right = {5, 6, 7, 8, 9}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(results, rows):
        k = (r.op, r.shape, r.dtype)
        if prev is not None and k != prev:
            out.append("")
        prev = k
        out.append(line(cells))
    return "\n".join(out)


def format_auto(report, tolerance=0.10):
    if not report:
        return "auto: nothing to compare (no fastconv method timed)."
    bad = [a for a in report if not a["within"]]
    right = [a for a in report if a["choice_ratio"] is not None
             and a["choice_ratio"] <= 1 + tolerance]
    lines = [f"auto vs the fastest fastconv method on the same side: within "
             f"{tolerance:.0%} on {len(report) - len(bad)}/{len(report)} problems (auto's own "
             f"time); its choice's time within {tolerance:.0%} on {len(right)}/{len(report)}"]

    def describe(a):
        choice = ("" if a["choice_ratio"] is None
                  else f", the choice's own row {a['choice_ratio']:.2f}x")
        return (f"{a['op']} {a['shape']} {a['dtype']} ({a['device']}) {a['ratio']:.2f}x "
                f"(auto→{a['chose']}, fastest {a['fastest']}{choice})")

    worst = max(report, key=lambda a: a["ratio"])
    lines.append(f"  worst: {describe(worst)}")
    lines += [f"  over: {describe(a)}" for a in bad]
    return "\n".join(lines)


def machine_summary(threads):
    """A few lines saying where and how the run was made."""
    from . import _cli

    info = _cli.collect_info()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": info["machine"],
        "threads": threads,
        "blas": info["blas"],
        "versions": info["versions"],
        "gpu": info["cuda"].get("gpu", "none"),
        "command": ("python -m fastconv " + shlex.join(sys.argv[1:])
                    if sys.argv[0].endswith(("__main__.py", "fastconv")) else shlex.join(sys.argv)),
    }


def format_markdown(results, report, meta):
    """The tables in Markdown; ``meta`` is one run's `machine_summary` or a list of them."""
    out = []
    for m in (meta if isinstance(meta, list) else [meta]):
        out += [f"Measured {m['date']} on {m['machine']}, {m['threads']} threads; "
                f"BLAS: {m['blas']}; GPU: {m['gpu']}.",
                "", f"Command: `{m['command']}`", "",
                "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    rows = table_rows(results)
    for op in OPS:
        sel = [c for r, c in zip(results, rows) if r.op == op]
        if not sel:
            continue
        out += [f"### {op}", "", "| " + " | ".join(COLUMNS[1:]) + " |",
                "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS) - 1))
                + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells[1:]) + " |"
                for cells in sel]
        out.append("")
    out += ["```", format_auto(report), "```", ""]
    return "\n".join(out)


def plot(results, path, threads=None):
    """Bar charts of GFLOP/s (convolutions) or GB/s (max-pool) per shape and method; CPU and
    GPU side by side, one row per (op, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.time and r.kind != "auto" and r.device != "gpu+copy"]
    if not timed:
        raise SystemExit("--plot: nothing was timed")
    panels = list(dict.fromkeys((r.op, r.dtype) for r in timed))
    sides = [side for side, dev in (("CPU", "cpu"), ("GPU", "gpu"))
             if any(r.device == dev for r in timed)]
    labels = list(dict.fromkeys(r.method for r in timed))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(labels)}
    fig, axes = plt.subplots(len(panels), len(sides), squeeze=False,
                             figsize=(7.5 * len(sides), 3.4 * len(panels)))
    for row, (op, dtype) in enumerate(panels):
        for col, side in enumerate(sides):
            ax = axes[row][col]
            rs = [r for r in timed if (r.op, r.dtype) == (op, dtype)
                  and (r.device == "gpu") == (side == "GPU")]
            shapes = list(dict.fromkeys(r.shape for r in rs))
            meths = list(dict.fromkeys(r.method for r in rs))
            conv = op.startswith("conv")
            title = f"{op} {dtype}, {side}" + (f" ({threads} threads)" if side == "CPU"
                                               and threads else "")
            ax.set_title(title, fontsize=10)
            if not rs:
                ax.text(0.5, 0.5, "nothing timed", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            width = 0.8 / len(meths)
            for j, m in enumerate(meths):
                xs, ys = [], []
                for i, s in enumerate(shapes):
                    r = next((r for r in rs if r.shape == s and r.method == m), None)
                    if r is not None:
                        xs.append(i - 0.4 + width * (j + 0.5))
                        ys.append(r.gflops if conv else r.gbps)
                ax.bar(xs, ys, width, label=m, color=colors[m])
            ax.set_yscale("log")
            ax.set_ylabel("GFLOP/s" if conv else "GB/s")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=25, ha="right", fontsize=8)
            ax.grid(axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in labels]
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 9), fontsize=8,
               bbox_to_anchor=(0.5, 1.0), frameon=False,
               title="fastconv bench: higher is better", title_fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.8 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_entries(results, threads):
    """The measured table behind method="auto" (see fastconv._autotune) from a run."""
    from . import _autotune

    rows = {}
    for r in results:
        if r.kind == "fastconv" and r.time and r.ok and r.device in ("cpu", "gpu"):
            rows.setdefault((r.op, r.shape, r.dtype, r.device), {})[r.method] = r.time
    entries = []
    for (op, shape, dtype, device), times in rows.items():
        spec = Problem(op, SHAPES[shape], dtype).spec(on_device=device == "gpu")
        entries.append(_autotune.entry_from_spec(OPS[op][0], spec, times, threads=threads,
                                                 name=shape))
    return entries


def _policy_key(e):
    return (e["op"], e.get("shape"), e["dtype"], e["device"], e["threads"])


def load_policy_file(path):
    """(entries, source) from a table written by `save_policy` (.py or .json), or ([], {})."""
    path = str(path)
    if not os.path.isfile(path):
        return [], {}
    if path.endswith(".py"):
        ns = {}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)
        return list(ns.get("ENTRIES", [])), ns.get("SOURCE", {})
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return data, {}
    return list(data.get("entries", [])), data.get("source", {})


def save_policy(entries, path, meta, merge=True):
    """Write the policy table; with ``merge``, entries already in the file for other (op,
    shape, dtype, device, threads) stay, so CPU and GPU runs on two machines add up."""
    from . import _autotune

    path = str(path)
    sources = [meta]
    if merge:
        old, old_meta = load_policy_file(path)
        new_keys = {_policy_key(e) for e in entries}
        kept = [e for e in old if _policy_key(e) not in new_keys]
        entries = kept + list(entries)
        if kept and old_meta:
            sources = (old_meta if isinstance(old_meta, list) else [old_meta]) + sources
    entries = sorted(entries, key=lambda e: (e["device"], e["op"], e.get("shape") or "",
                                             e["dtype"], e["threads"]))
    source = sources if len(sources) > 1 else sources[0]
    if path.endswith(".py"):
        import pprint

        text = (
            '"""Measured times behind the default ``method="auto"`` policy (see '
            "fastconv._autotune).\n\nGenerated by ``python -m fastconv bench --save-policy "
            'fastconv/_autotable.py``; do not edit by hand.\n"""\n\n'
            f"SOURCE = {pprint.pformat(source, width=99, sort_dicts=False)}\n\n"
            f"ENTRIES = {pprint.pformat(entries, width=99, sort_dicts=False)}\n")
        with open(path, "w") as f:
            f.write(text)
    else:
        _autotune._write_json_atomic(_autotune.Path(path), {"source": source,
                                                            "entries": entries})


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true",
                   help=f"a few shapes ({', '.join(QUICK_SHAPES)}) and short timing: under a "
                        "minute")
    p.add_argument("--shapes", metavar="NAMES",
                   help="comma list of shape names or their beginnings, e.g. 'lenet-c1,vgg,pool2'"
                        " (default: the whole suite; see --list)")
    p.add_argument("--ops", metavar="OPS", default=",".join(OPS),
                   help=f"comma list of {', '.join(OPS)} (default: all)")
    p.add_argument("--methods", metavar="NAMES",
                   help="comma list of methods and peers to time (default: all usable; peers "
                        f"are {', '.join(PEERS)}; 'auto' is fastconv's choice)")
    p.add_argument("--exclude", metavar="NAMES", default="",
                   help="comma list of methods and peers not to time")
    p.add_argument("--dtype", default="float32",
                   help="float32, float64, or a comma list of both (default: float32)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for every CPU kernel and for PyTorch (default: all)")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="timed calls per method (default: enough for --budget, at least 3)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timing budget per method and problem (default 1, --quick 0.25)")
    p.add_argument("--pause", type=float, metavar="SECONDS",
                   help="pause between two methods so thread pools go idle (default 0.3, "
                        "--quick 0.1)")
    p.add_argument("--device", choices=("all", "cpu", "gpu"), default="all",
                   help="time only what runs on the CPU, or only what runs on the GPU "
                        "(default: all)")
    p.add_argument("--no-peers", action="store_true",
                   help="time only fastconv (no NumPy, SciPy or PyTorch)")
    p.add_argument("--json", metavar="FILE", help="write every result to a JSON file")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart of the rates (matplotlib)")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the tables as Markdown ('-': print them instead of the text "
                        "table)")
    p.add_argument("--save-policy", metavar="FILE", nargs="?", const="",
                   help="write the measured times as the table behind method='auto' (default: "
                        "auto_table.json in the user's cache dir, which auto then uses; a .py "
                        "path writes a module like fastconv/_autotable.py). Entries of the file "
                        "for problems not measured in this run are kept")
    p.add_argument("--from", dest="from_files", metavar="FILES",
                   help="comma list of JSON files written by --json: print, plot and write "
                        "their results together instead of timing (e.g. a CPU run and a GPU "
                        "run side by side)")
    p.add_argument("--nets", metavar="NAMES", nargs="?", const="all",
                   help="time whole training steps of small nets instead of single calls: "
                        "fastconv's layers against the same net on NumPy im2col layers, "
                        "Cython im2col + np.dot (CS231n) and PyTorch; optionally a comma list "
                        "of " + ", ".join(_nets_names()))
    p.add_argument("--net-steps", type=int, default=20, metavar="N",
                   help="timed consecutive steps per net and implementation (default 20)")
    p.add_argument("--no-nets", action="store_true",
                   help="skip the short whole-net summary after the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list shapes and methods, then exit")


def _nets_names():
    from . import _nets

    return list(_nets.NETS)


def _run_nets(args):
    from . import _nets

    names = list(_nets.NETS) if args.nets == "all" else _split(args.nets)
    unknown = set(names) - set(_nets.NETS)
    if unknown:
        raise SystemExit(f"--nets: {', '.join(sorted(unknown))} not among "
                         f"{', '.join(_nets.NETS)}")
    if args.threads:
        raise SystemExit("--nets compares the default thread count with one thread; "
                         "--threads does not apply")
    say = None if args.no_progress else (lambda what: print(f"  timing {what} ...",
                                                            file=sys.stderr))
    results = _nets.measure(names, steps=args.net_steps, progress=say)
    print(_nets.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": machine_summary(None), "nets": [r.as_dict() for r in results]},
                      f, indent=1)
    return 0


def _nets_summary(steps):
    """The book's SimpleConvNet, fastconv against its NumPy twin: the default run's last
    lines."""
    from . import _nets

    results = _nets.measure(["simpleconvnet"], impls=("fastconv", "numpy"), steps=steps,
                            warmup=2, one_thread=False)
    print()
    print(_nets.format_table(results))
    print("(more nets, one thread against all, and PyTorch: python -m fastconv bench --nets)")


def load_results(paths):
    """(results, metas, CPU threads) from JSON files written by ``--json``, in the order
    given; the thread count is that of the runs with CPU rows (None if unknown or mixed).
    The runs must not overlap: each (op, shape, dtype, method, device) comes from one run, so
    that "fastest" and "auto" are compared within one run."""
    results, metas, threads = [], [], None
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            rows, meta = [Result(**r) for r in data["results"]], data["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--from: {path} is not a results file written by --json ({e})")
        meta = meta if isinstance(meta, list) else [meta]
        if any(r.device == "cpu" for r in rows):
            # a merged file does not say which of its runs made the CPU rows
            t = meta[0].get("threads") if len(meta) == 1 else None
            threads = t if threads is None else (threads if t == threads else None)
        results += rows
        metas += meta
    seen = {}
    for r in results:
        key = (r.op, r.shape, r.dtype, r.method, r.device)
        if key in seen:
            raise SystemExit(f"--from: {r.op} {r.shape} {r.dtype} {r.method} ({r.device}) is in "
                             "more than one of the runs; give runs that do not overlap")
        seen[key] = r
    order = {name: i for i, name in enumerate(SHAPES)}
    ops = list(OPS)
    results.sort(key=lambda r: (ops.index(r.op) if r.op in ops else len(ops),
                                order.get(r.shape, len(order)), r.dtype))  # stable: files' order
    return results, metas, threads


def _list():
    print("shapes (DESIGN.md section 4):")
    for s in SHAPES.values():
        print(f"  {s.name:<13} {'conv' if s.kind == 'conv' else 'pool'}  {s.describe()}"
              + ("   (hidden, for tests)" if s.hidden else ""))
    print("ops: " + ", ".join(OPS))
    for op, (fc_op, _) in OPS.items():
        usable = [m for m in _registry.known(fc_op) if m in _registry.methods(fc_op)]
        print(f"methods for {op}: {', '.join(usable + ['auto'])}")
    print("peers: numpy, scipy (conv-fwd, small shapes), torch, torch-cuda (PyTorch "
          f"{'installed' if _has_torch() else 'not installed'})")


def main(args) -> int:
    """Run the benchmark for parsed ``args`` (see `add_arguments`); the exit status."""
    if args.list:
        _list()
        return 0
    if args.nets:
        return _run_nets(args)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                             "(or pip install 'fastconv[bench]')")
    if args.from_files:
        if args.save_policy is not None:
            raise SystemExit("--save-policy needs a run; it cannot be used with --from")
        results, metas, threads = load_results(_split(args.from_files))
        return _output(args, results, metas if len(metas) > 1 else metas[0], threads)
    import warnings

    import fastconv as fc

    try:  # small grids on a big GPU: true, and not what a benchmark reader needs to see
        from numba.core.errors import NumbaPerformanceWarning

        warnings.simplefilter("ignore", NumbaPerformanceWarning)
    except ImportError:  # pragma: no cover
        pass
    if args.threads:
        fc.set_num_threads(args.threads)
    threads = fc.get_num_threads()
    dtypes = _split(args.dtype)
    for d in dtypes:
        if d not in ("float32", "float64"):
            raise SystemExit(f"--dtype: {d!r} is not float32 or float64")
    ops = _split(args.ops)
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"--ops: {o!r} is not one of {', '.join(OPS)}")
    shapes = select_shapes(args.shapes, args.quick)
    problems = [Problem(op, s, d) for op in ops for s in shapes if s.kind == OPS[op][1]
                for d in dtypes]
    if not problems:
        raise SystemExit("nothing to run: no shape fits the chosen ops")
    quick = args.quick
    budget = args.budget if args.budget is not None else (0.25 if quick else 1.0)
    pause = args.pause if args.pause is not None else (0.1 if quick else 0.3)
    methods = set(_split(args.methods)) or None
    if methods:
        known = {m for op in OPS.values() for m in _registry.known(op[0])} | {"auto", *PEERS}
        unknown = methods - known
        if unknown:
            raise SystemExit(f"--methods: {', '.join(sorted(unknown))} not among "
                             f"{', '.join(sorted(known))}")
    for m, why in _registry.missing():
        if methods is None or m in methods:
            print(f"WARNING: method {m!r} cannot run here, so it has no rows: {why}",
                  file=sys.stderr)
    t0 = time.perf_counter()
    results = run(problems, methods=methods, exclude=set(_split(args.exclude)),
                  repeat=args.repeat, budget=budget, pause=pause,
                  threads=args.threads, progress=not args.no_progress,
                  peers=not args.no_peers, slow=0.5 if quick else SLOW_CALL,
                  side=args.device)
    elapsed = time.perf_counter() - t0
    if not results:
        why = f" ({_registry.cuda_missing()})" if args.device == "gpu" and not _real_gpu() else ""
        raise SystemExit(f"nothing to time: no method or peer fits the options{why}")
    meta = machine_summary(threads)
    meta["seconds"] = round(elapsed, 1)
    status = _output(args, results, meta, threads)
    if not args.no_nets and args.markdown != "-" and args.device != "gpu":
        _nets_summary(5 if quick else 10)
    if args.save_policy is not None:
        from . import _autotune

        path = args.save_policy or str(_autotune.default_table_path())
        save_policy(policy_entries(results, threads), path, meta)
        print(f"auto policy table written to {path}", file=sys.stderr)
    return status


def _output(args, results, meta, threads):
    """Print and write what the options ask for; the exit status (1 if a result failed).
    ``meta``: this run's `machine_summary`, or a list of them (``--from``)."""
    report = auto_report(results)
    metas = meta if isinstance(meta, list) else [meta]
    if args.markdown == "-":
        print(format_markdown(results, report, meta))
    else:
        for m in metas:
            print(f"fastconv bench: {m['machine']}; {m['threads']} threads; BLAS {m['blas']}; "
                  f"GPU {m['gpu']}")
        print(format_text(results))
        print()
        print(format_auto(report))
        took = "".join(f" in {m['seconds']:.0f} s" for m in metas[:1] if m.get("seconds"))
        print(f"({len(results)} runs{took if len(metas) == 1 else ''}; * fastest on its side; "
              "max err = max |y - ref| / max(1, max |ref|) against NumPy im2col in float64)")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(format_markdown(results, report, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [r.as_dict() for r in results],
                       "auto": report}, f, indent=1)
    if args.plot:
        plot(results, args.plot, threads)
    failed = [r for r in results if r.ok is False]
    for r in failed:
        print(f"FAILED: {r.op} {r.shape} {r.dtype} {r.label} ({r.device}): "
              f"{r.note or f'max err {r.max_err:.2e}'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit("use `python -m fastconv bench` (this module's own entry is the PyTorch worker)")
