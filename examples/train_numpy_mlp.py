"""What batch norm does to training: a NumPy network on the digits, with and without BN.

A 4-hidden-layer perceptron (64 -> 128 -> 128 -> 128 -> 128 -> 10), written in plain
NumPy (Linear, ReLU, softmax cross-entropy, SGD without momentum), is trained on
scikit-learn's bundled 8x8 digits twice for each learning rate and seed: once as
``Linear -> ReLU`` and once as ``Linear -> fastbn.BatchNorm -> ReLU``. The BN layer's
``forward``/``backward`` are fastbn's; everything else is a few lines of NumPy below.

It draws two pictures into ``--out`` (default ``examples/images/``):

* ``numpy_mlp_curves.png``: training loss and test accuracy per epoch for each
  learning rate, the mean over the seeds with the min..max band. What to look for:
  with BN, training gets further in the same number of steps and keeps working
  at learning rates where the plain network stalls or diverges.
* ``numpy_mlp_activations.png``: mean and standard deviation of each hidden
  layer's pre-activation (the input of its ReLU) at every step of one run. Without
  BN the signal starts smaller the deeper the layer (this initialization shrinks
  it) and then drifts as the weights change, each layer chasing a moving input;
  with BN each layer's input is re-centred and re-scaled by the batch's own
  statistics, so it stays where the learned scale and shift (1 and 0 at first) put it.

The summary table printed at the end is computed from the same runs as the plots.

Run::

    python examples/train_numpy_mlp.py            # the full run (about 15 s on 2 cores)
    python examples/train_numpy_mlp.py --fast     # seconds: fewer epochs, seeds, rates

Needs matplotlib and scikit-learn (``pip install '.[examples]'``).
"""
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastbn
from _common import band, digits, parse_args, pyplot, save

WIDTHS = [64, 128, 128, 128, 128, 10]   # input, four hidden layers, classes
BATCH = 64


class Linear:
    """y = x @ W + b, initialized as torch.nn.Linear is (uniform in +-1/sqrt(fan_in))."""

    def __init__(self, n_in, n_out, rng, bias=True):
        bound = 1.0 / np.sqrt(n_in)
        self.W = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
        # BN subtracts the batch mean, so a bias before it would be cancelled: leave it out.
        self.b = rng.uniform(-bound, bound, n_out).astype(np.float32) if bias else None

    def forward(self, x):
        self.x = x
        return x @ self.W + (self.b if self.b is not None else 0)

    def backward(self, dy):
        self.dW = self.x.T @ dy
        self.db = dy.sum(0) if self.b is not None else None
        return dy @ self.W.T

    def step(self, lr):
        self.W -= lr * self.dW
        if self.b is not None:
            self.b -= lr * self.db


class MLP:
    """Linear -> [BatchNorm] -> ReLU per hidden layer, then a Linear classifier."""

    def __init__(self, use_bn, seed):
        rng = np.random.default_rng(seed)
        pairs = list(zip(WIDTHS[:-1], WIDTHS[1:]))
        self.linears = [Linear(i, o, rng, bias=not use_bn) for i, o in pairs]
        # fastbn.BatchNorm on (N, C) arrays: one mean/variance per unit over the batch,
        # a learned scale (weight) and shift (bias), running statistics for eval().
        self.bns = [fastbn.BatchNorm(o) for _, o in pairs[:-1]] if use_bn else []

    def forward(self, x, record=None):
        """Logits; ``record`` (a list) gets each hidden layer's ReLU input."""
        self.masks = []
        for i, lin in enumerate(self.linears[:-1]):
            z = lin.forward(x)
            if self.bns:
                z = self.bns[i](z)
            if record is not None:
                record.append(z)
            mask = z > 0
            self.masks.append(mask)
            x = z * mask
        return self.linears[-1].forward(x)

    def backward(self, dlogits):
        d = self.linears[-1].backward(dlogits)
        for i in reversed(range(len(self.linears) - 1)):
            d = d * self.masks[i]                     # ReLU
            if self.bns:
                d = self.bns[i].backward(d)           # sets grad_weight / grad_bias
            d = self.linears[i].backward(d)

    def step(self, lr):
        for lin in self.linears:
            lin.step(lr)
        for bn in self.bns:                           # the BN parameters learn too
            bn.weight -= lr * bn.grad_weight
            bn.bias -= lr * bn.grad_bias

    def train(self, mode=True):
        for bn in self.bns:
            bn.train(mode)     # eval(): normalize with the running statistics


