"""Throughput of batch norm on a Dask array larger than a worker's memory, against fastbn's
NumPy path on an in-memory array.

    python benchmarks/dask_throughput.py [--gib 1.0] [--memory-limit 256MiB] [--repeat 3]

A LocalCluster of 2 worker processes (1 thread each) with a small ``memory_limit``; x is
generated lazily with ``dask.array.random`` (never materialized on the client, nor whole
on any worker). Timed, medians of ``--repeat`` runs:

- ``generate+sum``: ``x.sum()``, the cost of producing x once (the floor of one pass);
- ``fastbn train``: ``batch_norm_forward`` with running statistics (the statistics pass at
  call time) and ``y.sum()`` (the normalize pass; the sum keeps y off the client), so x is
  produced twice;
- ``numpy path``: ``batch_norm_forward`` on an in-memory NumPy array of ``--numpy-mib``,
  on the client with fastbn's default threads.

GB/s counts x's bytes once per call (what a user gets normalized per second).
"""
import argparse
import statistics
import time

import numpy as np

import fastbn


def median_seconds(run, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the Dask x (float32)")
    parser.add_argument("--memory-limit", default="256MiB", help="per worker")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--numpy-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import dask.array as da
    from distributed import Client, LocalCluster

    channels, plane = 64, 64 * 64  # (N, 64, 64, 64) float32: one image is 1 MiB
    image_bytes = channels * plane * 4
    n = int(args.gib * 2**30) // image_bytes
    per_chunk = max(1, args.chunk_mib * 2**20 // image_bytes)
    shape, chunks = (n, channels, 64, 64), (per_chunk, channels, 64, 64)
    nbytes = n * image_bytes

    # the NumPy path first: its OpenMP runtime starts before any worker exists
    m = max(2, args.numpy_mib * 2**20 // image_bytes)
    xn = np.random.default_rng(0).random((m, channels, 64, 64), dtype=np.float32) * 4 + 3
    fastbn.batch_norm_forward(xn)
    numpy_train = median_seconds(lambda: fastbn.batch_norm_forward(xn), max(5, args.repeat))
    numpy_threads, numpy_backend = fastbn.get_num_threads(), fastbn.last_backend()
    del xn

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        # uniform values: dask's standard_normal runs ~5x slower (it holds the GIL)
        x = da.random.default_rng(0).random(shape, chunks=chunks, dtype=np.float32) * 4 + 3
        print(f"x: {shape} float32, {nbytes / 2**30:.2f} GiB in {x.npartitions} chunks of "
              f"{per_chunk * image_bytes / 2**20:.0f} MiB; 2 workers x {args.memory_limit}")
        rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)

        def train():
            y = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv).y
            y.sum().compute()

        x.sum().compute()  # warm the workers (imports, first kernel calls)
        train()
        generate = median_seconds(lambda: x.sum().compute(), args.repeat)
        dask_train = median_seconds(train, args.repeat)
        client.close()

    print(f"{'':24}{'seconds':>10}{'GB/s':>8}")
    print(f"{'dask generate+sum':24}{generate:10.3f}{nbytes / generate / 1e9:8.2f}")
    print(f"{'dask fastbn train':24}{dask_train:10.3f}{nbytes / dask_train / 1e9:8.2f}")
    numpy_bytes = m * image_bytes
    print(f"{'numpy path train':24}{numpy_train:10.3f}{numpy_bytes / numpy_train / 1e9:8.2f}"
          f"   ({numpy_bytes / 2**20:.0f} MiB in memory, {numpy_threads} threads, "
          f"backend {numpy_backend})")


if __name__ == "__main__":
    main()
