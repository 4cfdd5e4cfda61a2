"""Output: the text table, Markdown, the chart, the auto check, and saved runs read back."""

from __future__ import annotations

import datetime
import json
import math
import shlex
import sys

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
