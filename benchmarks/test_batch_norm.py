"""Every backend and peer, per operation x layout x shape x dtype, against the floor.

    pytest benchmarks --benchmark-only -q --fastbn-size=quick

Each benchmark runs cold (caches flushed before every round, untimed) and then
times the yardstick floor for the same case in the same process, so the
``floor_ratio`` in ``extra_info`` survives a machine that is faster or busier
today than yesterday (see benchmarks/README.md for the regression workflow).
"""
import statistics

import pytest

import fastbn
from fastbn import bench

ROUNDS = 9


def test_batch_norm(benchmark, contender, case, threads, flush_caches):
    if contender in bench.PEERS:
        reason = bench.peer_unavailable_reason(contender)
        if reason:
            pytest.skip(reason)
    else:
        info = {row.name: row for row in fastbn.backends()}[contender]
        if not info.available:
            pytest.skip(f"backend {contender!r} unavailable: {info.reason}")
    try:
        fn = bench.prepare(contender, case, threads)
    except bench.Skip as why:
        pytest.skip(str(why))
    benchmark.group = case.label
    benchmark.pedantic(fn, setup=flush_caches, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    floor_fn, floor_kind = bench.floor_kernels(case, threads)
    floor_fn()
    floor_times = []
    for _ in range(ROUNDS):
        flush_caches()
        floor_times.append(bench._time_once(floor_fn))
    floor = statistics.median(floor_times)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        contender=contender, op=case.op, layout=case.layout, shape=list(case.shape),
        dtype=case.dtype, threads=threads, caches="cold", bytes_moved=case.bytes_moved,
        gbps=case.bytes_moved / median / 1e9, floor_s=floor, floor_kind=floor_kind,
        floor_ratio=median / floor, fastbn_version=fastbn.__version__,
        git_revision=bench.git_revision())
