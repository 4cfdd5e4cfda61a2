"""Whole training steps of small nets (fastconv._nets): forward, loss, backward and the Adam
update, with the net's own NumPy layers between, consecutive steps with no pause.

Run with ``pytest benchmarks --benchmark-only``; plain ``pytest`` skips them. One group per
net; the implementations are fastconv's layers, the book's NumPy layers, CS231n's Cython
im2col + np.dot, and PyTorch when installed. ``python -m fastconv bench --nets`` times the
same steps with each implementation in its own process (the numbers RESULTS.md quotes).
"""

import importlib.util

import pytest

from fastconv.bench import nets as _nets

STEPS = 20


@pytest.mark.parametrize("impl", _nets.IMPLS)
@pytest.mark.parametrize("net", list(_nets.NETS))
def test_training_step(benchmark, net, impl):
    if impl == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    trainer = _nets.build(net, impl)
    for _ in range(3):  # compile, choose methods, touch the buffers
        trainer.step()
    benchmark.group = f"net-{net}"
    benchmark.extra_info.update(net=net, impl=impl, note=_nets.NETS[net].note)
    benchmark.pedantic(trainer.step, rounds=STEPS, iterations=1)
