"""The threading design (fastconv._threads): one global count, one pool that never spins, small
problems on the calling thread, concurrent callers, forked children."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastconv as fc
from fastconv import _validate
from fastconv.kernels import _parallel
from helpers import is_cuda, method_params

CPU_CONV = [m for m in method_params("conv2d") if not is_cuda(m.values[0])]


@pytest.fixture
def threads():
    """Restore the thread count after a test that changes it."""
    saved = fc.get_num_threads()
    yield
    fc.set_num_threads(saved)


def _callers(n_items, work_ns):
    """The threads `_parallel.run` calls a part on (a Python part: it only records them)."""
    seen, lock = set(), threading.Lock()

    def part(counter):
        with lock:
            seen.add(threading.get_ident())
            counter[0] = n_items  # claim everything
    used = _parallel.run(part, (), n_items, work_ns)
    assert used == len(seen)
    return seen


def test_big_problems_use_every_thread_small_ones_the_caller(threads):
    fc.set_num_threads(3)
    assert len(_callers(100, 100 * _parallel.MIN_PARALLEL_NS)) == 3
    assert _callers(100, _parallel.MIN_PARALLEL_NS // 2) == {threading.get_ident()}
    assert len(_callers(2, 100 * _parallel.MIN_PARALLEL_NS)) == 2  # no more threads than items
    fc.set_num_threads(1)
    assert _callers(100, 100 * _parallel.MIN_PARALLEL_NS) == {threading.get_ident()}


def test_set_num_threads_holds_in_every_python_thread(threads):
    from fastconv.kernels import im2col

    spec = _validate.conv2d(np.zeros((8, 16, 32, 32)), np.zeros((16, 16, 3, 3)), None, 1, 1, 1,
                            1)[3]
    fc.set_num_threads(1)
    seen = {}

    def look():
        seen["count"] = fc.get_num_threads()
        seen["plan"] = im2col.plan(spec)["n_threads"]
        seen["callers"] = len(_callers(100, 100 * _parallel.MIN_PARALLEL_NS))

    t = threading.Thread(target=look)
    t.start()
    t.join()
    assert seen == {"count": 1, "plan": 1, "callers": 1}


def test_a_busy_pool_leaves_a_second_caller_on_its_own_thread(threads):
    fc.set_num_threads(2)
    inside, release = threading.Event(), threading.Event()

    def slow_part(counter):
        inside.set()
        release.wait(10)
        counter[0] = 1

    t = threading.Thread(target=_parallel.run, args=(slow_part, (), 2, 10**9))
    t.start()
    assert inside.wait(10)
    assert _callers(100, 10**9) == {threading.get_ident()}  # no wait for the busy pool
    release.set()
    t.join()
    assert len(_callers(100, 10**9)) == 2


def test_errors_in_pool_threads_reach_the_caller(threads):
    fc.set_num_threads(2)
    main = threading.get_ident()

    def part(counter):
        if threading.get_ident() != main:
            raise ZeroDivisionError("in a pool thread")

    with pytest.raises(ZeroDivisionError, match="in a pool thread"):
        _parallel.run(part, (), 10, 10**9)
    assert len(_callers(100, 10**9)) == 2  # the pool still works


@pytest.mark.parametrize("method", CPU_CONV)
def test_concurrent_big_calls_agree_with_serial_ones(method, threads):
    """Large enough to use the pool: callers share it or run on their own thread."""
    if method not in fc.methods("conv2d"):
        pytest.skip(f"{method} cannot run here")
    fc.set_num_threads(2)
    rng = np.random.default_rng(3)
    problems = [(rng.standard_normal((4, 16, 24, 24)).astype(np.float32),
                 rng.standard_normal((16, 16, 3, 3)).astype(np.float32)) for _ in range(3)]
    want = [fc.conv2d(x, w, padding=1, method=method) for x, w in problems]
    got, errors = {}, []

    def work(i):
        try:
            for rep in range(3):
                got[i, rep] = fc.conv2d(*problems[i], padding=1, method=method)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for (i, _), y in got.items():
        np.testing.assert_array_equal(y, want[i])


def test_no_pool_thread_runs_between_calls():
    """The pool's threads sleep between calls: their CPU time stops growing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    code = textwrap.dedent("""
        import os, time, numpy as np, fastconv as fc
        fc.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((8, 32, 32, 32)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((32, 32, 3, 3)).astype(np.float32)
        for m in fc.methods("conv2d"):
            fc.conv2d(x, w, padding=1, method=m)
        def worker_ticks():
            total = 0
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip().startswith("fastconv"):
                        total += int(fields[11]) + int(fields[12])
            return total
        time.sleep(0.05)
        before = worker_ticks()
        time.sleep(0.5)
        print(worker_ticks() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) <= 1  # clock ticks (1/100 s) in half a second idle


_FORK_CHECK = """
import os, pickle, sys
import numpy as np
import fastconv as fc

fc.set_num_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 16, 24, 24)).astype(np.float32)
w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
g = rng.standard_normal((8, 16, 24, 24)).astype(np.float32)

def results(m):
    y = fc.conv2d(x, w, padding=1, method=m)
    grads = fc.conv2d_backward(g, x, w, padding=1, method=m)
    pm = m if m in fc.methods("max_pool2d") else "auto"  # winograd: convolutions only
    p, i = fc.max_pool2d(x, 2, return_indices=True, method=pm)
    dp = fc.max_pool2d_backward(p, i, x.shape, 2, method=pm)
    return [y, *grads, p, i, dp]

methods = [m for m in fc.methods() if not m.startswith("cuda")] + ["auto"]
parent = {m: results(m) for m in methods}   # the pool is started, BLAS has run
for m in methods:
    r, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            payload = pickle.dumps(results(m))
        except BaseException as e:
            payload = pickle.dumps(repr(e))
        with os.fdopen(wr, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(wr)
    with os.fdopen(r, "rb") as f:
        child = pickle.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert status == 0, (m, status)
    assert not isinstance(child, str), (m, child)
    for a, b in zip(parent[m], child):
        np.testing.assert_array_equal(a, b)
    print("ok", m)
"""


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_every_method_computes_in_a_forked_child():
    out = subprocess.run([sys.executable, "-c", _FORK_CHECK], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    done = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert "auto" in done and "naive" in done and "direct" in done
    assert set(done) >= {m for m in fc.methods() if not m.startswith("cuda")}


def test_the_default_count_follows_the_environment():
    code = "import fastconv as fc; print(fc.get_num_threads())"
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTCONV_NUM_THREADS", "OMP_NUM_THREADS")}

    def count(**extra):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, **extra}, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert count(OMP_NUM_THREADS="1") == 1
    assert count(OMP_NUM_THREADS="3", FASTCONV_NUM_THREADS="2") == 2
    assert count() == len(os.sched_getaffinity(0))


def test_openblas_spin_is_shortened_only_before_numpy_and_never_overridden():
    """fastconv imported first sets OPENBLAS_THREAD_TIMEOUT for the OpenBLAS that NumPy then
    loads, so NumPy's idle BLAS threads sleep instead of spinning into our calls; imported
    after NumPy (too late for OpenBLAS to read it) it sets nothing, and a user's value stays."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    def seen(code, **extra):
        out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get("
                              "'OPENBLAS_THREAD_TIMEOUT'))"], capture_output=True, text=True,
                             env={**env, **extra}, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert seen("import fastconv") == "4"
    assert seen("import numpy, fastconv") == "None"
    assert seen("import fastconv", OPENBLAS_THREAD_TIMEOUT="20") == "20"
