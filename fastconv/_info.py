"""Facts about this machine and its libraries: what ``python -m fastconv info`` prints, and
the header of every benchmark run (`collect` is shared by both)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

__all__ = ["collect", "format_info"]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threading():
    """How the CPU kernels run their threads (see fastconv._threads)."""
    from .kernels import _parallel

    pool = _parallel._pool
    out = {"threading layer": "fastconv's own pool (no OpenMP, no Numba threading layer); "
                              "idle threads sleep",
           "pool threads started": str(len(pool.workers)),
           "one-thread below": f"{_parallel.MIN_PARALLEL_NS / 1e3:.0f} us of estimated work"}
    from . import _SET_BLAS_TIMEOUT

    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    out["OPENBLAS_THREAD_TIMEOUT"] = (
        "4, set by fastconv (imported before NumPy): NumPy's BLAS threads sleep after a call"
        if _SET_BLAS_TIMEOUT else
        "unset: NumPy's OpenBLAS threads spin ~0.1 s after each call (import fastconv before "
        "NumPy, or set it to 4)" if timeout is None else f"{timeout}, as set by the user")
    try:
        from .kernels import _im2col
    except ImportError:
        return out
    n = _im2col.blas_threads()
    out["kernels' BLAS"] = ("threads unknown" if n is None else
                            f"{n} threads, held at 1 while a kernel runs")
    return out


def _cuda_info():
    out = {}
    try:
        from numba import cuda
    except Exception as e:
        out["numba.cuda"] = f"cannot be imported ({e})"
        out["gpu"] = "none"
        return out
    out["implementation"] = str(getattr(cuda, "implementation", "unknown"))
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    out["simulator"] = "yes (NUMBA_ENABLE_CUDASIM=1)" if sim else "no"
    out["memory pool"] = _pool_info(sim)
    if sim:
        out["gpu"] = "simulator"
        return out
    try:
        available = cuda.is_available()
    except Exception as e:
        out["gpu"] = f"none ({e})"
        return out
    if not available:
        out["gpu"] = "none"
        return out
    try:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        cc = ".".join(map(str, dev.compute_capability))
        out["gpu"] = f"{name} (compute capability {cc})"
        out["gpus"] = str(len(cuda.gpus))
    except Exception as e:
        out["gpu"] = f"present, but it could not be opened ({e})"
    try:
        from numba.cuda.cudadrv.driver import driver

        out["driver"] = ".".join(map(str, driver.get_version()))
    except Exception:
        pass
    try:
        out["runtime"] = ".".join(map(str, cuda.runtime.get_version()))
    except Exception:
        pass
    return out


def _pool_info(sim):
    from .kernels.cuda import _devpool

    try:
        limit = _devpool.limit_from_env()
    except ValueError as e:
        return f"misconfigured: {e}"
    if sim:
        return "not used in the simulator"
    if limit == 0:
        return "off (FASTCONV_CUDA_POOL_MB=0)"
    return f"results reuse freed blocks; up to {limit / 2**20:g} MiB idle (FASTCONV_CUDA_POOL_MB)"


def _blas_info():
    import numpy  # noqa: F401  (load the BLAS before asking)

    try:
        import threadpoolctl
    except ImportError:
        return "unknown (threadpoolctl not installed)", []
    pools = threadpoolctl.threadpool_info()
    lines = []
    for p in pools:
        name = p.get("internal_api", "?")
        extra = [f"{p.get('num_threads')} threads"]
        if p.get("threading_layer"):
            extra.append(f"threading {p['threading_layer']}")
        if p.get("architecture"):
            extra.append(p["architecture"])
        lines.append(f"{p.get('user_api')}: {name} {p.get('version') or ''} "
                     f"({', '.join(extra)}) {os.path.basename(p.get('filepath', ''))}")
    blas = [p for p in pools if p.get("user_api") == "blas"]
    short = ", ".join(f"{p.get('internal_api')} {p.get('version') or ''}".strip()
                      + f" ({p.get('num_threads')} threads)" for p in blas) or "none found"
    return short, lines


def _compiled_info():
    out = {}
    for mod in ("_im2col", "_pool"):
        try:
            m = importlib.import_module(f"fastconv.kernels.{mod}")
        except ImportError as e:
            if "No module named" in str(e):
                out[mod] = "not built" if mod == "_im2col" else "not present"
            else:
                out[mod] = f"not usable ({e})"
            continue
        out[mod] = f"built ({m.__file__})"
    return out


def _methods_info():
    from . import _registry

    out = {}
    for op in _registry.OPS:
        rows = []
        for impl in _registry.implementations(op):
            reason = impl.unavailable()
            state = "usable" if reason is None else f"unavailable: {reason}"
            rows.append((impl.method, impl.device, state))
        out[op] = rows
    return out


def collect() -> dict:
    """Everything `info` prints, as a dict (also the header of the benchmark's results)."""

    import fastconv as fc

    from . import _policy, _registry

    versions = {"fastconv": fc.__version__, "python": platform.python_version()}
    for dist in ("numpy", "numba", "numba-cuda", "scipy", "threadpoolctl", "torch",
                 "matplotlib", "tqdm", "pytest-benchmark"):
        v = _version(dist)
        if v is not None:
            versions[dist] = v
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    compiled = _compiled_info()
    threads = {
        "fastconv threads": str(fc.get_num_threads()),
    }
    threads.update(_threading())
    for var in ("FASTCONV_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var):
            threads[f"${var}"] = os.environ[var]
    blas_short, blas_lines = _blas_info()
    from .kernels import numba_cache_location

    return {
        "missing": [f"method {m!r} cannot run here: {why}" for m, why in _registry.missing()],
        "machine": f"{_cpu_name()}, {affinity} CPUs, {platform.system()} {platform.release()}",
        "versions": versions,
        "compiled": compiled,
        "numba cache": numba_cache_location(),
        "threads": threads,
        "blas": blas_short,
        "thread pools": blas_lines,
        "cuda": _cuda_info(),
        "methods": _methods_info(),
        "auto": _policy.AUTO.describe(),
    }


def format_info(info) -> str:
    """The text ``python -m fastconv info`` prints for `collect`'s ``info``."""
    out = []

    def section(title):
        out.append(f"\n__{title}__")

    def kv(k, v, width=28):
        out.append(f"{k + ':':<{width}} {v}")

    for line in info["missing"]:
        out.append(f"WARNING: {line}")
    section("Machine")
    kv("CPU", info["machine"])
    section("Versions")
    for k, v in info["versions"].items():
        kv(k, v)
    section("Compiled core (Cython)")
    for k, v in info["compiled"].items():
        kv(f"fastconv.kernels.{k}", v)
    kv("Numba kernel cache", info["numba cache"])
    section("Threads")
    for k, v in info["threads"].items():
        kv(k, v)
    section("BLAS and thread pools (threadpoolctl)")
    kv("BLAS", info["blas"])
    for line in info["thread pools"]:
        out.append(f"  {line}")
    section("CUDA (numba.cuda)")
    for k, v in info["cuda"].items():
        kv(k, v)
    section("Methods")
    for op, rows in info["methods"].items():
        out.append(f"{op}:")
        for m, dev, state in rows:
            out.append(f"  {m:<14} {dev:<5} {state}")
    section("method='auto'")
    for k, v in info["auto"].items():
        kv(k, v)
    return "\n".join(out)
