"""Where the allocating path's time goes: page faults per call, with and without fastbn's
output cache, beside torch.

    python benchmarks/allocation.py [--repeats 30] [--threads 2]

Each contender runs in its own subprocess (the cache is process-wide, and glibc's heap
state differs between processes), calling the public API as a user does (the result
dropped before the next call, as a training loop's intermediate would be). Printed per
contender: minor page faults per call (``getrusage``, exact) and the median and 90th
percentile time of a call. The machine's transparent-huge-page mode is printed too:
NumPy advises huge pages for large arrays, so with ``defrag=madvise`` a fault may wait
for compaction.
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
import fastbn
from fastbn.bench import p90
contender, shape, repeats, threads = sys.argv[1], tuple(json.loads(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
c = shape[1]
w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
fastbn.set_num_threads(threads)
if contender == "torch":
    import torch
    torch.set_num_threads(threads)
    xt, wt, bt, rmt, rvt = map(torch.from_numpy, (x, w, b, rm, rv))
    def call():
        with torch.no_grad():
            torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, True)
else:
    def call():
        fastbn.batch_norm(x, rm, rv, w, b, True, backend="cython")
call(); call()
times, faults = [], 0
for _ in range(repeats):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps(dict(faults=faults / repeats, median=statistics.median(times), p90=p90(times))))
"""


def _thp():
    out = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                out[name] = f.read().strip()
        except OSError:
            out[name] = "?"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"transparent huge pages: {_thp()}")
    contenders = [("fastbn, output cache", "fastbn", {}),
                  ("fastbn, no cache", "fastbn", {"FASTBN_OUTPUT_CACHE_MB": "0"}),
                  ("torch", "torch", {})]
    for shape in ((32, 64, 56, 56), (32, 64, 112, 112), (4096, 1024), (256, 2048)):
        print(f"\ntraining forward, allocating, {shape} float32, {args.threads} threads")
        for label, who, env in contenders:
            run = subprocess.run([sys.executable, "-c", CHILD, who, json.dumps(shape),
                                  str(args.repeats), str(args.threads)],
                                 env={**os.environ, **env}, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"  {label:22s} failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(run.stdout)
            print(f"  {label:22s} {r['faults']:8.1f} page faults/call   median "
                  f"{r['median'] * 1e3:7.3f} ms   p90 {r['p90'] * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
