"""Per-step cost of synchronized batch norm over MPI against local batch norm.

    mpiexec -n 2 python benchmarks/sync_overhead.py [--shape 32,64,56,56] [--rounds 30]
                                                    [--threads N] [--backend NAME]

Each rank holds the full shape (float32, NCHW) and runs one training step, forward
plus backward, two ways, interleaved round by round (the order alternating): local
(``fastbn.batch_norm_forward``/``backward``) and synchronized
(``fastbn.distributed.sync_batch_norm_forward``/``backward``: one collective each).
A step's time is the slowest rank's (the step is done when every rank is), from a
barrier. Rank 0 prints medians and p90s and the ratio sync/local, and the time of the
collective alone: one ``Allgather`` of the ``1 + 2*C`` float64 values a call packs,
timed from a barrier.
"""
import argparse
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import sync_batch_norm_backward, sync_batch_norm_forward


def p90(values):
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def timed(comm, fn):
    """Seconds from a barrier until this rank is done, the slowest rank's."""
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // size),
                        help="fastbn threads per rank (default: the cores shared out)")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    fastbn.set_num_threads(args.threads)

    rng = np.random.default_rng(rank)
    x = rng.normal(size=shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    c = shape[1]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    kw = dict(running_mean=rm, running_var=rv, backend=args.backend)

    def local():
        _, mean, invstd = fastbn.batch_norm_forward(x, w, b, **kw)
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight=w, backend=args.backend)

    def synced():
        _, mean, invstd = sync_batch_norm_forward(x, w, b, comm=comm, **kw)
        sync_batch_norm_backward(dy, x, mean, invstd, weight=w, backend=args.backend,
                                 comm=comm)

    packed = np.zeros(1 + 2 * c)
    gathered = np.empty((size, 1 + 2 * c))

    def collective():
        comm.Allgather(packed, gathered)

    for fn in (local, synced, local, synced):  # warm-up: caches, allocator, JIT
        timed(comm, fn)
    times = {"local": [], "sync": [], "collective": []}
    for r in range(args.rounds):
        order = [("local", local), ("sync", synced)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(comm, fn))
        times["collective"].append(timed(comm, collective))

    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"fastbn sync overhead: {size} ranks, each {shape} float32, "
              f"{args.threads} thread(s) a rank, backend {fastbn.last_backend()}, "
              f"{args.rounds} interleaved rounds")
        for name in ("local", "sync"):
            print(f"  {name:<10} forward+backward  median {med[name] * 1e3:8.2f} ms   "
                  f"p90 {p90(times[name]) * 1e3:8.2f} ms")
        print(f"  sync / local (median)            {med['sync'] / med['local']:8.3f}x   "
              f"(+{(med['sync'] - med['local']) * 1e3:.2f} ms a step)")
        print(f"  one Allgather of {1 + 2 * c} float64   median "
              f"{med['collective'] * 1e6:8.1f} us   p90 {p90(times['collective']) * 1e6:8.1f} us"
              f"   (a step makes 2)")


if __name__ == "__main__":
    main()
