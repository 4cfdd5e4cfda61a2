"""The bookkeeping of the CUDA methods' device-memory pool (no GPU needed); the pool on real
device arrays is tested in test_cuda.py (gpu marker)."""

import pytest

from fastconv.kernels import _devpool


def test_sizes_round_to_small_and_large_steps():
    r = _devpool.rounded
    assert [r(0), r(1), r(512), r(513)] == [512, 512, 512, 1024]
    assert r(2**20) == 2**20 and r(2**20 + 1) == 2**20 + 2**17
    assert all(r(n) >= n for n in (1, 999, 2**20 - 1, 3 * 2**20 + 5, 10**9))


def test_blocks_come_back_by_context_and_size():
    pool = _devpool.BlockPool(limit=4096)
    assert pool.take("ctx", 1024) is None and pool.misses == 1
    a, b = object(), object()
    assert pool.give("ctx", 1024, a) and pool.give("ctx", 1024, b)
    assert pool.idle == 2048
    assert pool.take("ctx", 512) is None  # another size
    assert pool.take("other", 1024) is None  # another context
    got = {id(pool.take("ctx", 1024)), id(pool.take("ctx", 1024))}
    assert got == {id(a), id(b)} and pool.hits == 2 and pool.idle == 0
    assert pool.take("ctx", 1024) is None


def test_idle_bytes_stay_under_the_limit_and_clear_drops_them():
    pool = _devpool.BlockPool(limit=2048)
    assert pool.give("c", 1536, object())
    assert not pool.give("c", 1024, object())  # would exceed: dropped, freed by the driver
    assert pool.idle == 1536
    assert pool.give("c", 512, object()) and pool.idle == 2048
    pool.clear()
    assert pool.idle == 0 and pool.take("c", 1536) is None


def test_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTCONV_CUDA_POOL_MB", raising=False)
    assert _devpool.limit_from_env() == 1024 * 2**20
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "1.5")
    assert _devpool.limit_from_env() == 3 * 2**19
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "0")
    assert _devpool.limit_from_env() == 0
    monkeypatch.setenv("FASTCONV_CUDA_POOL_MB", "lots")
    with pytest.raises(ValueError, match="FASTCONV_CUDA_POOL_MB must be a number"):
        _devpool.limit_from_env()
