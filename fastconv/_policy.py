"""``method="auto"``: a pure choice over measured data, and the opt-in autotuner.

The policy, `choose`, is a pure function of the problem, the candidates (the implementations
that are usable here, on the arrays' side, and take the problem: ``_registry.candidates``) and
a measured `Table`, as SciPy's ``choose_conv_method``. A problem takes the ranking of the
nearest measured entry (same op and device; distance over log-sizes of the problem's GEMM-like
dimensions, dtype and thread count), restricted to the candidates; a candidate the entry never
measured wins only if its registered priority is higher than the measured winner's; with no
table at all the highest priority wins.

The table is JSON data: the file ``FASTCONV_AUTO_TABLE`` names, else ``auto_table.json`` in the
user's cache directory (``python -m fastconv bench --save-policy`` writes it there), else the
one shipped in the package (``fastconv/auto_table.json``, measured on the development machines,
see benchmarks/RESULTS.md). Only ``bench --save-policy`` writes and merges tables, CPU and GPU
runs alike (`merge`).

Autotuning (``fastconv.autotune()`` or ``FASTCONV_AUTOTUNE=1``) times the candidates the first
time a problem is seen and remembers the fastest, in memory and, on request, in
``autotune.json`` in the user's cache directory. Everything "auto" remembers — the loaded table,
the tuning settings and choices, and a generation number that tells the registry its remembered
choices went stale — lives in one object, `AUTO`.
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
from typing import NamedTuple

import numpy as np

__all__ = ["Table", "AUTO", "autotune", "choose", "rank", "entry", "merge", "read_table",
           "cache_dir", "time_candidates"]

SHIPPED_TABLE = Path(__file__).with_name("auto_table.json")


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


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the measured table: plain data


def entry(op, spec, times, *, threads, name=None) -> dict:
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
    if spec.layout != "NCHW":
        e["layout"] = spec.layout
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


class Table(NamedTuple):
    """Measured entries (entries with no times dropped), where they came from, their
    features."""

    entries: tuple
    source: str
    features: tuple

    @classmethod
    def of(cls, entries, source):
        kept = tuple(e for e in entries if isinstance(e, dict) and e.get("times"))
        return cls(kept, source, tuple(_entry_features(e) for e in kept))


def read_table(path) -> tuple[list, object]:
    """(entries, source metadata) of a table file; ([], None) when there is none."""
    path = Path(path)
    if not path.is_file():
        return [], None
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data, None
    return list(data["entries"]), data.get("source")


def _layout(e):
    return e.get("layout", "NCHW")  # entries name only a layout other than NCHW


def _key(e):
    return (e["op"], e.get("shape"), e["dtype"], _layout(e), e["device"], e["threads"])


def merge(old, new):
    """The entries of table ``old`` updated by those of ``new``: a problem measured again (same
    op, shape, dtype, layout, device, threads) takes its new times, the others stay, so that
    CPU and GPU runs, on two machines, add up."""
    fresh = {_key(e) for e in new}
    out = [e for e in old if _key(e) not in fresh] + list(new)
    return sorted(out, key=lambda e: (e["device"], e["op"], e.get("shape") or "", e["dtype"],
                                      _layout(e), e["threads"]))


#: Ops whose problems, where the table has none of their own, rank as another op's: a
#: transposed convolution is a conv2d grad-input (its spec is that conv's), its backward a conv
#: forward and grad-weight; adaptive pools are average pools.
TABLE_ALIASES = {"conv_transpose2d": "conv2d_backward",
                 "conv_transpose2d_backward": "conv2d_backward",
                 "adaptive_avg_pool2d": "avg_pool2d",
                 "adaptive_avg_pool2d_backward": "avg_pool2d_backward"}


def rank(op, spec, names, table: Table, threads):
    """Measured ranking of ``names`` for ``spec``: [(method, seconds), ...] fastest first, from
    the nearest table entry that measured any of them, or [] when the table has none."""
    device = "cuda" if spec.on_device else "cpu"
    if not any(e["op"] == op and e["device"] == device for e in table.entries):
        op = TABLE_ALIASES.get(op, op)
    f = _spec_features(spec)
    best, best_d = None, math.inf
    for e, fe in zip(table.entries, table.features):
        if e["op"] != op or e["device"] != device or len(fe) != len(f):
            continue
        times = {m: t for m, t in e["times"].items() if m in names}
        if not times:
            continue
        d = sum((a - b) ** 2 for a, b in zip(f, fe))
        d += 0.0 if e["dtype"] == spec.dtype else 4.0
        d += (_log2(e["threads"]) - _log2(threads)) ** 2
        d += 0.0 if _layout(e) == spec.layout else 2.0
        if d < best_d:
            best, best_d = times, d
    return sorted(best.items(), key=lambda mt: mt[1]) if best else []


def choose(op, spec, candidates, table: Table, threads):
    """The candidate (an implementation of ``_registry``) the policy picks for ``spec``."""
    by_name = {i.method: i for i in candidates}
    ranking = rank(op, spec, by_name, table, threads)
    if not ranking:
        return max(candidates, key=lambda i: i.priority)
    winner = by_name[ranking[0][0]]
    measured = {m for m, _ in ranking}
    better = [i for m, i in by_name.items() if m not in measured and i.priority > winner.priority]
    return max(better, key=lambda i: i.priority) if better else winner


# ---------------------------------------------------------------------------------------------
# measuring


def random_arguments(op, spec, rng):
    """Arguments of the kernel entry point for ``op`` on random data shaped like ``spec``."""
    dt = np.dtype(spec.dtype)
    last = spec.layout == "NHWC"

    def rand(shape, kind="x"):  # an NCHW / OIHW shape, in the spec's layout
        if last and len(shape) == 4:
            shape = tuple(shape[i] for i in ((0, 2, 3, 1) if kind == "x" else (2, 3, 1, 0)))
        return rng.standard_normal(shape).astype(dt)

    if op in ("conv2d", "conv_transpose2d"):
        k = spec.w_shape[0] if op == "conv2d" else spec.x_shape[1]
        b = rand((k,)) if spec.has_bias else None
        x = rand(spec.x_shape if op == "conv2d" else spec.out_shape)
        return (x, rand(spec.w_shape, "w"), b, spec)
    if op in ("conv2d_backward", "conv_transpose2d_backward"):
        x, y = rand(spec.x_shape), rand(spec.out_shape)
        g, x = (y, x) if op == "conv2d_backward" else (x, y)
        return (g, x, rand(spec.w_shape, "w"), spec, True, True, True)
    if op in ("avg_pool2d", "adaptive_avg_pool2d"):
        return (rand(spec.x_shape), spec)
    if op in ("avg_pool2d_backward", "adaptive_avg_pool2d_backward"):
        return (rand(spec.out_shape), spec)
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
    if last:
        idx = np.ascontiguousarray(idx.transpose(0, 2, 3, 1))
    return (rand(spec.out_shape), idx.astype(np.int64), spec)


def time_candidates(op, spec, candidates, args=None, ranking=(), budget=0.2):
    """{method: seconds} of the candidates on ``args`` (kernel arguments; random data shaped
    like ``spec`` by default), each called once to compile and warm up, then up to three
    times; those ``ranking`` (a `rank`) predicts far slower, or clearly losing, cut short."""
    if args is None:
        args = random_arguments(op, spec, np.random.default_rng(0))
    sync = lambda: None  # noqa: E731
    if spec.on_device:
        from numba import cuda

        args = tuple(cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args)
        sync = cuda.synchronize
    predicted = dict(ranking)
    fastest_predicted = min(predicted.values()) if predicted else None
    order = sorted(candidates, key=lambda i: (predicted.get(i.method, math.inf), -i.priority))
    times: dict[str, float] = {}
    for impl in order:
        if fastest_predicted is not None and predicted.get(impl.method, 0) > 8 * fastest_predicted:
            continue  # the table says it is far slower: not worth a call on a large problem
        fn = impl.kernel(spec)
        fn(*args)
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
        times[impl.method] = best
    return times


# ---------------------------------------------------------------------------------------------
# what "auto" remembers, in one object


def _truthy(v):
    return str(v).strip().lower() in ("1", "true", "yes", "on")


class Auto:
    """The state of ``method="auto"``: the table it reads, whether it autotunes and where it
    keeps tuned choices, those choices, and `generation`, bumped whenever a choice the registry
    remembered may have gone stale."""

    def __init__(self, environ=os.environ):
        self.lock = threading.RLock()
        self.generation = 0
        self._table: Table | None = None
        self.tuning = _truthy(environ.get("FASTCONV_AUTOTUNE", "0"))
        c = environ.get("FASTCONV_AUTOTUNE_CACHE", "")
        self.tune_path = (cache_dir() / "autotune.json" if _truthy(c) else
                          Path(c).expanduser() if c and c.strip().lower() not in
                          ("0", "false", "no", "off") else None)
        self.tuned: dict[str, dict] = {}  # tuned choices, by problem key
        self._tune_file_read: Path | None = None

    # the table

    @property
    def table(self) -> Table:
        with self.lock:
            if self._table is None:
                self._table = self._load()
            return self._table

    def _load(self) -> Table:
        env = os.environ.get("FASTCONV_AUTO_TABLE")
        for path, label in ((env, "FASTCONV_AUTO_TABLE"),
                            (cache_dir() / "auto_table.json", "user cache")):
            if not path or not Path(path).is_file():
                continue
            try:
                return Table.of(read_table(path)[0], f"{path} ({label})")
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"ignoring the auto policy table {path}: {e}", RuntimeWarning,
                              stacklevel=4)
        return Table.of(read_table(SHIPPED_TABLE)[0], "shipped fastconv/auto_table.json")

    def set_table(self, entries, source="set_table()"):
        """Use ``entries`` (a list of `entry` dicts) as the table; None: load it again."""
        with self.lock:
            self._table = None if entries is None else Table.of(list(entries), source)
            self.generation += 1

    def forget(self):
        """Forget tuned choices kept in memory and make the registry choose again (the files
        stay)."""
        with self.lock:
            self.tuned.clear()
            self._tune_file_read = None
            self.generation += 1

    # choosing

    def choose(self, op, spec, candidates, threads):
        """The candidate ``method="auto"`` runs (``candidates`` is not empty)."""
        if len(candidates) == 1:
            return candidates[0]
        if not self.tuning:
            return choose(op, spec, candidates, self.table, threads)
        by_name = {i.method: i for i in candidates}
        key = self._tune_key(op, spec, by_name, threads)
        with self.lock:
            hit = self._lookup(key)
            if hit is None or hit.get("method") not in by_name:
                times = time_candidates(op, spec, candidates,
                                        ranking=rank(op, spec, by_name, self.table, threads))
                hit = {"method": min(times, key=times.get), "times": times}
                self._store(key, hit)
            return by_name[hit["method"]]

    def state(self):
        """What a remembered choice depends on besides the problem and the registry."""
        return (self.generation, self.tuning, self.tune_path)

    # tuned choices, in memory and in the cache file

    @staticmethod
    def _tune_key(op, spec, names, threads):
        from ._version import __version__

        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec._asdict().items()}
        return json.dumps([__version__, op, fields, sorted(names), threads], sort_keys=True)

    def _read_tune_file(self, path):
        try:
            return dict(json.loads(path.read_text()).get("choices", {}))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            warnings.warn(f"ignoring the autotune cache {path}: {e}", RuntimeWarning,
                          stacklevel=5)
            return {}

    def _lookup(self, key):
        if key not in self.tuned and self.tune_path is not None:
            if self._tune_file_read != self.tune_path:
                for k, v in self._read_tune_file(self.tune_path).items():
                    self.tuned.setdefault(k, v)
                self._tune_file_read = self.tune_path
        return self.tuned.get(key)

    def _store(self, key, record):
        self.tuned[key] = record
        if self.tune_path is None:
            return
        try:
            choices = self._read_tune_file(self.tune_path)  # others may have written meanwhile
            choices[key] = record
            write_json_atomic(self.tune_path, {"format": 1, "choices": choices})
        except OSError as e:
            warnings.warn(f"could not write the autotune cache {self.tune_path}: {e}",
                          RuntimeWarning, stacklevel=5)

    def describe(self) -> dict:
        """The state of the auto policy, for ``python -m fastconv info``."""
        t = self.table
        return {
            "policy table": f"{len(t.entries)} measured problems from {t.source}",
            "autotune": ("on" if self.tuning else
                         "off (fastconv.autotune() or FASTCONV_AUTOTUNE=1)"),
            "autotune cache": str(self.tune_path) if self.tune_path else "memory only",
            "tuned problems": str(len(self.tuned)),
        }


AUTO = Auto()


class _Restore:
    """What `autotune` returns: used as a context manager, it restores the previous setting."""

    def __init__(self, previous):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with AUTO.lock:
            AUTO.tuning, AUTO.tune_path = self._previous
            AUTO.generation += 1
        return False

    def __repr__(self):
        return f"<fastconv autotune enabled={AUTO.tuning} cache={AUTO.tune_path}>"


def autotune(enabled=True, *, cache=False):
    """Choose ``method="auto"`` by timing the candidates instead of predicting.

    With autotuning on, the first ``method="auto"`` call on a new problem (op, shapes, options,
    dtype, device, thread count) times every method that can run it on random data of the same
    shapes and keeps the fastest; later calls reuse the choice. The default, off, predicts from
    the measured table (``fastconv/auto_table.json``; see ``python -m fastconv info``).

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
    with AUTO.lock:
        previous = (AUTO.tuning, AUTO.tune_path)
        if cache is True:
            path = cache_dir() / "autotune.json"
        elif cache is False or cache is None:
            path = None
        else:
            path = Path(os.fspath(cache)).expanduser()
        AUTO.tuning, AUTO.tune_path = bool(enabled), path
        AUTO.generation += 1
    return _Restore(previous)
