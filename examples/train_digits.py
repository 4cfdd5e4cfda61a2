"""Train a LeNet-style conv net on scikit-learn's digits with fastconv layers, end to end.

The net has the shape of the "Deep Learning from Scratch" ``SimpleConvNet``:

    conv 30 x 5x5 -> relu -> max-pool 2x2 -> affine 100 -> relu -> affine 10 -> softmax

built from ``fastconv.Conv2D`` and ``fastconv.MaxPool2D``. The data are the 1797 8x8 handwritten
digits bundled with scikit-learn (no download), upscaled to ``--size`` pixels (28 by default, the
MNIST size the net was drawn for). The same net, from the same initial weights and the same batch
order, is then trained on the book's NumPy im2col layers (fastconv.bench.nets), and the script reports the
test accuracy and the training time per epoch of both. Finally it draws the learned first-layer
filters and the feature maps of one test image into ``--out`` (PNG, with matplotlib).

    python examples/train_digits.py                 # 10 epochs at 28x28, then the reference
    python examples/train_digits.py --quick         # 3 epochs at 16x16: a few seconds
    python examples/train_digits.py --method naive --no-reference --out /tmp/digits

Needs scikit-learn; matplotlib for the pictures (skipped with a message without it); tqdm for a
nicer progress bar (a plain one is used without it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import fastconv as fc  # before NumPy (README, "Threads")
import numpy as np
from fastconv.bench.nets import Adam as _ListAdam
from fastconv.bench.nets import Affine, NumpyConvolution, NumpyPooling, Relu, SoftmaxWithLoss

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------------------------------
# data


def load_data(size, seed=0, test_fraction=0.2):
    """Digits as (N, 1, size, size) arrays in [0, 1], split into train and test sets."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    if size != images.shape[1]:
        zoom = size / images.shape[1]
        images = np.clip(ndimage.zoom(images, (1, zoom, zoom), order=1), 0.0, 1.0)
    x, y = images[:, None], digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------------------------------------
# the layers: the book's NumPy layers (ReLU, affine, softmax with loss; and, for the reference
# net, its im2col Convolution and Pooling) from fastconv.bench.nets, their one home


# ---------------------------------------------------------------------------------------------
# the net and its training


class ConvNet:
    """conv -> relu -> pool -> affine -> relu -> affine, with softmax cross-entropy on top."""

    def __init__(self, params, conv, pool):
        self.params = params
        self.layers = [
            conv(params["W1"], params["b1"]), Relu(), pool(2, 2, 2),
            Affine(params["W2"], params["b2"]), Relu(),
            Affine(params["W3"], params["b3"]),
        ]
        self.loss_layer = SoftmaxWithLoss()
        self.owners = {"1": self.layers[0], "2": self.layers[3], "3": self.layers[5]}

    def predict(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x, labels):
        self.scores = self.predict(x)
        return self.loss_layer.forward(self.scores, labels)

    def gradients(self):
        d = self.loss_layer.backward()
        for layer in reversed(self.layers):
            d = layer.backward(d)
        grads = {}
        for key, layer in self.owners.items():
            grads["W" + key], grads["b" + key] = layer.dW, layer.db
        return grads

    def accuracy(self, x, labels, batch=200):
        hits = sum(int(np.sum(self.predict(x[i:i + batch]).argmax(axis=1) == labels[i:i + batch]))
                   for i in range(0, len(x), batch))
        return hits / len(x)


def init_params(size, dtype, seed, filters=30, kernel=5, hidden=100, classes=10):
    """He-initialized parameters of the SimpleConvNet shape for (1, size, size) input."""
    rng = np.random.default_rng(seed)
    pooled = (size - kernel + 1) // 2
    flat = filters * pooled * pooled

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)

    return {
        "W1": he((filters, 1, kernel, kernel), kernel * kernel), "b1": np.zeros(filters, dtype),
        "W2": he((flat, hidden), flat), "b2": np.zeros(hidden, dtype),
        "W3": he((hidden, classes), hidden), "b3": np.zeros(classes, dtype),
    }


class Adam(_ListAdam):
    """The book's Adam on a dict of parameters (updated in place)."""

    def update(self, params, grads):
        super().update(list(params.values()), [grads[k] for k in params])


class PlainBar:
    """A minimal stand-in for tqdm: redraws in place on a terminal, one line per epoch otherwise."""

    def __init__(self, total, desc, file=sys.stderr, width=24):
        self.total, self.desc, self.file, self.width = total, desc, file, width
        self.n, self.postfix, self.tty = 0, "", file.isatty()

    def update(self, k=1):
        self.n += k
        if self.tty:
            self._draw("\r")

    def set_postfix_str(self, s):
        self.postfix = s

    def _draw(self, lead):
        done = self.width * self.n // max(self.total, 1)
        bar = "#" * done + "-" * (self.width - done)
        self.file.write(f"{lead}{self.desc} [{bar}] {self.n}/{self.total} {self.postfix}")
        self.file.flush()

    def close(self):
        self._draw("\r" if self.tty else "")
        self.file.write("\n")
        self.file.flush()


def progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainBar(total, desc)
    return tqdm(total=total, desc=desc, leave=True)


def train(net, data, epochs, batch_size, lr, seed, label):
    """Mini-batch Adam; returns per-epoch (seconds, train loss, test accuracy)."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    opt = Adam(lr)
    n_batches = -(-len(x_train) // batch_size)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        bar = progress(n_batches, f"{label} epoch {epoch}/{epochs}")
        loss_sum = hits = seen = 0
        elapsed = 0.0
        for i in range(n_batches):
            sel = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x_train[sel], y_train[sel]
            t0 = time.perf_counter()
            loss = net.loss(xb, yb)
            opt.update(net.params, net.gradients())
            elapsed += time.perf_counter() - t0
            loss_sum += loss * len(sel)
            hits += int(np.sum(net.scores.argmax(axis=1) == yb))
            seen += len(sel)
            bar.set_postfix_str(f"loss {loss_sum / seen:.4f} acc {hits / seen:.3f}")
            bar.update()
        test_acc = net.accuracy(x_test, y_test)
        bar.set_postfix_str(f"loss {loss_sum / seen:.4f} acc {hits / seen:.3f} "
                            f"test acc {test_acc:.3f} ({elapsed:.2f} s)")
        bar.close()
        history.append((elapsed, loss_sum / seen, test_acc))
    return history


# ---------------------------------------------------------------------------------------------
# pictures


def save_pictures(net, image, out_dir):
    """PNGs of the first-layer filters and of their feature maps on ``image``; their paths."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the PNGs (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = net.layers[0]
    filters = np.asarray(conv.W)[:, 0]
    maps = np.maximum(conv.forward(image[None]), 0)[0]

    def grid(planes, title, path, first=None):
        count = len(planes) + (first is not None)
        cols = min(count, 8)
        rows = -(-count // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4))
        axes = np.atleast_1d(axes).ravel()
        tiles = ([("input", first)] if first is not None else []) + [
            (str(i), p) for i, p in enumerate(planes)]
        for ax, (name, tile) in zip(axes, tiles):
            ax.imshow(tile, cmap="gray", interpolation="nearest")
            ax.set_title(name, fontsize=7)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    return [
        grid(filters, "first-layer filters", out_dir / "filters.png"),
        grid(maps, "feature maps (after relu) of one test image", out_dir / "feature_maps.png",
             first=image[0]),
    ]


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10; 3 with --quick)")
    p.add_argument("--size", type=int, default=None,
                   help="image size after upscaling (default 28; 16 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short run: 3 epochs at 16x16")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--method", default="auto", help="fastconv method (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true",
                   help="skip training the NumPy im2col reference net")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the PNGs")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 10
    if args.size is None:
        args.size = 16 if args.quick else 28
    return args


def main(argv=None):
    """Run the example; returns a dict of results (accuracies, seconds per epoch, PNG paths)."""
    args = parse_args(argv)
    dtype = np.dtype(args.dtype)
    x_train, y_train, x_test, y_test = load_data(args.size, args.seed)
    data = (x_train.astype(dtype), y_train, x_test.astype(dtype), y_test)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images of 1x{args.size}x{args.size}"
          f", {args.dtype}; fastconv methods here: {', '.join(fc.methods('conv2d'))}")

    def fastconv_net():
        return ConvNet(init_params(args.size, dtype, args.seed),
                       conv=lambda W, b: fc.Conv2D(W, b, method=args.method),
                       pool=lambda ph, pw, s: fc.MaxPool2D((ph, pw), s, method=args.method))

    def reference_net():
        return ConvNet(init_params(args.size, dtype, args.seed), conv=NumpyConvolution,
                       pool=NumpyPooling)

    runs = [("fastconv", f"fastconv (method={args.method!r})", fastconv_net)]
    if not args.no_reference:
        runs.append(("reference", "NumPy im2col reference", reference_net))

    results = {}
    for key, title, make in runs:
        net = make()
        warm = make()  # compile or load the kernels (and let "auto" choose) outside the timing
        warm.loss(data[0][:args.batch_size], data[1][:args.batch_size])
        warm.gradients()
        history = train(net, data, args.epochs, args.batch_size, args.lr, args.seed, key)
        seconds = [h[0] for h in history]
        results[key] = dict(title=title, net=net, test_acc=history[-1][2],
                            s_per_epoch=float(np.median(seconds)), history=history)

    print(f"\n{'net':<30} {'test acc':>9} {'s/epoch':>9}")
    for r in results.values():
        print(f"{r['title']:<30} {r['test_acc']:>9.4f} {r['s_per_epoch']:>9.3f}")
    if "reference" in results:
        speedup = results["reference"]["s_per_epoch"] / results["fastconv"]["s_per_epoch"]
        print(f"fastconv speed-up over the reference: {speedup:.2f}x")

    pngs = save_pictures(results["fastconv"]["net"], data[2][0], args.out)
    for path in pngs:
        print(f"wrote {path}")
    results["pngs"] = [str(p) for p in pngs]
    return results


if __name__ == "__main__":
    main()
