"""Output: the text table, Markdown, the chart, the auto check, and saved runs read back."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import shlex
import sys

import numpy as np

from .runner import Result
from .suite import OPS, SHAPES

__all__ = ["format_text", "format_markdown", "format_auto", "plot", "machine_summary",
           "load_results", "table_rows", "COLUMNS"]


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


COLUMNS = ("op", "shape", "dtype", "method", "device", "time", "IQR", "GFLOP/s", "GB/s",
           "vs numpy", "vs torch", "max err")

#: What the columns mean, printed above the table.
LEGEND = ("time: median of the timed calls; IQR: their interquartile range, as +-% of the "
          "median; GFLOP/s (conv) and GB/s (pool: input, output and int64 indices moved) at "
          "the median; vs numpy, vs torch: that peer's median over this row's (higher is "
          "faster); max err: max |y - ref| / max(1, max |ref|) against NumPy im2col in "
          "float64; * fastest on its side (CPU or GPU)")


def spread(samples, median):
    """Half the interquartile range of ``samples``, relative to ``median`` (None if unknown)."""
    if not samples or not median or len(samples) < 2:
        return None
    q1, q3 = np.percentile(samples, [25, 75])
    return (q3 - q1) / 2 / median


def peer_notes(results):
    """Why a peer column is empty: lines to print under the table."""
    notes = []
    cpu = [r for r in results if r.device == "cpu" and r.kind != "peer" and r.time]
    if cpu and not any(r.method == "torch" and r.time for r in results):
        why = next((r.note for r in results if r.method == "torch" and r.note), None)
        if why is None:
            why = ("PyTorch was not timed (--no-peers or --methods)"
                   if importlib.util.find_spec("torch") is not None else
                   "PyTorch is not installed (pip install torch adds it as a peer)")
        notes.append("no 'vs torch' on the CPU: " + why)
    if cpu and not any(r.method == "numpy" and r.time for r in results):
        notes.append("no 'vs numpy': the NumPy reference was not timed (--no-peers or "
                     "--methods)")
    return notes


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
        iqr = spread(r.samples, r.time)
        rows.append([r.op, r.shape, r.dtype, r.label + star, r.device, _fmt_time(r.time),
                     "" if iqr is None else f"+-{100 * iqr:.1f}%",
                     _fmt(r.gflops, ".3g"), _fmt(r.gbps, ".3g"),
                     _fmt(r.speedup_numpy, ".2f") + ("x" if r.speedup_numpy else ""),
                     _fmt(r.speedup_torch, ".2f") + ("x" if r.speedup_torch else ""), err])
    return rows


def format_text(results):
    rows = table_rows(results)
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    right = {5, 6, 7, 8, 9, 10}

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
    from .. import _info

    info = _info.collect()
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
    out += [LEGEND + ".", ""] + [f"({n})" for n in peer_notes(results)]
    out += ["", "```", format_auto(report), "```", ""]
    return "\n".join(out)


#: One colour per method and peer, the same in every chart (colours of the tab20 map).
COLORS = {
    "naive": "#7f7f7f", "im2col": "#1f77b4", "direct": "#2ca02c", "winograd": "#17becf",
    "auto": "#000000", "cuda-naive": "#c7c7c7", "cuda-im2col": "#aec7e8",
    "cuda-direct": "#98df8a", "numpy": "#d62728", "scipy": "#9467bd", "torch": "#ff7f0e",
    "torch-cuda": "#ffbb78",
}


def _color(method):
    return COLORS.get(method, "#8c564b")


def _shape_label(name):
    from .suite import SHAPES

    s = SHAPES.get(name)
    if s is None:
        return name
    if s.kind == "conv":
        g = f" g{s.groups}" if s.groups > 1 else ""
        return (f"{name}\n{s.n}x{s.c}x{s.hw}\nk{s.k} {s.r}x{s.r}"
                + (f" s{s.stride}" if s.stride > 1 else "") + g)
    if s.kind == "transpose":
        return f"{name}\n{s.n}x{s.c}x{s.hw}\nk{s.k} {s.r}x{s.r}" + (
            f" s{s.stride}" if s.stride > 1 else "")
    n, c, h, _ = s.x_shape
    if s.kind == "box":
        return f"{name}\n{n}x{c}x{h}\nto {s.output_size}x{s.output_size}"
    return f"{name}\n{n}x{c}x{h}\n{s.kernel}x{s.kernel} s{s.stride}"


def _rate_and_errors(r, conv):
    """The rate at the median, and its error bar from the samples' interquartile range."""
    work = r.gflops * r.time if conv else r.gbps * r.time  # GFLOP or GB of one call
    rate = work / r.time
    if len(r.samples) < 2:
        return rate, (0.0, 0.0)
    q1, q3 = np.percentile(r.samples, [25, 75])
    return rate, (rate - work / q3, work / q1 - rate)


