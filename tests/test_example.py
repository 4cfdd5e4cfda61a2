"""The end-to-end example: examples/train_digits.py trains a conv net on scikit-learn's digits."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
QUICK_TEST_ACCURACY = 0.90  # --quick (3 epochs at 16x16) reaches about 0.97


def _load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_training_reaches_stated_accuracy(tmp_path, capsys):
    pytest.importorskip("sklearn")
    example = _load_example()
    results = example.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    fast, ref = results["fastconv"], results["reference"]
    assert fast["test_acc"] >= QUICK_TEST_ACCURACY, printed
    assert len(fast["history"]) == 3 and fast["s_per_epoch"] > 0
    # the same net from the same start on the NumPy im2col layers: the same training to rounding
    assert abs(fast["test_acc"] - ref["test_acc"]) <= 0.02, printed
    np.testing.assert_allclose([h[1] for h in fast["history"]], [h[1] for h in ref["history"]],
                               rtol=1e-3)
    assert "test acc" in printed and "s/epoch" in printed

    if importlib.util.find_spec("matplotlib") is None:
        assert results["pngs"] == [] and "skipping the PNGs" in printed
    else:
        for name in ("filters.png", "feature_maps.png"):
            png = tmp_path / name
            assert str(png) in results["pngs"]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_layers_of_the_example_are_consistent():
    """The example's NumPy reference agrees with fastconv, so its timing compares like for like."""
    import fastconv as fc

    example = _load_example()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 9, 8))
    w, b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    ref = example.NumpyConvolution(w, b, stride=2, pad=1)
    out = ref.forward(x)
    np.testing.assert_allclose(out, fc.conv2d(x, w, b, stride=2, padding=1), rtol=1e-10)
    g = rng.standard_normal(out.shape)
    want = fc.conv2d_backward(g, x, w, stride=2, padding=1)
    for got, exp in zip((ref.backward(g), ref.dW, ref.db), want):
        np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-12)
    pool = example.NumpyPooling(2, 2, 2)
    xp = rng.permutation(3 * 2 * 8 * 8).reshape(3, 2, 8, 8).astype(np.float64)
    out, idx = fc.max_pool2d(xp, 2, return_indices=True)
    np.testing.assert_array_equal(pool.forward(xp), out)
    gp = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(pool.backward(gp), fc.max_pool2d_backward(gp, idx, xp.shape, 2))
