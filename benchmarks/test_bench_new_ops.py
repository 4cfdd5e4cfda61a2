"""The second round's operations (issue 14): global average pooling on the ResNet and
MobileNet shapes, a decoder's 2x2 stride-2 transposed convolution, and the conv suite in
channels-last layout (PyTorch in its channels_last memory format). Every method usable here,
auto and the peers; run with ``pytest --benchmark-only``. See benchsuite.py for the timing."""

import pytest

from benchsuite import cases, run


OPS = ("gap-fwd", "gap-bwd", "convT-fwd", "convT-bwd", "conv-fwd-nhwc", "conv-bwd-nhwc")


@pytest.mark.parametrize("op,shape,dtype,entry", [
    pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}") for op in OPS for p in cases(op)])
def test_new_ops(benchmark, op, shape, dtype, entry):
    run(benchmark, op, shape, dtype, entry)
