"""When does a second thread pay? Pools and small convs, one thread against all, by size.

The crossovers set fastconv.kernels._parallel.MIN_PARALLEL_NS and its work estimates:

    python tools/thread_sweep.py
"""
import numpy as np

import fastconv as fc
from fastconv.bench import measure
from fastconv.kernels import _parallel


def med(f):
    """Median milliseconds of ``f()`` (fastconv.bench's timing: warm-up, GC off)."""
    return 1e3 * measure(f, repeat=21)[0]


rng = np.random.default_rng(0)
print("pool 2x2 fwd+idx, f32 (N,32,24,24); im2col / direct")
for N in (4, 8, 16, 32, 64, 128):
    x=rng.random((N,32,24,24)).astype(np.float32)
    row=[]
    for m in ("im2col","direct"):
        for n in (1,2):
            _parallel.count=n; row.append(med(lambda: fc.max_pool2d(x,2,return_indices=True,method=m)))
    y,i=fc.max_pool2d(x,2,return_indices=True); g=np.ones_like(y)
    for m in ("im2col","direct"):
        for n in (1,2):
            _parallel.count=n; row.append(med(lambda: fc.max_pool2d_backward(g,i,x.shape,2,method=m)))
    print(N, " ".join(f"{v:.3f}" for v in row))
print("conv 3x3 pad1 fwd f32 (N,16,16,16)x16: im2col t1 t2, direct t1 t2 ; bwd same")
for N in (1, 2, 4, 8, 16, 32):
    x=rng.random((N,16,16,16)).astype(np.float32); w=rng.random((16,16,3,3)).astype(np.float32); g=rng.random((N,16,16,16)).astype(np.float32)
    row=[]
    for m in ("im2col","direct"):
        for n in (1,2):
            _parallel.count=n; row.append(med(lambda: fc.conv2d(x,w,padding=1,method=m)))
    for m in ("im2col","direct"):
        for n in (1,2):
            _parallel.count=n; row.append(med(lambda: fc.conv2d_backward(g,x,w,padding=1,method=m)))
    sp=fc._validate.conv2d(x,w,None,1,1,1,1)[3]
    print(N, f"flops {sp.flops/1e6:.1f}M", " ".join(f"{v:.3f}" for v in row))
