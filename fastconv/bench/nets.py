"""Whole training steps of small conv nets, as users train them in plain NumPy.

A step is forward, loss, backward and an Adam update of every parameter, with the net's own
NumPy layers (ReLU, affine, softmax) between the conv and pool calls, step after step with no
pause: what `python -m fastconv bench --nets` and ``benchmarks/test_bench_nets.py`` time.
Each net exists in several implementations of its conv and pool layers:

``fastconv``
    `fastconv.compat.dlfs.Convolution` and ``Pooling`` (``method="auto"``), the drop-in swap.
``numpy``
    The "Deep Learning from Scratch" layers: NumPy im2col (a strided copy per kernel tap), one
    ``np.dot``, col2im for the gradient, and pooling by argmax over im2col rows. The twin a
    user replaces.
``cython-im2col``
    CS231n's ``fast_layers`` way: a compiled (Cython, serial) im2col and col2im around
    ``np.dot``, and max-pool by reshaping when the windows tile the input.
``torch``
    The same net in PyTorch (``torch.nn`` layers, ``torch.optim.Adam``), on the CPU.

Every implementation starts from the same weights and data (random, seeded), so their losses
agree to rounding; `time_steps` times one implementation in this process, `run_isolated` in a
fresh process of its own (so that one library's threads never slow another's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

__all__ = ["NETS", "IMPLS", "Net", "build", "time_steps", "run_isolated"]


class Net(NamedTuple):
    """A net: batch, input shape (C, H, W), dtype and its layers, in order.

    Layers: ``("conv", K, R, stride, pad)``, ``("relu",)``, ``("pool", k, stride)``,
    ``("affine", out)``; the last affine gives the class scores.
    """

    batch: int
    input: tuple[int, int, int]
    dtype: str
    layers: tuple
    note: str

    @property
    def classes(self):
        return self.layers[-1][1]


NETS = {
    "simpleconvnet": Net(100, (1, 28, 28), "float64", (
        ("conv", 30, 5, 1, 0), ("relu",), ("pool", 2, 2), ("affine", 100), ("relu",),
        ("affine", 10)), "the book's SimpleConvNet, MNIST size"),
    "digits-quick": Net(50, (1, 16, 16), "float32", (
        ("conv", 30, 5, 1, 0), ("relu",), ("pool", 2, 2), ("affine", 100), ("relu",),
        ("affine", 10)), "examples/train_digits.py --quick"),
    "digits": Net(50, (1, 28, 28), "float32", (
        ("conv", 30, 5, 1, 0), ("relu",), ("pool", 2, 2), ("affine", 100), ("relu",),
        ("affine", 10)), "examples/train_digits.py"),
    "cs231n-3layer": Net(50, (3, 32, 32), "float32", (
        ("conv", 32, 7, 1, 3), ("relu",), ("pool", 2, 2), ("affine", 100), ("relu",),
        ("affine", 10)), "CS231n's ThreeLayerConvNet, CIFAR size"),
    "cifar-vgg": Net(64, (3, 32, 32), "float32", (
        ("conv", 32, 3, 1, 1), ("relu",), ("conv", 32, 3, 1, 1), ("relu",), ("pool", 2, 2),
        ("conv", 64, 3, 1, 1), ("relu",), ("conv", 64, 3, 1, 1), ("relu",), ("pool", 2, 2),
        ("affine", 10)), "VGG-style, CIFAR size"),
}

IMPLS = ("fastconv", "numpy", "cython-im2col", "torch")


# ---------------------------------------------------------------------------------------------
# the NumPy layers every NumPy implementation shares (the book's)


def out_size(size, k, stride, pad=0):
    """The book's output size: ``1 + (size + 2*pad - k) // stride``."""
    return (size + 2 * pad - k) // stride + 1


class Relu:
    def forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dx = dout.copy()
        dx[self.mask] = 0
        return dx


