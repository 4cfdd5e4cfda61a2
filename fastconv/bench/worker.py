"""PyTorch in a process of its own (``python -m fastconv.bench.worker``), so that its OpenMP
threads cannot slow fastconv down, nor the reverse."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from .suite import SHAPES, Problem, peer_call
from .timing import measure

__all__ = ["TorchWorker"]


class TorchWorker:
    """PyTorch in its own process, so that its OpenMP threads cannot slow fastconv down (nor
    the reverse). Started on first use; it rebuilds each problem's inputs from the seeds."""

    def __init__(self, threads=None):
        self.threads = threads
        self.proc = None
        self.broken = None

    def _start(self):
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastconv.bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def run(self, problem, device, timing):
        """(status, median, samples, outputs): status is "ok", "skip" or "error"."""
        if self.broken:
            return "error", None, [], self.broken
        if self.proc is None:
            self._start()
        job = dict(op=problem.op, shape=problem.shape.name, dtype=str(problem.dtype),
                   device=device, timing=timing, threads=self.threads)
        try:
            pickle.dump(job, self.proc.stdin)
            self.proc.stdin.flush()
            return pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            self.broken = f"the PyTorch worker died ({type(e).__name__})"
            return "error", None, [], self.broken

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
            self.proc = None


def _worker_main():
    """The loop of the PyTorch worker: read jobs from stdin, answer on stdout (pickle)."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    inp = sys.stdin.buffer
    import torch

    threads_set = False
    while True:
        try:
            job = pickle.load(inp)
        except EOFError:
            return 0
        try:
            if job["threads"] and not threads_set:
                torch.set_num_threads(job["threads"])
                threads_set = True
            problem = Problem(job["op"], SHAPES[job["shape"]], job["dtype"])
            if job["device"] == "cuda" and not torch.cuda.is_available():
                answer = ("skip", None, [], "this PyTorch has no CUDA")
            else:
                peer = "torch-cuda" if job["device"] == "cuda" else "torch"
                call, finish = peer_call(problem, peer)
                med, samples, res = measure(call, **job["timing"])
                answer = ("ok", med, samples, finish(res))
        except Exception as e:  # report, keep serving
            answer = ("error", None, [], f"{type(e).__name__}: {e}")
        pickle.dump(answer, out)
        out.flush()


if __name__ == "__main__":
    sys.exit(_worker_main())
