"""conv2d forward and backward: every method usable here, auto and the peers, per shape.

Run with ``pytest --benchmark-only`` (or ``pytest benchmarks --benchmark-only -k lenet`` for
one shape); plain ``pytest`` skips them. One group per (op, shape, dtype). See benchsuite.py
for how the timing is done.
"""

import pytest

from benchsuite import cases, run


@pytest.mark.parametrize("shape,dtype,entry", cases("conv-fwd"))
def test_conv2d_forward(benchmark, shape, dtype, entry):
    run(benchmark, "conv-fwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("conv-bwd"))
def test_conv2d_backward(benchmark, shape, dtype, entry):
    run(benchmark, "conv-bwd", shape, dtype, entry)