class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        return self.x @ self.W + self.b

    def backward(self, dout):
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return (dout @ self.W.T).reshape(self.shape)


class SoftmaxWithLoss:
    def forward(self, scores, labels):
        z = scores - scores.max(axis=1, keepdims=True)
        self.p = np.exp(z)
        self.p /= self.p.sum(axis=1, keepdims=True)
        self.labels = labels
        n = len(labels)
        return float(-np.mean(np.log(self.p[np.arange(n), labels] + 1e-7)))

    def backward(self):
        d = self.p.copy()
        d[np.arange(len(self.labels)), self.labels] -= 1
        return d / len(self.labels)


class Adam:
    """The book's Adam, updating the parameter arrays in place."""

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2, self.it = lr, beta1, beta2, 0
        self.m = self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.it += 1
        lr = self.lr * np.sqrt(1 - self.beta2 ** self.it) / (1 - self.beta1 ** self.it)
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m += (1 - self.beta1) * (g - m)
            v += (1 - self.beta2) * (g ** 2 - v)
            p -= (lr * m / (np.sqrt(v) + 1e-7)).astype(p.dtype)


# ---------------------------------------------------------------------------------------------
# conv and pool layers of the NumPy implementations


class NumpyConvolution:
    """The book's Convolution: im2col by strided copies, one np.dot, col2im."""

    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad

    def forward(self, x):
        from .peers import _columns

        k, _, fh, fw = self.W.shape
        n, _, h, w = x.shape
        s, p = self.stride, self.pad
        self.oh, self.ow = out_size(h, fh, s, p), out_size(w, fw, s, p)
        self.x_shape = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        self.col = _columns(xp, fh, fw, s, s, 1, 1, self.oh, self.ow)
        self.col_W = self.W.reshape(k, -1).T
        out = self.col @ self.col_W + self.b
        return out.reshape(n, self.oh, self.ow, k).transpose(0, 3, 1, 2)

    def backward(self, dout):
        from .peers import _uncolumns

        k, _, fh, fw = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, k)
        self.db = dout.sum(axis=0)
        self.dW = (self.col.T @ dout).transpose(1, 0).reshape(self.W.shape)
        dcol = dout @ self.col_W.T
        p, s = self.pad, self.stride
        return _uncolumns(dcol, self.x_shape, ((p, p), (p, p)), fh, fw, s, s, 1, 1, self.oh,
                          self.ow)


class NumpyPooling:
    """The book's Pooling: im2col rows of each window (zero padding, as its im2col), argmax,
    col2im of the routed gradient."""

    def __init__(self, pool_h, pool_w, stride=1, pad=0):
        self.ph, self.pw, self.stride, self.pad = pool_h, pool_w, stride, pad

    def forward(self, x):
        from .peers import _columns

        n, c, h, w = x.shape
        s, p = self.stride, self.pad
        self.oh, self.ow = out_size(h, self.ph, s, p), out_size(w, self.pw, s, p)
        self.x_shape = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        col = _columns(xp, self.ph, self.pw, s, s, 1, 1, self.oh, self.ow)
        col = col.reshape(-1, self.ph * self.pw)
        self.arg_max = np.argmax(col, axis=1)
        out = col[np.arange(len(col)), self.arg_max]
        return out.reshape(n, self.oh, self.ow, c).transpose(0, 3, 1, 2)

    def backward(self, dout):
        from .peers import _uncolumns

        dout = dout.transpose(0, 2, 3, 1)
        size = self.ph * self.pw
        dmax = np.zeros((dout.size, size), dout.dtype)
        dmax[np.arange(self.arg_max.size), self.arg_max] = dout.ravel()
        dcol = dmax.reshape(-1, self.x_shape[1] * size)
        s, p = self.stride, self.pad
        return _uncolumns(dcol, self.x_shape, ((p, p), (p, p)), self.ph, self.pw, s, s, 1, 1,
                          self.oh, self.ow)


