"""Recycled device memory for the CUDA methods' results, copies and scratch arrays.

Measured on the H100 host (benchmarks/RESULTS.md): one ``cuMemAlloc`` costs about 50 µs and
its free about as much, several times what the kernels of a small convolution or max-pool take.
PyTorch avoids both with a caching allocator; fastconv does the same for the arrays it makes.
A block goes back to its free list when the last array using it (views included) is gone, and
serves the next request of the same rounded size in the same CUDA context. A training loop
asks for the same sizes every step, so after the first step no call allocates.

Idle blocks are kept up to ``FASTCONV_CUDA_POOL_MB`` MiB (default 1024; 0 turns the pool off);
a block freed beyond that goes back to the driver. `empty_cache` frees every idle block.

Recycling is safe because fastconv launches every kernel on the legacy default stream: the
next kernel to write a recycled block runs after every earlier kernel that may still read it.
With per-thread default streams (``NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM=1``) that ordering is
gone, so the pool is off. A caller who also reads a result on a non-blocking stream of its
own (a PyTorch side stream, say) must synchronize that stream before dropping the result, as
with PyTorch's allocator.

This module holds the bookkeeping only (no CUDA import), so it is tested without a GPU; the
Numba glue is ``fastconv.kernels.cuda._memory._empty``.
"""

from __future__ import annotations

import os
import threading

__all__ = ["BlockPool", "rounded", "limit_from_env"]

_SMALL, _SMALL_STEP, _LARGE_STEP = 2**20, 512, 2**17


def rounded(nbytes: int) -> int:
    """The block size serving ``nbytes``: 512-byte steps up to 1 MiB, 128 KiB steps above,
    so that nearby sizes share blocks while little memory is wasted."""
    step = _SMALL_STEP if nbytes <= _SMALL else _LARGE_STEP
    return max(step, -(-nbytes // step) * step)


def limit_from_env() -> int:
    """Idle bytes the pool may keep, from ``FASTCONV_CUDA_POOL_MB`` (default 1024 MiB)."""
    raw = os.environ.get("FASTCONV_CUDA_POOL_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"FASTCONV_CUDA_POOL_MB must be a number of MiB, got {raw!r}") from None
    return max(0, int(mb * 2**20))


class BlockPool:
    """Free lists of device blocks by (context, size), holding at most ``limit`` idle bytes.

    A block is any object that keeps its memory allocated while referenced; dropping the last
    reference frees it (the driver's job, not the pool's)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.idle = 0  # bytes in the free lists
        self.hits = self.misses = 0
        self._free: dict[tuple, list] = {}
        # re-entrant: a release can run from the garbage collector inside take()
        self._lock = threading.RLock()

    def take(self, context, size):
        """An idle block of ``size`` bytes for ``context``, or None (then allocate one)."""
        with self._lock:
            blocks = self._free.get((context, size))
            if blocks:
                self.idle -= size
                self.hits += 1
                return blocks.pop()
            self.misses += 1
            return None

    def give(self, context, size, block) -> bool:
        """Return a block no array uses any more; False if it was dropped (over the limit)."""
        with self._lock:
            if self.idle + size > self.limit:
                return False
            self._free.setdefault((context, size), []).append(block)
            self.idle += size
            return True

    def clear(self):
        """Drop every idle block (their memory goes back to the driver)."""
        with self._lock:
            self._free.clear()
            self.idle = 0