def cross_entropy(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(1, keepdims=True)   # log-sum-exp without overflow
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    grad = np.exp(logp)
    grad[np.arange(len(y)), y] -= 1
    return -logp[np.arange(len(y)), y].mean(), grad / len(y)


def accuracy(model, x, y):
    model.train(False)
    acc = float((model.forward(x).argmax(1) == y).mean())
    model.train(True)
    return acc


def train(use_bn, lr, seed, epochs, data, record=False):
    """One run: per-epoch training loss and test accuracy (NaN after a divergence),
    and, if ``record``, each hidden layer's ReLU-input (mean, std) at every step."""
    x_train, x_test, y_train, y_test = data
    model = MLP(use_bn, seed)
    rng = np.random.default_rng(seed + 1000)
    losses, accs = np.full(epochs, np.nan), np.full(epochs, np.nan)
    stats = []
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order) - BATCH + 1, BATCH):   # full batches only
            batch = order[start:start + BATCH]
            pre = [] if record else None
            with np.errstate(over="ignore", invalid="ignore"):
                loss, grad = cross_entropy(model.forward(x_train[batch], pre), y_train[batch])
            if not np.isfinite(loss):
                return losses, accs, np.array(stats), True       # diverged
            if record:
                stats.append([(z.mean(), z.std()) for z in pre])
            model.backward(grad)
            model.step(lr)
            total += loss
        losses[epoch] = total / (len(order) // BATCH)
        accs[epoch] = accuracy(model, x_test, y_test)
    return losses, accs, np.array(stats), False


def main():
    args = parse_args(__doc__)
    if args.fast:
        lrs, seeds, epochs = [0.05, 4.0], [0], 2
    else:
        lrs, seeds, epochs = [0.01, 0.1, 1.0, 4.0], [0, 1, 2], 30
    data = digits()
    plt = pyplot()
    t0 = time.perf_counter()
    # The matrices here are tiny (64 x 128): a second BLAS thread costs more in
    # hand-offs than it saves. (fastbn itself already runs calls this small on one thread.)
    threadpool_limits(1, user_api="blas")

    # --- loss and accuracy over learning rates and seeds ---
    results = {}   # (use_bn, lr) -> (losses[seed, epoch], accs[seed, epoch], diverged count)
    for lr in lrs:
        for use_bn in (False, True):
            runs = [train(use_bn, lr, s, epochs, data) for s in seeds]
            results[use_bn, lr] = (np.array([r[0] for r in runs]),
                                   np.array([r[1] for r in runs]), sum(r[3] for r in runs))

    fig, axes = plt.subplots(2, len(lrs), figsize=(3.2 * len(lrs), 5.6), sharex=True,
                             squeeze=False)
    ep = np.arange(1, epochs + 1)
    for j, lr in enumerate(lrs):
        for use_bn, color, name in ((False, "tab:gray", "no BN"), (True, "tab:blue", "BN")):
            losses, accs, diverged = results[use_bn, lr]
            label = name + (f" ({diverged} diverged)" if diverged else "")
            band(axes[0, j], ep, losses, label, color)
            band(axes[1, j], ep, accs, label, color)
        axes[0, j].set_title(f"learning rate {lr:g}")
        axes[0, j].set_yscale("log")
        axes[1, j].set_ylim(0, 1)
        axes[1, j].set_xlabel("epoch")
        axes[0, j].legend(fontsize=8)
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("test accuracy")
    fig.suptitle(f"4-hidden-layer MLP on digits, SGD, batch {BATCH}: "
                 f"mean of {len(seeds)} seed(s), band = min..max")
    fig.tight_layout()
    save(fig, args, "numpy_mlp_curves.png")

    # --- what each layer sees: ReLU-input statistics at every step of one run ---
    lr = lrs[1] if len(lrs) > 2 else lrs[0]   # a rate both networks can train at
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.6), sharex=True, sharey="row")
    for col, use_bn in enumerate((False, True)):
        _, _, stats, _ = train(use_bn, lr, seeds[0], epochs, data, record=True)
        steps = np.arange(len(stats))
        for layer in range(stats.shape[1]):
            for row in (0, 1):
                axes[row, col].plot(steps, stats[:, layer, row], lw=1,
                                    color=plt.cm.viridis(layer / stats.shape[1]),
                                    label=f"hidden layer {layer + 1}")
        axes[0, col].set_title(("with" if use_bn else "without") + f" BN (lr {lr:g})")
        axes[1, col].set_xlabel("training step")
    axes[0, 0].set_ylabel("mean of ReLU input")
    axes[1, 0].set_ylabel("std of ReLU input")
    axes[1, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save(fig, args, "numpy_mlp_activations.png")

    # --- the summary: what was measured, nothing more ---
    print(f"\nfinal test accuracy after {epochs} epochs, mean +- std over {len(seeds)} seed(s)"
          f" (diverged runs count as 0.1, chance):")
    print(f"{'lr':>6} {'no BN':>20} {'BN':>20}   first epoch with mean accuracy >= 90%")
    for lr in lrs:
        cells, reached = [], []
        for use_bn in (False, True):
            losses, accs, diverged = results[use_bn, lr]
            final = np.where(np.isfinite(accs[:, -1]), accs[:, -1], 0.1)
            cells.append(f"{final.mean():.3f} +- {final.std():.3f}"
                         + (f" ({diverged}!)" if diverged else ""))
            mean_acc = np.nan_to_num(accs, nan=0.1).mean(0)
            hit = np.flatnonzero(mean_acc >= 0.9)
            reached.append(str(hit[0] + 1) if len(hit) else "never")
        print(f"{lr:>6g} {cells[0]:>20} {cells[1]:>20}   no BN: {reached[0]}, BN: {reached[1]}")
    print(f"({time.perf_counter() - t0:.0f} s; '(k!)': k runs diverged to a non-finite loss)")


if __name__ == "__main__":
    main()
