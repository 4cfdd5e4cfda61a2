"""conv2d and pooling on an NVIDIA GPU through Numba CUDA: cuda-naive, cuda-im2col, cuda-direct.

Inputs are already validated (see fastconv._validate). Host arrays arrive C-contiguous in
``spec.dtype``; they are copied to the device and the results copied back. Device arrays
(anything with ``__cuda_array_interface__``) are used where they are: a non-contiguous one is
copied once on the device, and the results stay on the device as Numba device arrays.

No part of ``numba.cuda`` is imported until a kernel is first needed, so the package imports on a
machine without a GPU or a CUDA toolkit. Only the core API is used (``cuda.jit``, ``cuda.grid``,
shared and local arrays, ``syncthreads``, ``atomic.add``, ``to_device``, ``device_array``; on a
GPU, results come from a pool of recycled blocks, see ``_memory``), so the same code runs on
Numba's built-in CUDA target, on the ``numba-cuda`` package and in the simulator
(``NUMBA_ENABLE_CUDASIM=1``).

Each sum runs in a fixed order and launch configurations depend only on the problem, not on the
GPU model, so results are deterministic, with one exception: cuda-direct's max-pool backward,
after its deterministic gather, adds with ``cuda.atomic.add`` the gradients whose index lies in
the plane but outside their own window (see ``pool``). max_pool2d never returns such indices; a
caller's may, and where several of them land on one pixel the order of those additions, and so
the last bits of that pixel, may vary. Kernels are compiled per problem geometry (kernel size,
stride, dilation and tile configuration are compile-time constants) on first use in a process.

Modules: ``_common`` (the binding of ``numba.cuda``, launch helpers, elementwise kernels),
``_memory`` and ``_devpool`` (device arrays, host/device copies, workspaces), ``naive``,
``im2col`` and ``direct`` (conv2d), ``pool`` (max, average and adaptive pools), ``arrays``
(permuted copies, bias and channel sums for the layout and conv_transpose2d adapters).
"""

from __future__ import annotations

from ._memory import empty_cache
from .direct import conv2d_backward_direct, conv2d_forward_direct
from .im2col import conv2d_backward_im2col, conv2d_forward_im2col
from .naive import conv2d_backward_naive, conv2d_forward_naive
from .pool import (avg_pool2d_backward, avg_pool2d_forward_direct, avg_pool2d_forward_naive,
                   max_pool2d_backward_direct, max_pool2d_backward_naive,
                   max_pool2d_forward_direct, max_pool2d_forward_naive)

__all__ = [
    "conv2d_forward_naive", "conv2d_backward_naive",
    "conv2d_forward_im2col", "conv2d_backward_im2col",
    "conv2d_forward_direct", "conv2d_backward_direct",
    "max_pool2d_forward_naive", "max_pool2d_backward_naive",
    "max_pool2d_forward_direct", "max_pool2d_backward_direct",
    "avg_pool2d_forward_naive", "avg_pool2d_forward_direct", "avg_pool2d_backward",
    "empty_cache",
]
