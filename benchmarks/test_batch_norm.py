"""Every backend and peer, per operation x layout x shape x dtype, against the floor.

    pytest benchmarks --benchmark-only -q --fastbn-size=quick

Each benchmark runs cold (caches flushed before every round, untimed), and the
yardstick floor for the same case is timed between its rounds, so the
``floor_ratio`` in ``extra_info`` survives a machine that is faster or busier
today than yesterday (see benchmarks/README.md for the regression workflow).
"""
import statistics

import pytest

import fastbn
from fastbn import bench

ROUNDS = 9            # at least; small cases get more, up to about BUDGET_S of timed calls
MAX_ROUNDS = 31
BUDGET_S = 0.25


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
    floor_fn, floor_kind = bench.floor_kernels(case, threads)
    fn()  # first calls: compile (numba), fault pages in
    floor_fn()
    flush_caches()
    rounds = int(min(MAX_ROUNDS, max(ROUNDS, BUDGET_S / bench._time_once(fn))))
    floor_times = []

    def floor_then_flush():
        # the floor runs interleaved with the contender, round by round, both cold
        flush_caches()
        floor_times.append(bench._time_once(floor_fn))
        flush_caches()

    benchmark.pedantic(fn, setup=floor_then_flush, rounds=rounds, iterations=1,
                       warmup_rounds=1)
    floor_times = floor_times[-rounds:]  # the warm-up round's setup ran too
    floor = statistics.median(floor_times)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        contender=contender, op=case.op, layout=case.layout, shape=list(case.shape),
        dtype=case.dtype, threads=threads, caches="cold", bytes_moved=case.bytes_moved,
        gbps=case.bytes_moved / median / 1e9, floor_s=floor, floor_kind=floor_kind,
        floor_ratio=median / floor,
        # the ratio of minima: preemption on a shared machine only ever adds time
        floor_ratio_min=benchmark.stats.stats.min / min(floor_times),
        fastbn_version=fastbn.__version__,
        git_revision=bench.git_revision())
