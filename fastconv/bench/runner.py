"""The run: what to time for each problem, timing it, re-timing the contenders together,
the comparisons, and the measured table behind method="auto" (``--save-policy``)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from .. import _policy, _registry
from . import peers as _peers
from .suite import OPS, SHAPES, Problem, max_error, peer_call
from .timing import SLOW_CALL, measure, measure_together

__all__ = ["Entry", "Result", "entries_for", "run", "auto_report", "policy_entries",
           "save_policy", "real_gpu", "CONTENDERS"]

CONTENDERS = 1.5  # methods within this factor of a problem's fastest are re-timed together


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


def real_gpu():
    return _registry.cuda_missing() is None and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"


def has_torch():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def entries_for(problem, *, peers=True):
    """What can be timed for a problem here, in table order."""
    out, skipped = [], []
    host_spec = problem.spec()
    dev_spec = host_spec._replace(on_device=True)
    gpu = False
    for impl in _registry.implementations(problem.fc_op):
        m = impl.method
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
        if has_torch():
            out.append(Entry("torch", "peer", "cpu"))
            if gpu or real_gpu():
                out.append(Entry("torch-cuda", "peer", "gpu"))
    return out, skipped


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
    from .worker import TorchWorker  # on demand: `python -m fastconv.bench.worker` runs it

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


def policy_entries(results, threads):
    """The measured table behind method="auto" (see fastconv._policy) from a run: held-out
    shapes stay out of it."""
    rows = {}
    for r in results:
        if (r.kind == "fastconv" and r.time and r.ok and r.device in ("cpu", "gpu")
                and not SHAPES[r.shape].held_out):
            rows.setdefault((r.op, r.shape, r.dtype, r.device), {})[r.method] = r.time
    entries = []
    for (op, shape, dtype, device), times in rows.items():
        spec = Problem(op, SHAPES[shape], dtype).spec(on_device=device == "gpu")
        entries.append(_policy.entry(OPS[op][0], spec, times, threads=threads, name=shape))
    return entries


def save_policy(entries, path, meta, merge=True):
    """Write the policy table (JSON); with ``merge``, entries already in the file for other
    problems stay (`fastconv._policy.merge`), so CPU and GPU runs on two machines add up."""
    sources = [meta]
    if merge:
        try:
            old, old_meta = _policy.read_table(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--save-policy: {path} is not a policy table ({e})")
        entries = _policy.merge(old, entries)
        if old and old_meta:
            sources = (old_meta if isinstance(old_meta, list) else [old_meta]) + sources
    source = sources if len(sources) > 1 else sources[0]
    _policy.write_json_atomic(path, {"source": source, "entries": list(entries)})