def plot(results, path, threads=None, meta=None):
    """Charts per (op, dtype): the rate (GFLOP/s for convolutions, GB/s for max-pool) of every
    method, auto and peer per shape, with interquartile error bars, and the speed-ups over the
    NumPy reference and over PyTorch; CPU and GPU side by side. Every method keeps its colour
    (`COLORS`) from chart to chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.time and r.device != "gpu+copy"]
    if not timed:
        raise SystemExit("--plot: nothing was timed")
    panels = list(dict.fromkeys((r.op, r.dtype) for r in timed))
    sides = [side for side, dev in (("CPU", "cpu"), ("GPU", "gpu"))
             if any(r.device == dev for r in timed)]
    kinds = ["rate", "x numpy"] + (["x torch"] if any(r.speedup_torch for r in timed) else [])
    metas = meta if isinstance(meta, list) else [meta] if meta else []
    machine = {"CPU": next((m["machine"] for m in metas if m.get("threads")), None),
               "GPU": next((m["gpu"] for m in metas if m.get("gpu") not in (None, "none")),
                           None)}
    cols = [(side, kind) for side in sides for kind in kinds]
    labels = list(dict.fromkeys(r.label.split("→")[0] for r in timed))
    fig, axes = plt.subplots(len(panels), len(cols), squeeze=False,
                             figsize=(6.5 * len(cols), 3.9 * len(panels)))
    for row, (op, dtype) in enumerate(panels):
        for col, (side, kind) in enumerate(cols):
            ax = axes[row][col]
            rs = [r for r in timed if (r.op, r.dtype) == (op, dtype)
                  and (r.device == "gpu") == (side == "GPU")]
            if kind != "rate":
                rs = [r for r in rs if r.kind != "peer" or (kind == "x torch"
                                                             and r.method == "numpy")]
            shapes = list(dict.fromkeys(r.shape for r in rs))
            meths = list(dict.fromkeys(r.label.split("→")[0] for r in rs))
            conv = op.startswith("conv")
            where = machine[side] or side
            if side == "CPU" and threads:
                where += f", {threads} threads"
            what = {"rate": "GFLOP/s" if conv else "GB/s",
                    "x numpy": "speed-up over NumPy im2col",
                    "x torch": "speed-up over PyTorch"}[kind]
            ax.set_title(f"{op} {dtype}: {what}\n{where}", fontsize=9)
            if not rs:
                ax.text(0.5, 0.5, "nothing timed", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            width = 0.8 / len(meths)
            for j, m in enumerate(meths):
                xs, ys, lo, hi = [], [], [], []
                for i, shape in enumerate(shapes):
                    r = next((r for r in rs if r.shape == shape
                              and r.label.split("→")[0] == m), None)
                    if r is None:
                        continue
                    if kind == "rate":
                        y, (e_lo, e_hi) = _rate_and_errors(r, conv)
                    else:
                        y = r.speedup_numpy if kind == "x numpy" else r.speedup_torch
                        e_lo = e_hi = 0.0
                    if not y:
                        continue
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(y)
                    lo.append(e_lo)
                    hi.append(e_hi)
                ax.bar(xs, ys, width, label=m, color=_color(m), yerr=[lo, hi],
                       error_kw=dict(lw=0.8, capsize=1.5, ecolor="#444444"))
            ax.set_yscale("log")
            if kind != "rate":
                ax.axhline(1.0, color="#444444", lw=0.8, ls="--")
            ax.set_ylabel(what if kind == "rate" else "x (higher is faster)", fontsize=8)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([_shape_label(x) for x in shapes], fontsize=7)
            ax.grid(axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_color(m)) for m in labels]
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 12), fontsize=8,
               bbox_to_anchor=(0.5, 1.0), frameon=False,
               title="fastconv bench (higher is better; error bars: interquartile range)",
               title_fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.9 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
