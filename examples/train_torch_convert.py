"""The same story in PyTorch: a model after ``fastbn.torch.convert`` trains as torch's does.

A small CNN on scikit-learn's bundled 8x8 digits
(``Conv -> BN -> ReLU -> MaxPool``, twice, then a Linear classifier) is built once,
copied, and trained from the same initial weights on the same batches, as:

* ``torch BN``: as built, torch's own ``nn.BatchNorm2d``;
* ``fastbn``: a copy passed through ``fastbn.torch.convert(model)``, which swaps
  every ``nn.BatchNorm*d`` for fastbn's (same parameters, buffers, state_dict keys);
* ``fastbn, fused ReLU``: ``convert(model, fuse_relu=True)``: BN and the ReLU after
  it in one pass over memory;
* ``no BN``: the same network with ``nn.Identity`` in place of each BN (and biases
  in the convolutions, which BN would have cancelled).

Only the batch-norm arithmetic differs between the first three, so their losses
agree step by step to float32 rounding at first. SGD then amplifies any rounding
difference, as it would between two runs of torch itself; for scale, a fifth run,
``torch BN, 2 threads``, trains torch's own model with two threads instead of one
(the same arithmetic summed in another order): compare fastbn's distance from
torch's curve with that control's. The script prints the largest relative loss
differences and saves ``torch_convert.png`` into ``--out`` (default
``examples/images/``): the loss curves, test accuracy, and the per-step differences.

Run::

    python examples/train_torch_convert.py          # the full run (about 20 s on 2 cores)
    python examples/train_torch_convert.py --fast   # seconds

Needs torch, matplotlib and scikit-learn (``pip install '.[torch,examples]'``).
"""
import copy
import time

import numpy as np

from _common import digits, need, parse_args, pyplot, save

torch = need("torch", extra="torch")
import fastbn.torch  # noqa: E402  (after the check that torch is there)

nn = torch.nn
COLORS = {"torch BN": "tab:blue", "fastbn": "tab:orange", "fastbn, fused ReLU": "tab:green",
          "torch BN, 2 threads": "tab:purple", "no BN": "tab:gray"}


def cnn(use_bn):
    """8x8 digits -> 10 logits. A conv followed by BN needs no bias of its own."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not use_bn),
                nn.BatchNorm2d(c_out) if use_bn else nn.Identity(),
                nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 2 * 2, 10))


def train(model, lr, epochs, data, threads=1, seed=0):
    """Plain SGD; per-step training losses and per-epoch test accuracy."""
    torch.set_num_threads(threads)   # tiny tensors: one is the fastest, and deterministic
    x_train, x_test, y_train, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)        # the same batch order for every model
    losses, accs = [], []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for batch in order[:len(order) // 64 * 64].view(-1, 64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()                                 # running statistics at test time
        with torch.no_grad():
            accs.append((model(x_test).argmax(1) == y_test).float().mean().item())
    return np.array(losses), np.array(accs)


def main():
    args = parse_args(__doc__)
    epochs, lrs = (2, [0.5]) if args.fast else (15, [0.05, 0.5])
    data = [torch.from_numpy(a) for a in digits()]
    data[0], data[1] = data[0].view(-1, 1, 8, 8), data[1].view(-1, 1, 8, 8)
    t0 = time.perf_counter()

    plt = pyplot()
    fig, axes = plt.subplots(3, len(lrs), figsize=(4.6 * len(lrs), 7.5), squeeze=False,
                             sharex="col")
    print(f"{'lr':>5} {'model':<22} {'final test acc':>14} {'max rel. loss diff vs torch BN':>31}")
    for j, lr in enumerate(lrs):
        torch.manual_seed(0)
        reference = cnn(use_bn=True)
        torch.manual_seed(0)
        plain = cnn(use_bn=False)
        models = {
            "torch BN": reference,
            # convert works in place and shares the parameters: convert a copy
            "fastbn": fastbn.torch.convert(copy.deepcopy(reference)),
            "fastbn, fused ReLU": fastbn.torch.convert(copy.deepcopy(reference), fuse_relu=True),
            "torch BN, 2 threads": copy.deepcopy(reference),
            "no BN": plain,
        }
        # The control: torch against itself, its sums split over two threads.
        runs = {name: train(m, lr, epochs, data, threads=2 if "threads" in name else 1)
                for name, m in models.items()}
        ref_loss = runs["torch BN"][0]
        steps = np.arange(1, len(ref_loss) + 1)
        steps_per_epoch = len(ref_loss) // epochs
        for (name, (loss, acc)), style in zip(runs.items(), ("-", "--", ":", "-.", "-")):
            color = COLORS[name]
            axes[0, j].plot(steps, loss, style, lw=1, label=name, color=color)
            axes[1, j].plot(np.arange(1, epochs + 1) * steps_per_epoch, acc, style,
                            marker=".", label=name, color=color)
            if name != "torch BN" and name != "no BN":
                rel = np.abs(loss - ref_loss) / np.abs(ref_loss)
                axes[2, j].semilogy(steps, np.maximum(rel, 1e-9), style, lw=1, label=name,
                                    color=color)
                diff = f"{rel.max():.1e} (1st epoch {rel[:steps_per_epoch].max():.1e})"
            else:
                diff = "-"
            print(f"{lr:>5g} {name:<22} {acc[-1]:>14.3f} {diff:>31}")
        axes[0, j].set_title(f"learning rate {lr:g}")
        axes[0, j].set_yscale("log")
        axes[0, j].legend(fontsize=8)
        axes[1, j].set_ylim(0, 1)
        axes[2, j].axhline(np.finfo(np.float32).eps, color="k", lw=0.5)
        axes[2, j].text(1, np.finfo(np.float32).eps, " float32 eps", va="bottom", fontsize=8)
        axes[2, j].set_xlabel("training step")
        axes[2, j].legend(fontsize=8)
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("test accuracy")
    axes[2, 0].set_ylabel("|loss - torch BN's| / loss")
    fig.suptitle("small CNN on digits: torch's BatchNorm2d vs fastbn.torch.convert (same seed)")
    fig.tight_layout()
    save(fig, args, "torch_convert.png", dpi=64)   # noisy per-step lines: many bytes
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
