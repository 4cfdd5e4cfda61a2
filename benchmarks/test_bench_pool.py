"""max-pool forward (with indices) and backward: every method usable here, auto and the peers.

Run with ``pytest --benchmark-only``; plain ``pytest`` skips them. One group per (op, shape,
dtype). See benchsuite.py for how the timing is done.
"""

import pytest

from benchsuite import cases, run


@pytest.mark.parametrize("shape,dtype,entry", cases("pool-fwd"))
def test_max_pool2d_forward(benchmark, shape, dtype, entry):
    run(benchmark, "pool-fwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("pool-bwd"))
def test_max_pool2d_backward(benchmark, shape, dtype, entry):
    run(benchmark, "pool-bwd", shape, dtype, entry)
