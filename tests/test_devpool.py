"""The bookkeeping of the CUDA methods' device-memory pool (no GPU needed); the pool on real
device arrays is tested in test_cuda.py (gpu marker)."""

import os

import numpy as np
import pytest

from fastconv.kernels.cuda import _devpool


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


# ---------------------------------------------------------------------------------------------
# the Numba glue (fastconv.kernels.cuda._memory._empty) on a fake context: no driver call is made


class _FakeContext:
    """Hands out fake device pointers; counts allocations; can fail like a full device."""

    def __init__(self):
        import ctypes

        from numba.cuda.cudadrv import driver

        self.handle = ctypes.c_void_p(0xC0)
        self.allocs, self.fail_next, self._next = 0, False, 0x100000
        self._driver, self._ctypes = driver, ctypes

    def memalloc(self, size):
        if self.fail_next:
            self.fail_next = False
            raise MemoryError("out of memory (fake)")
        self.allocs += 1
        ptr = self._ctypes.c_void_p(self._next)
        self._next += 1 << 24
        return self._driver.MemoryPointer(self, ptr, size)  # stands in for an OwnedPointer


@pytest.fixture
def fake_gpu(monkeypatch):
    import gc

    try:
        from numba import cuda as numba_cuda
        from numba.cuda.cudadrv import driver
    except ImportError as e:
        pytest.skip(f"numba.cuda internals not importable: {e}")
    if getattr(driver, "USE_NV_BINDING", False) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the fake context speaks the ctypes binding, outside the simulator")
    from fastconv.kernels.cuda import _memory as kc

    ctx = _FakeContext()
    monkeypatch.setattr(kc, "cuda", numba_cuda)
    monkeypatch.setattr(numba_cuda, "current_context", lambda: ctx)
    monkeypatch.setattr(kc, "_pool", _devpool.BlockPool(limit=2048))
    yield kc, ctx
    gc.collect()
    kc._live.clear()


def _addr(d):
    return d.gpu_data.device_pointer.value


def test_pooled_arrays_have_their_own_size_and_strides(fake_gpu):
    kc, ctx = fake_gpu
    a = kc._empty((3,), np.float32)
    assert (a.shape, a.strides, a.dtype, a.alloc_size) == ((3,), (4,), np.float32, 12)
    b = kc._empty((2, 3, 4), np.float64)
    assert b.strides == (96, 32, 8) and b.alloc_size == 192 and ctx.allocs == 2


def test_a_block_is_reused_only_after_its_last_view_is_gone(fake_gpu):
    import gc

    kc, ctx = fake_gpu
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    a = kc._empty((100,), np.float32)
    first = _addr(a)
    # a[10:20] as Numba makes it (slicing itself wants a live context)
    view = DeviceNDArray((10,), (4,), np.float32, gpu_data=a.gpu_data.view(40, 80))
    del a
    gc.collect()
    b = kc._empty((100,), np.float32)  # the view still holds the first block
    assert _addr(b) != first and ctx.allocs == 2
    del view
    gc.collect()
    assert kc._pool.idle == 512
    c = kc._empty((110,), np.float32)  # same rounded size: the freed block, no allocation
    assert _addr(c) == first and ctx.allocs == 2 and c.alloc_size == 440
    del b, c
    gc.collect()
    assert kc._pool.idle == 1024


def test_a_full_device_frees_the_idle_blocks_and_retries(fake_gpu):
    import gc

    kc, ctx = fake_gpu
    a = kc._empty((100,), np.float32)
    del a
    gc.collect()
    assert kc._pool.idle == 512
    ctx.fail_next = True
    d = kc._empty((1000,), np.float32)  # another size: must allocate, fails once, then works
    assert d.alloc_size == 4000 and kc._pool.idle == 0
    ctx.fail_next = True
    with pytest.raises(MemoryError):  # nothing idle to free: the error stands
        kc._empty((1000,), np.float32)
