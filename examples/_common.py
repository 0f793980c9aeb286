"""Helpers the example scripts share: command line, data, plotting.

Not an example itself; each ``examples/*.py`` imports it from its own folder.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "images")


def parse_args(doc, add_arguments=None, argv=None):
    """The options every example takes: ``--fast`` and ``--out DIR``.

    ``--fast`` (or ``FASTBN_EXAMPLES_FAST=1`` in the environment) shrinks the run
    to seconds, for CI; the pictures are then rough but are still drawn.
    """
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true",
                        default=os.environ.get("FASTBN_EXAMPLES_FAST", "") not in ("", "0"),
                        help="a few-second run for CI (also FASTBN_EXAMPLES_FAST=1)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the PNG images (default: examples/images/)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args


def need(module, extra="examples"):
    """Import an optional dependency, or exit with the command that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        sys.exit(f"this example needs {module}: pip install 'fastbn[{extra}]' "
                 f"(from the checkout: pip install '.[{extra}]')")


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no window."""
    matplotlib = need("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, args, name, dpi=80):
    """Save ``fig`` as ``args.out/name`` (a PNG small enough for a README) and close it."""
    path = os.path.join(args.out, name)
    fig.savefig(path, dpi=dpi)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"saved {path}")
    return path


def digits(seed=0, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split 75/25 and
    standardized with the training split's statistics: (x_train, x_test, y_train, y_test)."""
    need("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y)
    # Standardizing the *input* is the usual preprocessing; BN does the same for
    # every hidden layer, at every step, from the batch at hand.
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    return ((x_train - mu) / sd).astype(dtype), ((x_test - mu) / sd).astype(dtype), y_train, y_test


def band(ax, x, runs, label, color, linestyle="-"):
    """Mean over the rows of ``runs`` (one row per seed) as a line, min..max as a band.

    NaN marks steps after a run diverged; the mean is over the runs still alive.
    """
    runs = np.asarray(runs, dtype=float)
    alive = np.isfinite(runs)
    with np.errstate(invalid="ignore"):
        mean = np.where(alive.any(0), np.nansum(runs, 0) / alive.sum(0), np.nan)
    ax.plot(x, mean, color=color, linestyle=linestyle, label=label)
    if len(runs) > 1:
        lo = np.where(alive.any(0), np.nanmin(np.where(alive, runs, np.inf), 0), np.nan)
        hi = np.where(alive.any(0), np.nanmax(np.where(alive, runs, -np.inf), 0), np.nan)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