class CythonIm2colConvolution:
    """CS231n's conv_forward_im2col / conv_backward_im2col: compiled im2col, np.dot, col2im."""

    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad

    def _geometry(self, shape):
        k, _, fh, fw = self.W.shape
        n, c, h, w = shape
        s, p = self.stride, self.pad
        oh, ow = out_size(h, fh, s, p), out_size(w, fw, s, p)
        return (n, c, h, w, 1, fh, fw, s, s, p, p, 1, 1, oh, ow, 1)

    def forward(self, x):
        from ..kernels import _im2col

        k = self.W.shape[0]
        self.geo = geo = self._geometry(x.shape)
        n, oh, ow = geo[0], geo[13], geo[14]
        self.x_shape = x.shape
        self.cols = np.empty((self.W[0].size, n * oh * ow), x.dtype)
        _im2col.im2col(np.ascontiguousarray(x), self.cols, geo)
        out = self.W.reshape(k, -1) @ self.cols + self.b.reshape(-1, 1)
        return out.reshape(k, n, oh, ow).transpose(1, 0, 2, 3)

    def backward(self, dout):
        from ..kernels import _im2col

        k = self.W.shape[0]
        self.db = dout.sum(axis=(0, 2, 3))
        d2 = dout.transpose(1, 0, 2, 3).reshape(k, -1)
        self.dW = (d2 @ self.cols.T).reshape(self.W.shape)
        dcols = self.W.reshape(k, -1).T @ d2
        dx = np.empty(self.x_shape, dout.dtype)
        _im2col.col2im(dcols, dx, self.geo)
        return dx


