"""``python -m fastconv bench``: the options and what they run (argparse glue)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import _policy, _registry
from .report import (LEGEND, format_auto, format_markdown, format_text, load_results,
                     machine_summary, peer_notes, plot)
from . import runner
from .runner import auto_report, policy_entries, real_gpu, run, save_policy
from .suite import DEFAULT_OPS, OPS, PEERS, QUICK_SHAPES, SHAPES, Problem, select_shapes
from .timing import SLOW_CALL

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser):
    from . import nets  # on demand: `python -m fastconv.bench.nets` must not find it imported

    p.add_argument("--quick", action="store_true",
                   help=f"a few shapes ({', '.join(QUICK_SHAPES)}) and short timing: under a "
                        "minute")
    p.add_argument("--shapes", metavar="NAMES",
                   help="comma list of shape names or their beginnings, e.g. 'lenet-c1,vgg,pool2'"
                        " (default: the whole suite; see --list)")
    p.add_argument("--ops", metavar="OPS", default=",".join(DEFAULT_OPS),
                   help=f"comma list of {', '.join(OPS)} (default: all but the channels-last "
                        "-nhwc runs of the conv suite)")
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
                        "of " + ", ".join(nets.NETS))
    p.add_argument("--net-steps", type=int, default=20, metavar="N",
                   help="timed consecutive steps per net and implementation (default 20)")
    p.add_argument("--no-nets", action="store_true",
                   help="skip the short whole-net summary after the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list shapes and methods, then exit")


def _run_nets(args):
    from . import nets

    names = list(nets.NETS) if args.nets == "all" else _split(args.nets)
    unknown = set(names) - set(nets.NETS)
    if unknown:
        raise SystemExit(f"--nets: {', '.join(sorted(unknown))} not among "
                         f"{', '.join(nets.NETS)}")
    if args.threads:
        raise SystemExit("--nets compares the default thread count with one thread; "
                         "--threads does not apply")
    say = None if args.no_progress else (lambda what: print(f"  timing {what} ...",
                                                            file=sys.stderr))
    results = nets.measure(names, steps=args.net_steps, progress=say)
    print(nets.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": machine_summary(None), "nets": [r.as_dict() for r in results]},
                      f, indent=1)
    return 0


def _nets_summary(steps):
    """The book's SimpleConvNet, fastconv against its NumPy twin: the default run's last
    lines."""
    from . import nets

    results = nets.measure(["simpleconvnet"], impls=("fastconv", "numpy"), steps=steps,
                            warmup=2, one_thread=False)
    print()
    print(nets.format_table(results))
    print("(more nets, one thread against all, and PyTorch: python -m fastconv bench --nets)")


def _split(v):
    return [p.strip() for p in v.split(",") if p.strip()] if v else []


def _list():
    print("shapes (the benchmark suite; 'held-' shapes are the held-out set, kept out of the "
          "auto table and run with --shapes heldout):")
    for s in SHAPES.values():
        print(f"  {s.name:<20} {'conv' if s.kind == 'conv' else 'pool'}  {s.describe()}"
              + ("   (hidden, for tests)" if s.hidden else ""))
    print("ops: " + ", ".join(OPS))
    for op, (fc_op, _) in OPS.items():
        usable = [m for m in _registry.known(fc_op) if m in _registry.methods(fc_op)]
        print(f"methods for {op}: {', '.join(usable + ['auto'])}")
    print("peers: numpy, scipy (conv-fwd, small shapes), torch, torch-cuda (PyTorch "
          f"{'installed' if runner.has_torch() else 'not installed'})")


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
        why = f" ({_registry.cuda_missing()})" if args.device == "gpu" and not real_gpu() else ""
        raise SystemExit(f"nothing to time: no method or peer fits the options{why}")
    meta = machine_summary(threads)
    meta["seconds"] = round(elapsed, 1)
    status = _output(args, results, meta, threads)
    if not args.no_nets and args.markdown != "-" and args.device != "gpu":
        _nets_summary(5 if quick else 10)
    if args.save_policy is not None:
        path = args.save_policy or str(_policy.cache_dir() / "auto_table.json")
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
        print(LEGEND)
        print(format_text(results))
        for note in peer_notes(results):
            print(f"({note})")
        print()
        print(format_auto(report))
        took = "".join(f" in {m['seconds']:.0f} s" for m in metas[:1] if m.get("seconds"))
        print(f"({len(results)} runs{took if len(metas) == 1 else ''})")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(format_markdown(results, report, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [r.as_dict() for r in results],
                       "auto": report}, f, indent=1)
    if args.plot:
        plot(results, args.plot, threads, meta)
    failed = [r for r in results if r.ok is False]
    for r in failed:
        print(f"FAILED: {r.op} {r.shape} {r.dtype} {r.label} ({r.device}): "
              f"{r.note or f'max err {r.max_err:.2e}'}", file=sys.stderr)
    return 1 if failed else 0
