"""Command line: ``fastbn info`` and ``fastbn bench`` (also ``python -m fastbn ...``)."""
import argparse
import json
import os
import sys

from ._version import __version__


def _prog():
    """How the user ran us, for usage lines: the ``fastbn`` script or ``python -m``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "fastbn" if name.startswith("fastbn") else "python -m fastbn"


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 32,64,56,56, got {text!r}")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape of rank >= 2, got {text!r}")
    return shape


def _parser():
    parser = argparse.ArgumentParser(prog=_prog(),
                                     description="fastbn: batch normalization for array code")
    parser.add_argument("--version", action="version", version=f"fastbn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, build configuration and every backend")
    bench = commands.add_parser(
        "bench", help="compare every available backend and peer, side by side",
        description="Time forward training, inference and backward for every available "
                    "backend and peer (torch, plain NumPy) on the same data, interleaved, and "
                    "report medians, GB/s, the multiple of the memory-bandwidth floor measured "
                    "in the same run, and the speed-up over torch.")
    bench.add_argument("--backend", action="append", metavar="NAME",
                       help="only this contender (repeatable): a backend name, torch or "
                            "numpy-naive")
    bench.add_argument("--layout", action="append", choices=["NCHW", "NHWC", "NC"],
                       help="only this layout (repeatable; default all three)")
    bench.add_argument("--shape", type=_shape, metavar="N,C[,H,W]",
                       help="the tensor shape (NCHW order; with NC, the first two numbers); "
                            "default 32,64,56,56 and 4096,1024 for NC")
    bench.add_argument("--dtype", action="append", choices=["float32", "float64", "float16", "bfloat16"],
                       help="only this dtype (repeatable; default float32)")
    bench.add_argument("--op", action="append",
                       choices=["forward-training", "forward-training-out", "inference",
                                "backward"],
                       help="only this operation (repeatable; default all: forward-training "
                            "allocates its output, forward-training-out writes into a "
                            "preallocated, touched out=)")
    bench.add_argument("--threads", type=int, help="threads for every contender "
                                                   "(default: fastbn.get_num_threads())")
    bench.add_argument("--repeats", type=int, default=15,
                       help="timed rounds per case (median and 90th percentile)")
    bench.add_argument("--warm", action="store_true",
                       help="don't flush the caches between timed calls (default: cold)")
    bench.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    bench.add_argument("--label", metavar="TEXT",
                       help="a name for this run, saved in the JSON (e.g. the version or "
                            "commit when fastbn is not run from a git checkout)")
    bench.add_argument("--markdown", action="store_true",
                       help="print the table as Markdown (for a README), with the run's "
                            "settings and skipped contenders")
    bench.add_argument("--plot", metavar="PATH.png", help="also draw a bar chart (matplotlib)")
    return parser


def _bench(args):
    from . import bench
    from ._threads import get_num_threads
    layouts = args.layout or ["NCHW", "NHWC", "NC"]
    dtypes = args.dtype or ["float32"]
    ops = args.op or list(bench.OPS)
    cases = []
    for layout in layouts:
        shapes = bench.DEFAULT_SHAPES[layout]
        if args.shape is not None:
            shapes = [args.shape[:2] if layout == "NC" else args.shape]
        cases += [bench.Case(op, layout, shape, dtype)
                  for shape in shapes for dtype in dtypes for op in ops]
    try:
        contenders = bench.available_contenders(args.backend)
    except ValueError as exc:
        raise SystemExit(f"fastbn bench: {exc}") from None
    threads = args.threads or get_num_threads()
    if args.plot:  # fail now, not after the run, when matplotlib is missing
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise SystemExit(f"--plot needs matplotlib: {install_hint('matplotlib', 'bench')}")
    left_out = [] if args.backend else bench.unavailable_contenders()
    results = bench.run_cases(cases, contenders, threads=threads, repeats=args.repeats,
                              progress=bench.progress_bar, cold=not args.warm)
    settings = (f"fastbn {__version__}: medians and p90s of {args.repeats} interleaved rounds, "
                f"{threads} threads, {'warm' if args.warm else 'cold'} caches; floor = "
                f"yardstick read/copy kernels in the same run")
    if args.markdown:
        print(bench.format_markdown(results, settings, left_out))
    else:
        print(settings)
        for name, why in left_out:
            print(f"({name} left out: {why})")
        print(bench.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "git_revision": bench.git_revision(),
                       "label": args.label}, f, indent=1)
        print(f"saved {args.json}")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"saved {args.plot}")
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "info":
        import fastbn
        fastbn.show_config()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
