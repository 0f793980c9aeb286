"""Did a change make fastbn slower? Two ``fastbn bench --json`` runs compared and plotted.

Benchmarks move between runs even when the code doesn't (other processes, turbo,
caches), so a comparison has to say how much of a change is noise. This script
takes two runs, a baseline and a candidate, and for each row (contender,
operation, layout, shape, dtype) compares their medians. torch is benchmarked in
both runs as a control whose code did not change, and it measures the machine:

* the median of its rows' new/old ratios is the *drift* between the runs (a busier
  machine slows every row alike), which is divided out of every row;
* how far its rows then scatter around 1 is the *run-to-run spread*; a fastbn row
  is flagged as a regression only when it grew by more than that (and never for
  less than ``--max-increase``, 10%).

The loading and comparing are ``benchmarks/check_regression.py``'s own
``load_ratios`` and ``compare`` (the tool CI uses on floor ratios); this script
chooses the field (medians), the drift, the threshold and the picture.

Three ways to run it::

    python examples/bench_history.py                    # the two saved runs in examples/data/
    python examples/bench_history.py --baseline A.json --candidate B.json
    python examples/bench_history.py --run              # benchmark this install twice now (~10 s)

``examples/data/`` holds a run of commit 1562b5a (before the Cython per-call work
of 4890ca7) and one of 032788c (see ``examples/data/README.md``). Runs are made
with ``fastbn bench --json PATH`` (add ``--backend torch`` for the control).
Saves ``bench_history.png`` into ``--out`` (default ``examples/images/``). Exit
status 1 when a row regressed, as check_regression.py's.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from _common import HERE, parse_args, pyplot, save

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
from check_regression import compare, load_ratios  # noqa: E402

DATA = os.path.join(HERE, "data")
CONTROL = "torch"
# A quick subset: small arrays, where the per-call cost shows, one thread's worth of work.
QUICK = ["--backend", "cython", "--backend", CONTROL, "--layout", "NCHW", "--layout", "NC",
         "--shape", "16,64,8,8", "--op", "forward-training", "--op", "inference",
         "--op", "backward", "--warm"]


def add_arguments(parser):
    parser.add_argument("--baseline", metavar="A.json", help="the older run")
    parser.add_argument("--candidate", metavar="B.json", help="the run to check")
    parser.add_argument("--run", action="store_true",
                        help="benchmark the installed fastbn twice now instead of loading runs")
    parser.add_argument("--max-increase", type=float, default=10.0, metavar="PERCENT",
                        help="the smallest threshold for a regression (default 10)")


def bench_twice(fast, folder):
    """Two back-to-back `fastbn bench --json` runs of the same code: they differ by noise only."""
    paths = []
    for name in ("run1", "run2"):
        path = os.path.join(folder, name + ".json")
        # Run from outside the checkout: from its root, `-m fastbn` would import the
        # source tree without its compiled kernels.
        cmd = [sys.executable, "-m", "fastbn", "bench", *QUICK, "--json", path,
               "--repeats", "5" if fast else "101"]
        print("$", " ".join(cmd[1:]))
        subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL)
        paths.append(path)
    return paths


def is_control(key):
    return key.startswith(CONTROL + " ")


def label(path):
    with open(path) as f:
        run = json.load(f)
    return run.get("label") or run.get("git_revision") or \
        os.path.splitext(os.path.basename(path))[0]


def main():
    args = parse_args(__doc__, add_arguments)
    if (args.baseline is None) != (args.candidate is None):
        sys.exit("give both --baseline and --candidate, or neither")
    tmp = tempfile.TemporaryDirectory()
    if args.run:
        old_path, new_path = bench_twice(args.fast, tmp.name)
    elif args.baseline:
        old_path, new_path = args.baseline, args.candidate
    else:
        old_path, new_path = (os.path.join(DATA, "bench_1562b5a.json"),
                              os.path.join(DATA, "bench_032788c.json"))

    # check_regression's loader, on medians (seconds) and 90th percentiles.
    old, new = load_ratios(old_path, "median_s"), load_ratios(new_path, "median_s")
    old_p90, new_p90 = load_ratios(old_path, "p90_s"), load_ratios(new_path, "p90_s")

    # The control (torch, in both runs, unchanged) measures the machine: the median of
    # its moves is the drift between the runs (a busier or cooler machine slows every
    # row alike), divided out below; its rows' scatter around that is the noise.
    moves = [n / o for key, o, n, _, _ in compare(old, new, 0.0) if is_control(key)]
    drift = float(np.median(moves)) if moves else 1.0
    spread = max((abs(m / drift - 1) * 100 for m in moves), default=0.0)
    threshold = max(args.max_increase, spread)
    # check_regression's compare, on the candidate's medians with the drift divided out
    rows = compare(old, {k: v / drift for k, v in new.items()}, threshold)
    mine = [r for r in rows if not is_control(r[0])]     # (key, old, new, change %, regressed)

    a, b = label(old_path), label(new_path)
    if a == b:                         # two runs of one commit (--run)
        a, b = a + " run 1", b + " run 2"
    print(f"baseline {a} ({old_path})\ncandidate {b} ({new_path})")
    if moves:
        print(f"the control ({CONTROL}) moved x{drift:.2f} (median of its rows): the machine's "
              f"drift, divided out;\nits rows scattered by up to {spread:.0f}% around that: "
              f"the run-to-run spread")
    else:
        print(f"no {CONTROL} rows in both runs: no drift correction, spread unknown")
    print(f"a regression = median up by more than {threshold:.0f}% after the drift\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'row':<{width}} {a + ' us':>12} {b + ' us':>12} {'new/old':>8} {'drift-corr.':>11}")
    for key, o, n, change, regressed in rows:
        flag = "" if is_control(key) else "  REGRESSED" if regressed else \
            "  faster" if -change > threshold else ""
        print(f"{key:<{width}} {o * 1e6:>12.1f} {new[key] * 1e6:>12.1f} {new[key] / o:>8.2f} "
              f"{change:>+10.0f}%{flag}")
    regressed = [r for r in mine if r[4]]
    improved = [r for r in mine if -r[3] > threshold]
    print(f"\n{len(regressed)} regressed, {len(improved)} faster beyond the spread, "
          f"{len(mine) - len(regressed) - len(improved)} within it (of {len(mine)} fastbn rows)")

    # The picture: both runs' medians (bar) and p90s (whisker), and the change per row.
    plt = pyplot()
    from matplotlib.patches import Patch
    keys = [r[0] for r in rows]
    y = np.arange(len(keys))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.35 * len(keys) + 1.6), sharey=True,
                                   gridspec_kw={"width_ratios": [3, 2]})
    for offset, times, p90, name, color in ((-0.2, old, old_p90, a, "tab:gray"),
                                            (0.2, new, new_p90, b, "tab:blue")):
        med = np.array([times[k] for k in keys]) * 1e6
        hi = np.array([p90[k] for k in keys]) * 1e6 - med
        ax1.barh(y + offset, med, height=0.4, color=color, label=f"{name} (whisker: p90)",
                 xerr=[np.zeros_like(hi), hi], error_kw={"lw": 0.8})
    ax1.set_yticks(y, keys, fontsize=8)
    ax1.invert_yaxis()
    # p90s far out (a preempted round) would squash the medians: clip the axis
    ax1.set_xlim(0, 1.6 * max(max(old.values()), max(new.values())) * 1e6)
    ax1.set_xlabel("median time per call, us (whisker to the p90, clipped)")
    ax1.legend(fontsize=8, loc="lower right")
    kinds = {"control (torch)": "tab:gray", "within the spread": "tab:blue",
             "regressed": "tab:red", "faster": "tab:green"}
    colors = [kinds["control (torch)"] if is_control(r[0]) else
              kinds["regressed"] if r[4] else
              kinds["faster"] if -r[3] > threshold else kinds["within the spread"]
              for r in rows]
    ax2.barh(y, [r[3] for r in rows], color=colors)
    ax2.axvspan(-threshold, threshold, color="k", alpha=0.08, lw=0)
    ax2.axvline(0, color="k", lw=0.5)
    ax2.set_xlabel(f"median change after the drift (x{drift:.2f}), %\n"
                   f"(shaded: the spread, +-{threshold:.0f}%)")
    ax2.legend(handles=[Patch(color=c, label=k) for k, c in kinds.items()], fontsize=8,
               loc="lower right")
    fig.suptitle(f"fastbn bench: {a} -> {b}")
    fig.tight_layout()
    save(fig, args, "bench_history.png")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