class ReshapePooling:
    """CS231n's max_pool_forward_reshape: windows that tile the input, by reshape and max."""

    def __init__(self, pool_h, pool_w, stride):
        assert pool_h == pool_w == stride, "the reshape method needs tiling windows"
        self.k = stride

    def forward(self, x):
        n, c, h, w = x.shape
        k = self.k
        self.x = x
        self.xr = x.reshape(n, c, h // k, k, w // k, k)
        self.out = self.xr.max(axis=3).max(axis=4)
        return self.out

    def backward(self, dout):
        mask = self.xr == self.out[:, :, :, None, :, None]
        dxr = np.where(mask, dout[:, :, :, None, :, None], 0)
        dxr = dxr / mask.sum(axis=(3, 5), keepdims=True)  # ties share, as CS231n
        return dxr.reshape(self.x.shape).astype(dout.dtype)


# ---------------------------------------------------------------------------------------------
# building and stepping


def init_params(net: Net, seed=0):
    """He-initialized weights for ``net``: a list of (W, b) per conv and affine layer."""
    rng = np.random.default_rng(seed)
    c, h, w = net.input
    params = []
    for layer in net.layers:
        if layer[0] == "conv":
            _, k, r, s, p = layer
            fan = c * r * r
            params.append((rng.standard_normal((k, c, r, r)) * np.sqrt(2 / fan),
                           np.zeros(k)))
            c, h, w = k, out_size(h, r, s, p), out_size(w, r, s, p)
        elif layer[0] == "pool":
            _, k, s = layer
            h, w = out_size(h, k, s), out_size(w, k, s)
        elif layer[0] == "affine":
            fan = c * h * w
            params.append((rng.standard_normal((fan, layer[1])) * np.sqrt(2 / fan),
                           np.zeros(layer[1])))
            c, h, w = layer[1], 1, 1
    return [(W.astype(net.dtype), b.astype(net.dtype)) for W, b in params]


def data(net: Net, seed=1):
    """A batch of image-like inputs and random labels.

    Pixels in [0, 1) that vary smoothly (a coarse random field, 4x4 blocks), with a zero
    background on one-channel nets, as the book's normalized MNIST. Not white noise: the ReLUs'
    masks would then be random, and NumPy's masked assignments, mispredicting every other
    branch, would be most of the step, which real images never make them.
    """
    rng = np.random.default_rng(seed)
    c, h, w = net.input
    coarse = rng.random((net.batch, c, -(-h // 4), -(-w // 4)))
    x = np.kron(coarse, np.ones((4, 4)))[:, :, :h, :w]
    if c == 1:
        x = np.where(x > 0.6, x, 0.0)
    return x.astype(net.dtype), rng.integers(0, net.classes, net.batch)


class _NumpyTrainer:
    """A net of NumPy layers with the given conv and pool classes, trained by Adam."""

    def __init__(self, net, conv, pool, seed=0):
        self.x, self.t = data(net)
        self.layers, self.params, self.owners = [], [], []
        it = iter(init_params(net, seed))
        for layer in net.layers:
            if layer[0] in ("conv", "affine"):
                W, b = next(it)
                obj = conv(W, b, *layer[3:]) if layer[0] == "conv" else Affine(W, b)
                self.params += [W, b]
                self.owners.append(obj)
            elif layer[0] == "relu":
                obj = Relu()
            else:
                obj = pool(layer[1], layer[1], layer[2])
            self.layers.append(obj)
        self.loss_layer = SoftmaxWithLoss()
        self.opt = Adam()

    def step(self):
        h = self.x
        for layer in self.layers:
            h = layer.forward(h)
        loss = self.loss_layer.forward(h, self.t)
        d = self.loss_layer.backward()
        for layer in reversed(self.layers):
            d = layer.backward(d)
        grads = [g for o in self.owners for g in (o.dW, o.db)]
        self.opt.update(self.params, grads)
        return loss


class _TorchTrainer:
    def __init__(self, net, seed=0):
        import torch

        dtype = getattr(torch, net.dtype)
        mods = []
        it = iter(init_params(net, seed))
        for layer in net.layers:
            if layer[0] == "conv":
                W, b = next(it)
                m = torch.nn.Conv2d(W.shape[1], W.shape[0], W.shape[2], layer[3], layer[4])
                m.weight.data, m.bias.data = torch.from_numpy(W.copy()), torch.from_numpy(b)
            elif layer[0] == "affine":
                W, b = next(it)
                mods.append(torch.nn.Flatten())
                m = torch.nn.Linear(*W.shape)
                m.weight.data, m.bias.data = torch.from_numpy(W.T.copy()), torch.from_numpy(b)
            elif layer[0] == "relu":
                m = torch.nn.ReLU()
            else:
                m = torch.nn.MaxPool2d(layer[1], layer[2])
            mods.append(m)
        self.model = torch.nn.Sequential(*mods).to(dtype)
        x, t = data(net)
        self.x, self.t = torch.from_numpy(x), torch.from_numpy(t)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, eps=1e-7)
        self.loss = torch.nn.CrossEntropyLoss()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.x), self.t)
        loss.backward()
        self.opt.step()
        return loss.item()


def build(name, impl, seed=0):
    """A trainer of net ``name`` in implementation ``impl``, with a ``step()`` method."""
    net = NETS[name]
    if impl == "fastconv":
        from ..compat.dlfs import Convolution, Pooling

        return _NumpyTrainer(net, Convolution, Pooling, seed)
    if impl == "numpy":
        return _NumpyTrainer(net, NumpyConvolution, NumpyPooling, seed)
    if impl == "cython-im2col":
        return _NumpyTrainer(net, CythonIm2colConvolution, ReshapePooling, seed)
    if impl == "torch":
        return _TorchTrainer(net, seed)
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def time_steps(name, impl, steps=20, warmup=3, threads=None):
    """Seconds of each of ``steps`` consecutive training steps (after ``warmup`` steps).

    ``threads``: fastconv's thread count for the run (torch's for ``impl="torch"``); None
    keeps the default. Returns (seconds, last loss).
    """
    if threads is not None:
        if impl == "torch":
            import torch

            torch.set_num_threads(threads)
        else:
            import fastconv

            fastconv.set_num_threads(threads)
    trainer = build(name, impl)
    for _ in range(warmup):
        loss = trainer.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = trainer.step()
        times.append(time.perf_counter() - t0)
    return np.array(times), loss


def run_isolated(name, impl, steps=20, warmup=3, threads=None, timeout=600):
    """`time_steps` in a fresh Python process: a dict with ``times`` (s), ``loss``, or
    ``error``."""
    args = json.dumps([name, impl, steps, warmup, threads])
    out = subprocess.run([sys.executable, "-m", "fastconv.bench.nets", args], capture_output=True,
                         text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def _worker(argv):
    name, impl, steps, warmup, threads = json.loads(argv[0])
    try:
        times, loss = time_steps(name, impl, steps, warmup, threads)
    except ImportError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 0
    print(json.dumps({"times": times.tolist(), "loss": loss}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------
# the table of `python -m fastconv bench --nets`


class NetResult(NamedTuple):
    net: str
    impl: str  # "fastconv", "fastconv (1 thread)", "numpy", ...
    times: tuple  # seconds per step
    loss: float | None
    error: str | None

    @property
    def median(self):
        return float(np.median(self.times)) if self.times else None

    def as_dict(self):
        return {"net": self.net, "impl": self.impl, "ms_per_step": self.median and 1e3 *
                self.median, "times": list(self.times), "loss": self.loss, "error": self.error}


def measure(nets=None, impls=IMPLS, steps=20, warmup=3, one_thread=True, progress=None):
    """Time every (net, implementation) in its own process; a list of `NetResult`.

    With ``one_thread``, fastconv also runs at one thread ("fastconv (1 thread)"), so that the
    default can be compared with the best of one thread and all.
    """
    out = []
    for name in nets or NETS:
        runs = [(impl, None) for impl in impls]
        if one_thread and "fastconv" in impls:
            runs.insert(1, ("fastconv", 1))
        for impl, threads in runs:
            label = impl if threads is None else f"{impl} (1 thread)"
            if progress:
                progress(f"{name} {label}")
            r = run_isolated(name, impl, steps, warmup, threads)
            out.append(NetResult(name, label, tuple(r.get("times", ())), r.get("loss"),
                                 r.get("error")))
    return out


def format_table(results):
    """The text table: median ms per step with the interquartile range, and the ratios."""
    lines = ["whole training steps: forward, loss, backward and Adam update, with the net's own "
             "NumPy layers between; ms/step is the median of consecutive steps [interquartile "
             "range]; each implementation in its own process; 'x numpy' (the book's NumPy "
             "layers), 'x cython' (CS231n's Cython im2col + np.dot) and 'x torch' are that "
             "peer's time over this row's (higher is faster)",
             f"{'net':<15} {'implementation':<22} {'ms/step':>9} {'IQR':>15} {'x numpy':>8} "
             f"{'x cython':>8} {'x torch':>8}"]
    by = {(r.net, r.impl): r for r in results}
    for r in results:
        if r.error:
            lines.append(f"{r.net:<15} {r.impl:<22} {'-':>9}   ({r.error})")
            continue
        q1, q3 = np.percentile(r.times, [25, 75]) * 1e3
        cols = []
        for peer in ("numpy", "cython-im2col", "torch"):
            p = by.get((r.net, peer))
            cols.append(f"{p.median / r.median:.2f}x" if p and p.median else "-")
        lines.append(f"{r.net:<15} {r.impl:<22} {1e3 * r.median:>9.2f} "
                     f"{f'[{q1:.2f}, {q3:.2f}]':>15} {cols[0]:>8} {cols[1]:>8} {cols[2]:>8}")
    if not any(r.impl == "torch" and not r.error for r in results):
        lines.append("(no PyTorch rows: torch is not installed; `pip install torch` adds them)")
    return "\n".join(lines)
