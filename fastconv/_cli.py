"""The command line: ``python -m fastconv bench`` and ``python -m fastconv info``."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _parser():
    from .bench import cli

    from ._version import __version__

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    p = argparse.ArgumentParser(
        prog="python -m fastconv" if script in ("", "__main__.py", "-c") else script,
        description="fastconv: fast conv2d and max-pool kernels for NumPy nets.")
    p.add_argument("--version", action="version", version=f"fastconv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{bench,info}")
    b = sub.add_parser(
        "bench", help="time every usable method and peer on the shape suite (the main job)",
        description="Time every usable fastconv method (CPU and GPU), method='auto' and the "
                    "peers (NumPy im2col reference, scipy.signal, PyTorch) on the shape suite; "
                    "check each result against the reference; print one table.")
    cli.add_arguments(b)
    i = sub.add_parser("info", help="versions, compiled core, threads, BLAS, GPU, methods",
                       description="What fastconv can use on this machine, and why not.")
    i.add_argument("--json", action="store_true", help="print the same as JSON")
    return p


def main(argv=None) -> int:
    """Entry point of ``python -m fastconv`` and the ``fastconv`` script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import cli

        return cli.main(args)
    if args.command == "info":
        from . import _info

        info = _info.collect()
        if args.json:
            import json

            print(json.dumps(info, indent=1))
        else:
            print(_info.format_info(info))
        return 0
    parser.print_help()
    return 2
