"""What the pytest-benchmark suites time and how: parameters and the timed run.

The shapes, inputs, references and peers are those of ``python -m fastconv bench``
(`fastconv.bench`, `fastconv._peers`), so the two agree. Each benchmark:

1. builds its inputs once (seeded; outside the timing) and computes the float64 NumPy
   reference once per (op, shape, dtype);
2. pauses ``FASTCONV_BENCH_PAUSE`` seconds (0.3) when the library changes from the previous
   benchmark, because thread pools (PyTorch's OpenMP, OpenBLAS, Numba's) keep spinning after a
   call and slow the next library down many times over;
3. calls the method once to compile (Numba, CUDA) and touch its buffers, checks that result
   against the reference, calls it again to estimate its duration;
4. hands it to ``benchmark.pedantic`` for ``ceil(FASTCONV_BENCH_BUDGET / estimate)`` rounds
   (at least 3, at most 100; a single round when one call takes over 2 s).

GPU methods are timed on device arrays (``-device``) and on host arrays with the transfers
(``-host``), with ``cuda.synchronize()`` inside the timed function; both skip without a real
GPU (and in the CUDA simulator). ``FASTCONV_BENCH_THREADS`` pins the CPU threads (Numba, OpenMP,
BLAS and PyTorch); by default all cores are used.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
import warnings

import pytest

import fastconv as fc
from fastconv import _registry, bench
from fastconv.bench import peers as _peers
from fastconv.bench import Entry, Problem

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
PAUSE = float(os.environ.get("FASTCONV_BENCH_PAUSE", "0.3"))
BUDGET = float(os.environ.get("FASTCONV_BENCH_BUDGET", "1.0"))
DTYPES = ("float32", "float64")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _gpu_reason():
    """None where GPU benchmarks can run, else why not."""
    if SIM:
        return "the CUDA simulator is not benchmarked"
    return _registry.cuda_missing()


def entries(fc_op, op):
    """pytest params (Entry) for every registered method of ``fc_op``, auto and the peers.

    Methods that cannot run here stay in the list and skip when run (saying why), so that
    plain ``pytest`` reports only "--benchmark-skip active" for them."""
    params = []
    gpu_known = False
    for impl in _registry.implementations(fc_op):
        m = impl.method
        if impl.device == "cuda":
            gpu_known = True
            params.append(pytest.param(Entry(m, "fastconv", "gpu"), id=f"{m}-device"))
            params.append(pytest.param(Entry(m, "fastconv", "gpu+copy"), id=f"{m}-host"))
        else:
            params.append(pytest.param(Entry(m, "fastconv", "cpu"), id=m))
    params.append(pytest.param(Entry("auto", "auto", "cpu"), id="auto"))
    if gpu_known:
        params.append(pytest.param(Entry("auto", "auto", "gpu"), id="auto-device"))
    params.append(pytest.param(Entry("numpy", "peer", "cpu"), id="numpy"))
    if op == "conv-fwd":
        params.append(pytest.param(Entry("scipy", "peer", "cpu"), id="scipy"))
    if HAS_TORCH:
        params.append(pytest.param(Entry("torch", "peer", "cpu"), id="torch"))
        if gpu_known or _gpu_reason() is None:
            params.append(pytest.param(Entry("torch-cuda", "peer", "gpu"), id="torch-cuda"))
    return params


def _skip_reason(fc_op, entry):
    reason = None
    if entry.kind == "fastconv":
        reason = _registry.implementation(fc_op, entry.method).unavailable()
    if reason is None and entry.device.startswith("gpu"):
        reason = _gpu_reason()
    return reason.split(" (set NUMBA_ENABLE_CUDASIM")[0] if reason else None


def shape_id(shape):
    """The shape's name in test ids, spelled so that ``-k lenet`` does not also select
    mobilenet-dw (pytest's -k matches substrings)."""
    return shape.name.replace("mobilenet", "mobile-net")


def cases(op):
    """(shape, dtype, entry) params, grouped so that one problem's methods run back to back.

    The values are plain strings (the shape's name, the dtype, the entry's id such as "im2col",
    "auto", "numpy" or "cuda-direct-device"), so that pytest-benchmark's JSON stores them as
    they are and ``--benchmark-group-by=param:shape`` reads well."""
    kind = bench.OPS[op][1]
    shapes = [s for s in bench.SHAPES.values()
              if s.kind == kind and not s.hidden and not s.held_out]
    out = []
    for s in shapes:
        for dt in DTYPES:
            for p in entries(bench.OPS[op][0], op):
                (entry,) = p.values
                if entry.method == "scipy" and not _peers.scipy_is_small(
                        s.x_shape, s.w_shape, s.groups):
                    continue
                if entry.kind == "fastconv" and not _registry.implementation(
                        bench.OPS[op][0], entry.method).supports(Problem(op, s, dt).spec()):
                    continue  # winograd: 3x3 stride-1 convolutions only
                _ENTRIES[p.id] = entry
                out.append(pytest.param(s.name, dt, p.id, marks=p.marks,
                                        id=f"{shape_id(s)}-{dt}-{p.id}"))
    return out


_ENTRIES: dict = {}  # entry id -> Entry, filled by `cases`


# ---------------------------------------------------------------------------------------------
# the timed run

_state = {"library": None, "problem": None, "reference": None, "threads": None}


def threads():
    """Pin the CPU threads once (FASTCONV_BENCH_THREADS), then report the count."""
    if _state["threads"] is None:
        n = os.environ.get("FASTCONV_BENCH_THREADS")
        if n:
            fc.set_num_threads(int(n))
        _state["threads"] = fc.get_num_threads()
    return _state["threads"]


def _settle(library):
    if _state["library"] is not None and _state["library"] != library:
        time.sleep(PAUSE)
    _state["library"] = library


def _reference(problem):
    if _state["problem"] != problem.key:
        _state["problem"], _state["reference"] = None, None  # free the previous one first
        _state["reference"] = problem.reference()
        _state["problem"] = problem.key
    return _state["reference"]


def _torch_call(problem, entry, n_threads):
    import torch

    if entry.method == "torch-cuda" and not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    torch.set_num_threads(n_threads)
    return bench.peer_call(problem, entry.method)


def run(benchmark, op, shape, dtype, entry):
    """Benchmark entry (its id) on (op, shape name, dtype) with ``benchmark.pedantic``."""
    shape, entry = bench.SHAPES[shape], _ENTRIES[entry]
    with warnings.catch_warnings():
        # small grids on a big GPU: true and harmless here; numba-cuda colours the message, so
        # the start of the pattern is left open
        warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU")
        _run(benchmark, op, shape, dtype, entry)


def _run(benchmark, op, shape, dtype, entry):
    problem = Problem(op, shape, dtype)
    benchmark.group = f"{op} {shape.name} {dtype}"
    reason = _skip_reason(problem.fc_op, entry)
    if reason:
        where = {"gpu": " on device arrays", "gpu+copy": " on host arrays"}.get(entry.device, "")
        pytest.skip(f"{entry.method}{where}: {reason}")
    n_threads = threads()
    if entry.kind == "fastconv":
        impl = _registry.implementation(problem.fc_op, entry.method)
        if not impl.supports(problem.spec(on_device=entry.device == "gpu")):
            pytest.skip(f"{entry.method} does not support {shape.name}")
    if entry.kind == "peer":
        if entry.method.startswith("torch"):
            call, finish = _torch_call(problem, entry, n_threads)
        else:
            call, finish = bench.peer_call(problem, entry.method)
    else:
        call, finish = problem.fastconv_call(entry.method, entry.device)
    chose = None
    if entry.kind == "auto":
        chose = _registry.resolve(problem.fc_op, "auto",
                                  problem.spec(on_device=entry.device == "gpu")).method
    reference = _reference(problem)
    _settle(chose or entry.method)

    # compile, warm up, check the result, estimate the duration
    err, ok = bench.max_error(problem, finish(call()), reference)
    assert ok, f"{entry.method} ({entry.device}) is wrong on {problem}: max err {err:.2e}"
    t0 = time.perf_counter()
    call()
    est = time.perf_counter() - t0
    rounds = 1 if est > bench.SLOW_CALL else int(min(max(math.ceil(BUDGET / est), 3), 100))

    benchmark.extra_info.update(
        op=op, shape=shape.name, dtype=dtype, method=entry.method, device=entry.device,
        flops=problem.flops, bytes=problem.nbytes,
        threads=n_threads, max_err=err, **({"chose": chose} if chose else {}))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    if problem.flops:
        benchmark.extra_info["gflops"] = round(problem.flops / median / 1e9, 3)
    if problem.nbytes:
        benchmark.extra_info["gbps"] = round(problem.nbytes / median / 1e9, 3)
    problem._inputs = None
