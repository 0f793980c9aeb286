#!/usr/bin/env python
"""Fail when a benchmark's floor ratio grew by more than a given percentage.

    python benchmarks/check_regression.py OLD.json NEW.json [--max-increase 10]

Reads pytest-benchmark JSON files (``--benchmark-save``/``--benchmark-json``) or
``python -m fastbn bench --json`` files. Compares ``floor_ratio`` (time / the
memory-bandwidth floor measured in the same run), which is stable across a
faster or busier machine where absolute times are not. Exit status: 0 when no
benchmark regressed, 1 when one did, 2 when the files can't be compared.
"""
import argparse
import json
import sys


def load_ratios(path, field="floor_ratio", contenders=None):
    """{benchmark key: floor ratio} from either JSON format, optionally of some contenders."""
    with open(path) as f:
        data = json.load(f)
    ratios = {}
    if "benchmarks" in data:  # pytest-benchmark
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            ratio = info.get(field)
            if contenders and info.get("contender") not in contenders:
                continue
            if ratio is not None:
                ratios[b["fullname"]] = float(ratio)
    elif "results" in data:  # python -m fastbn bench --json
        for r in data["results"]:
            if contenders and r.get("contender") not in contenders:
                continue
            if field in r:
                key = (f"{r['contender']} {r['op']} {r['layout']} "
                       f"{'x'.join(map(str, r['shape']))} {r['dtype']}")
                ratios[key] = float(r[field])
    else:
        raise ValueError(f"{path}: neither a pytest-benchmark nor a fastbn bench JSON file")
    if not ratios:
        raise ValueError(f"{path}: no benchmark carries a {field}")
    return ratios


def compare(old, new, max_increase):
    """Rows (key, old, new, change %, regressed) for the benchmarks in both."""
    rows = []
    for key in sorted(old.keys() & new.keys()):
        change = (new[key] / old[key] - 1.0) * 100.0
        rows.append((key, old[key], new[key], change, change > max_increase))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="baseline JSON")
    parser.add_argument("new", help="JSON of the run to check")
    parser.add_argument("--max-increase", type=float, default=10.0, metavar="PERCENT",
                        help="largest allowed growth of a floor ratio (default 10)")
    parser.add_argument("--field", default="floor_ratio",
                        help="the ratio to compare (pytest-benchmark extra_info or a "
                             "`fastbn bench --json` row): floor_ratio (medians, default) or "
                             "floor_ratio_min (minima: steadier where other processes "
                             "preempt the benchmark)")
    parser.add_argument("--contender", action="append", metavar="NAME",
                        help="only this contender's benchmarks (repeatable), e.g. cython")
    args = parser.parse_args(argv)
    try:
        old = load_ratios(args.old, args.field, args.contender)
        new = load_ratios(args.new, args.field, args.contender)
    except (OSError, ValueError, KeyError) as exc:
        print(f"check_regression: {exc}", file=sys.stderr)
        return 2
    rows = compare(old, new, args.max_increase)
    if not rows:
        print("check_regression: the two files share no benchmark", file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'old':>7} {'new':>7} {'change':>8}")
    for key, o, n, change, regressed in rows:
        print(f"{key:<{width}}  {o:7.3f} {n:7.3f} {change:+7.1f}%"
              f"{'  REGRESSED' if regressed else ''}")
    for key in sorted(old.keys() - new.keys()):
        print(f"(only in {args.old}: {key})")
    for key in sorted(new.keys() - old.keys()):
        print(f"(only in {args.new}: {key})")
    regressed = [r[0] for r in rows if r[4]]
    if regressed:
        print(f"\n{len(regressed)} of {len(rows)} benchmarks' floor ratio grew by more than "
              f"{args.max_increase:g}%", file=sys.stderr)
        return 1
    print(f"\nno floor ratio grew by more than {args.max_increase:g}% ({len(rows)} compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
