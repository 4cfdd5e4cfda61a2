"""The whole-net training steps behind `bench --nets`: every implementation trains the same net
to the same numbers, and the table reports them."""

import numpy as np
import pytest

from fastconv.bench import nets as _nets


@pytest.mark.parametrize("net", ["digits-quick", "cs231n-3layer"])
def test_every_implementation_trains_the_same_net(net):
    losses = {}
    for impl in ("fastconv", "numpy", "cython-im2col"):
        trainer = _nets.build(net, impl)
        losses[impl] = [trainer.step() for _ in range(4)]
    tol = 1e-4 if _nets.NETS[net].dtype == "float32" else 1e-10
    for impl, got in losses.items():
        np.testing.assert_allclose(got, losses["numpy"], rtol=tol, err_msg=impl)
    assert losses["numpy"][-1] != losses["numpy"][0]  # the updates happen


def test_torch_trains_the_same_net():
    pytest.importorskip("torch")
    want = [_nets.build("simpleconvnet", "numpy").step()]
    got = [_nets.build("simpleconvnet", "torch").step()]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # the first loss: same weights, same data


def test_reshape_pooling_is_cs231ns():
    x = np.random.default_rng(0).permutation(64).reshape(1, 1, 8, 8).astype(np.float64)
    pool = _nets.ReshapePooling(2, 2, 2)
    out = pool.forward(x)
    np.testing.assert_array_equal(out, x.reshape(1, 1, 4, 2, 4, 2).max(axis=(3, 5)))
    dx = pool.backward(np.ones_like(out))
    assert dx.sum() == 16 and set(np.unique(dx)) == {0.0, 1.0}
    np.testing.assert_array_equal(dx[x == np.repeat(np.repeat(out, 2, 2), 2, 3)], 1)


def test_the_table_reports_times_ratios_and_missing_peers():
    results = _nets.measure(["digits-quick"], impls=("fastconv", "numpy"), steps=3, warmup=1)
    assert [r.impl for r in results] == ["fastconv", "fastconv (1 thread)", "numpy"]
    for r in results:
        assert r.error is None and len(r.times) == 3 and r.median > 0
    text = _nets.format_table(results)
    assert "median of consecutive steps" in text and "interquartile" in text
    assert "no PyTorch rows: torch is not installed" in text
    assert "1.00x" in text  # numpy against itself
    bad = _nets.run_isolated("digits-quick", "no-such-impl", steps=1)
    assert "impl='no-such-impl'" in bad["error"]
