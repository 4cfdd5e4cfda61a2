import os
import sys

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIM:
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi

    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype):
        """The simulator's cuda.shared.array, made atomic.

        Numba's version finds a block's array by the calling line with a check-then-set that
        races between the block's Python threads: two threads can each get a fresh array and
        then read the other's writes as uninitialized memory (seen as flaky garbage results).
        """
        if shape == 0:
            return _orig_shared_array(self, shape, dtype)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1])[0:2]
        with _shared_lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = kernelapi.np.empty(shape, dtype)
        return res

    _orig_shared_array = kernelapi.FakeCUDAShared.array
    kernelapi.FakeCUDAShared.array = _shared_array


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests where no CUDA method can run, and `gpu` tests under the simulator."""
    from fastconv import _registry

    reason = _registry.cuda_missing() if any("cuda" in i.keywords for i in items) else None
    for item in items:
        if "cuda" in item.keywords and reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"CUDA: {reason}"))
        if "gpu" in item.keywords and SIM:
            item.add_marker(pytest.mark.skip(reason="needs a real GPU, not the simulator"))
