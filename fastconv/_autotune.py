"""``method="auto"``: which implementation runs a problem when the caller does not say.

Two modes, both choosing only among ``_registry.candidates(op, spec)`` (the implementations that
are usable here, on the arrays' side, and support the problem), so "auto" can never pick a
method that cannot run the configuration:

policy (the default)
    A table of measured times, one entry per (op, shape, dtype, device, threads) of the
    benchmark's shape suite, written by ``python -m fastconv bench --save-policy``. A problem
    takes the ranking of the nearest measured entry (same op and device; distance over log-sizes
    of the problem's GEMM-like dimensions, dtype and thread count), restricted to the
    candidates. A candidate the entry never measured wins only if its registered ``priority``
    is higher than the measured winner's; with no table at all the highest priority wins.
    The table is, in order: the JSON file named by ``FASTCONV_AUTO_TABLE``; ``auto_table.json``
    in the user's cache directory (``python -m fastconv bench --save-policy`` writes it there);
    the table shipped in ``fastconv/_autotable.py`` (measured on the development machine, see
    benchmarks/RESULTS.md).
measured (autotune)
    ``fastconv.autotune()`` or ``FASTCONV_AUTOTUNE=1``: the first time a problem is seen, time
    every candidate once on random data of the problem's shapes and dtype (after a warm-up call
    that compiles) and remember the fastest, in memory and, with ``cache=True`` or
    ``FASTCONV_AUTOTUNE_CACHE=1``, in ``autotune.json`` in the user's cache directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from . import _threads as _thread_count

__all__ = ["autotune", "choose", "predict", "cache_dir", "load_table", "set_table", "clear"]

_lock = threading.RLock()


# ---------------------------------------------------------------------------------------------
# where things are kept


def cache_dir() -> Path:
    """fastconv's directory in the user's cache dir (``FASTCONV_CACHE_DIR`` overrides it)."""
    env = os.environ.get("FASTCONV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "fastconv" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fastconv"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastconv"


def default_table_path() -> Path:
    return cache_dir() / "auto_table.json"


def default_tune_path() -> Path:
    return cache_dir() / "autotune.json"


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _threads() -> int:
    return _thread_count.get_num_threads()


# ---------------------------------------------------------------------------------------------
# the measured table


def entry_from_spec(op, spec, times, *, threads, name=None) -> dict:
    """A table entry (plain JSON data) for ``spec``, timed ``times`` = {method: seconds}."""
    e = {
        "op": op,
        "device": "cuda" if spec.on_device else "cpu",
        "dtype": spec.dtype,
        "threads": int(threads),
        "x_shape": list(spec.x_shape),
        "stride": list(spec.stride),
        "out_hw": list(spec.out_hw),
        "times": {m: float(t) for m, t in times.items()},
    }
    if hasattr(spec, "w_shape"):
        e["w_shape"], e["groups"] = list(spec.w_shape), spec.groups
    else:
        e["kernel"] = list(spec.kernel)
    if name:
        e["shape"] = name
    return e


def _log2(v) -> float:
    return math.log2(max(float(v), 1.0))


def _features(x_shape, out_hw, stride, w_shape=None, groups=1, kernel=None):
    """Log-sizes that decide which algorithm wins. conv: the GEMM view (rows N*OH*OW, output
    channels per group, reduction length C/groups*R*S), the group count, stride and kernel area;
    pool: planes, output plane size, window area, stride, and whether windows overlap."""
    n, c = x_shape[0], x_shape[1]
    oh, ow = out_hw
    s = stride[0] * stride[1]
    if w_shape is not None:
        k, cg, r, q = w_shape
        return (_log2(n * oh * ow), _log2(k // groups), _log2(cg * r * q), _log2(groups),
                _log2(s), _log2(r * q))
    kh, kw = kernel
    overlap = 1.0 if stride[0] < kh or stride[1] < kw else 0.0
    return (_log2(n * c), _log2(oh * ow), _log2(kh * kw), _log2(s), 2.0 * overlap)


def _spec_features(spec):
    if hasattr(spec, "w_shape"):
        return _features(spec.x_shape, spec.out_hw, spec.stride, spec.w_shape, spec.groups)
    return _features(spec.x_shape, spec.out_hw, spec.stride, kernel=spec.kernel)


def _entry_features(e):
    if "w_shape" in e:
        return _features(e["x_shape"], e["out_hw"], e["stride"], e["w_shape"], e["groups"])
    return _features(e["x_shape"], e["out_hw"], e["stride"], kernel=e["kernel"])


class _Table:
    def __init__(self):
        self.entries: list[dict] | None = None
        self.source = ""
        self.feats: list[tuple] = []
        self.generation = 0  # bumped whenever a remembered choice may have gone stale


_table = _Table()


def _shipped():
    try:
        from . import _autotable
    except ImportError:  # pragma: no cover - the module ships with the package
        return [], "none"
    return list(_autotable.ENTRIES), "shipped fastconv/_autotable.py"


def load_table(force=False):
    """(entries, source) of the policy table, loaded once (see the module docstring)."""
    with _lock:
        if _table.entries is not None and not force:
            return _table.entries, _table.source
        entries, source = None, None
        env = os.environ.get("FASTCONV_AUTO_TABLE")
        for path, label in ((env, "FASTCONV_AUTO_TABLE"), (default_table_path(), "user cache")):
            if not path or not Path(path).is_file():
                continue
            try:
                data = json.loads(Path(path).read_text())
                entries = list(data["entries"] if isinstance(data, dict) else data)
                source = f"{path} ({label})"
                break
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"ignoring the auto policy table {path}: {e}", RuntimeWarning,
                              stacklevel=2)
        if entries is None:
            entries, source = _shipped()
        _set(entries, source)
        return _table.entries, _table.source


def _set(entries, source):
    _table.entries = [e for e in entries if isinstance(e, dict) and e.get("times")]
    _table.source = source
    _table.feats = [_entry_features(e) for e in _table.entries]
    _table.generation += 1


def set_table(entries, source="set_table()"):
    """Replace the policy table (a list of `entry_from_spec` dicts); None reloads the default."""
    with _lock:
        if entries is None:
            _table.entries = None
            load_table()
        else:
            _set(list(entries), source)


def predict(op, spec, names, threads=None):
    """Measured ranking of ``names`` for ``spec``: [(method, seconds), ...] fastest first, from
    the nearest table entry that measured any of them, or [] when the table has none."""
    entries, _ = load_table()
    if not entries:
        return []
    threads = _threads() if threads is None else threads
    device = "cuda" if spec.on_device else "cpu"
    f = _spec_features(spec)
    best, best_d = None, math.inf
    for e, fe in zip(entries, _table.feats):
        if e["op"] != op or e["device"] != device or len(fe) != len(f):
            continue
        times = {m: t for m, t in e["times"].items() if m in names}
        if not times:
            continue
        d = sum((a - b) ** 2 for a, b in zip(f, fe))
        d += 0.0 if e["dtype"] == spec.dtype else 4.0
        d += (_log2(e["threads"]) - _log2(threads)) ** 2
        if d < best_d:
            best, best_d = times, d
    return sorted(best.items(), key=lambda mt: mt[1]) if best else []


def _policy(op, spec, by_name):
    """The measured choice (the registry remembers it per problem, under `state`)."""
    ranking = predict(op, spec, by_name)
    if ranking:
        winner = by_name[ranking[0][0]]
        measured = {m for m, _ in ranking}
        unmeasured = [i for m, i in by_name.items() if m not in measured]
        better = [i for i in unmeasured if i.priority > winner.priority]
        choice = max(better, key=lambda i: i.priority) if better else winner
    else:
        choice = max(by_name.values(), key=lambda i: i.priority)
    return choice.method


# ---------------------------------------------------------------------------------------------
# the measured mode


class _Tuning:
    def __init__(self):
        self.enabled = False
        self.path: Path | None = None
        self.memo: dict[str, dict] = {}
        self.file_loaded_from: Path | None = None
        self.measurements = 0  # how many problems were timed (tests read it)


_tuning = _Tuning()


def _truthy(v):
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def _from_env():
    _tuning.enabled = _truthy(os.environ.get("FASTCONV_AUTOTUNE", "0"))
    c = os.environ.get("FASTCONV_AUTOTUNE_CACHE", "")
    if _truthy(c):
        _tuning.path = default_tune_path()
    elif c and c.strip().lower() not in ("0", "false", "no", "off"):
        _tuning.path = Path(c).expanduser()


_from_env()


class _Restore:
    """What `autotune` returns: use it as a context manager to restore the previous setting."""

    def __init__(self, previous):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _tuning.enabled, _tuning.path = self._previous
        return False

    def __repr__(self):
        return f"<fastconv autotune enabled={_tuning.enabled} cache={_tuning.path}>"


def autotune(enabled=True, *, cache=False):
    """Choose ``method="auto"`` by timing the candidates instead of predicting.

    With autotuning on, the first ``method="auto"`` call on a new problem (op, shapes, options,
    dtype, device, thread count) times every method that can run it on random data of the same
    shapes and keeps the fastest; later calls reuse the choice. The default, off, predicts from
    the measured table in ``fastconv/_autotable.py`` (see ``python -m fastconv info``).

    Parameters
    ----------
    enabled : bool
        Turn autotuning on or off.
    cache : bool or path-like
        Also keep the choices in a JSON file, so other processes reuse them: ``True`` for
        ``autotune.json`` in the user's cache directory (``~/.cache/fastconv`` on Linux;
        ``FASTCONV_CACHE_DIR`` overrides it), a path for that file, ``False`` for memory only.

    Returns
    -------
    context manager
        The setting applies at once; used in a ``with`` statement, the previous setting comes
        back at the end of the block.

    Notes
    -----
    The environment variables ``FASTCONV_AUTOTUNE=1`` and ``FASTCONV_AUTOTUNE_CACHE=1`` (or a
    file path) turn the same on at import. Timing runs each candidate once to compile and warm
    up, then up to three times; methods the table predicts to be many times slower are skipped.

    Examples
    --------
    >>> import numpy as np, fastconv as fc
    >>> x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    >>> with fc.autotune():
    ...     y = fc.conv2d(x, w)          # times the candidates, then remembers
    >>> y.shape
    (2, 4, 6, 6)
    """
    previous = (_tuning.enabled, _tuning.path)
    if cache is True:
        path = default_tune_path()
    elif cache is False or cache is None:
        path = None
    else:
        path = Path(os.fspath(cache)).expanduser()
    _tuning.enabled, _tuning.path = bool(enabled), path
    return _Restore(previous)


def clear():
    """Forget tuned choices kept in memory and the choices the registry remembers (the files
    stay)."""
    with _lock:
        _tuning.memo.clear()
        _tuning.file_loaded_from = None
        _table.generation += 1


def _tune_key(op, spec, names, threads):
    from ._version import __version__

    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec._asdict().items()}
    return json.dumps([__version__, op, fields, sorted(names), threads], sort_keys=True)


def _read_tune_file(path):
    try:
        data = json.loads(path.read_text())
        return dict(data.get("choices", {}))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"ignoring the autotune cache {path}: {e}", RuntimeWarning, stacklevel=3)
        return {}


def _store(key, record):
    _tuning.memo[key] = record
    path = _tuning.path
    if path is None:
        return
    try:
        choices = _read_tune_file(path)  # merge with what other processes wrote meanwhile
        choices[key] = record
        _write_json_atomic(path, {"format": 1, "choices": choices})
    except OSError as e:
        warnings.warn(f"could not write the autotune cache {path}: {e}", RuntimeWarning,
                      stacklevel=3)


def _lookup(key):
    hit = _tuning.memo.get(key)
    if hit is None and _tuning.path is not None:
        if _tuning.file_loaded_from != _tuning.path:
            for k, v in _read_tune_file(_tuning.path).items():
                _tuning.memo.setdefault(k, v)
            _tuning.file_loaded_from = _tuning.path
        hit = _tuning.memo.get(key)
    return hit


def _random_inputs(op, spec, rng):
    """Arguments of the kernel entry point for ``op`` on random data shaped like ``spec``."""
    dt = np.dtype(spec.dtype)

    def rand(shape):
        return rng.standard_normal(shape).astype(dt)

    if op == "conv2d":
        b = rand(spec.w_shape[0]) if spec.has_bias else None
        return (rand(spec.x_shape), rand(spec.w_shape), b, spec)
    if op == "conv2d_backward":
        return (rand(spec.out_shape), rand(spec.x_shape), rand(spec.w_shape), spec,
                True, True, True)
    if op == "max_pool2d":
        return (rand(spec.x_shape), spec, True)
    # max_pool2d_backward: indices of a random tap of each window, clipped into the plane
    n, c, h, w = spec.x_shape
    oh, ow = spec.out_hw
    kh, kw = spec.kernel
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    shape = spec.out_shape
    rows = np.arange(oh).reshape(-1, 1) * sh - ph + rng.integers(0, kh, shape) * dh
    cols = np.arange(ow) * sw - pw + rng.integers(0, kw, shape) * dw
    idx = np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)
    return (rand(spec.out_shape), idx.astype(np.int64), spec)


def _time_candidates(op, spec, by_name, budget=0.2):
    """{method: seconds} for the candidates, fastest predicted first, hopeless ones cut short."""
    args = _random_inputs(op, spec, np.random.default_rng(0))
    sync = lambda: None  # noqa: E731
    if spec.on_device:
        from numba import cuda

        args = tuple(cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args)
        sync = cuda.synchronize
    ranking = dict(predict(op, spec, by_name))
    fastest_predicted = min(ranking.values()) if ranking else None
    order = sorted(by_name, key=lambda m: (ranking.get(m, math.inf), -by_name[m].priority))
    times: dict[str, float] = {}
    for m in order:
        if fastest_predicted is not None and ranking.get(m, 0) > 8 * fastest_predicted:
            continue  # the table says it is far slower: not worth a call on a large problem
        fn = by_name[m].fn
        fn(*args)  # compile and warm up
        sync()
        best = math.inf
        start = time.perf_counter()
        for _ in range(3):
            t0 = time.perf_counter()
            fn(*args)
            sync()
            best = min(best, time.perf_counter() - t0)
            if times and best > 4 * min(times.values()):
                break  # clearly losing
            if time.perf_counter() - start > budget:
                break
        times[m] = best
    return times


def _tuned(op, spec, by_name):
    threads = _threads()
    key = _tune_key(op, spec, by_name, threads)
    with _lock:
        hit = _lookup(key)
        if hit is not None and hit.get("method") in by_name:
            return hit["method"]
        times = _time_candidates(op, spec, by_name)
        method = min(times, key=times.get)
        _tuning.measurements += 1
        _store(key, {"method": method, "times": times})
        return method


# ---------------------------------------------------------------------------------------------
# the choice


def state():
    """What a choice depends on besides the problem and the candidates; the registry keeps
    its choices under it, so that they are made again when the table, the tuning setting or
    the thread count changes."""
    return (_tuning.enabled, _tuning.path, _table.generation, _table.entries is None,
            _threads())


def choose(op, spec, candidates):
    """The implementation ``method="auto"`` runs: one of ``candidates`` (non-empty)."""
    if len(candidates) == 1:
        return candidates[0]
    by_name = {i.method: i for i in candidates}
    method = _tuned(op, spec, by_name) if _tuning.enabled else _policy(op, spec, by_name)
    return by_name[method]


def describe() -> dict:
    """The state of the auto policy, for ``python -m fastconv info``."""
    entries, source = load_table()
    return {
        "policy table": f"{len(entries)} measured problems from {source}",
        "autotune": "on" if _tuning.enabled else "off (fastconv.autotune() or FASTCONV_AUTOTUNE=1)",
        "autotune cache": str(_tuning.path) if _tuning.path else "memory only",
    }
