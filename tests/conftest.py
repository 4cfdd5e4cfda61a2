import os
import sys

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIM:  # the simulator runs each GPU thread as a Python thread: switch between them sooner
    sys.setswitchinterval(1e-4)


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests where no CUDA method can run, and `gpu` tests under the simulator."""
    from fastconv import _registry

    reason = _registry.cuda_missing() if any("cuda" in i.keywords for i in items) else None
    for item in items:
        if "cuda" in item.keywords and reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"CUDA: {reason}"))
        if "gpu" in item.keywords and SIM:
            item.add_marker(pytest.mark.skip(reason="needs a real GPU, not the simulator"))
