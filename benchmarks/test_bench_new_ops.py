"""The second round's operations (issue 14): global average pooling on the ResNet and
MobileNet shapes, a decoder's 2x2 stride-2 transposed convolution, and the conv suite in
channels-last layout (PyTorch in its channels_last memory format). Every method usable here,
auto and the peers; run with ``pytest --benchmark-only``. See benchsuite.py for the timing."""

import pytest

from benchsuite import cases, run


@pytest.mark.parametrize("shape,dtype,entry", cases("gap-fwd"))
def test_global_avg_pool_forward(benchmark, shape, dtype, entry):
    run(benchmark, "gap-fwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("gap-bwd"))
def test_global_avg_pool_backward(benchmark, shape, dtype, entry):
    run(benchmark, "gap-bwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("convT-fwd"))
def test_conv_transpose2d_forward(benchmark, shape, dtype, entry):
    run(benchmark, "convT-fwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("convT-bwd"))
def test_conv_transpose2d_backward(benchmark, shape, dtype, entry):
    run(benchmark, "convT-bwd", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("conv-fwd-nhwc"))
def test_conv2d_forward_nhwc(benchmark, shape, dtype, entry):
    run(benchmark, "conv-fwd-nhwc", shape, dtype, entry)


@pytest.mark.parametrize("shape,dtype,entry", cases("conv-bwd-nhwc"))
def test_conv2d_backward_nhwc(benchmark, shape, dtype, entry):
    run(benchmark, "conv-bwd-nhwc", shape, dtype, entry)
