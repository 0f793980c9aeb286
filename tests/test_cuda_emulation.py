"""The CUDA kernels' index arithmetic and merge formulas, run on the CPU.

No GPU runs here, so what can be checked without one is checked on the host:
a small host program includes ``bn_cuda.cu`` itself and drives its walk structs
(``PlaneWalk``, ``FlatWalk``: the code the kernels use to map threads to
elements), its Chan ``merge`` / ``merge_chunk`` and its relu helpers (all
``__host__ __device__``), compiled with nvcc's host compiler. Launch
configurations come from the CuPy adapter's planning functions
(``fastbn._backends.cupy_gpu``), so each test checks the adapter and the kernels
together: every element visited exactly once, with the right channel, and few
threads idle on the shapes a review found wasteful (I = 65, 49, 196; C = 33).
The rows reductions' mapping is plain arithmetic (no struct) and is mirrored in
Python. Tests that need nvcc skip with the reason where it is missing.
"""
import importlib
import importlib.util
import math
import pathlib
import subprocess

import numpy as np
import pytest

cupy_gpu = importlib.import_module("fastbn._backends.cupy_gpu")


def _compile_tests():
    """tests/test_cuda_compile.py, loaded by path (pytest imports tests with importlib)."""
    path = pathlib.Path(__file__).with_name("test_cuda_compile.py")
    spec = importlib.util.spec_from_file_location("_fastbn_test_cuda_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NVCC = _compile_tests().NVCC  # nvcc, found as the compile tests find it

H100 = (132, 2048)
DTYPES = sorted(cupy_gpu.STAT_DTYPE)


HOST_PROGRAM = r"""
#include "%(source)s"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using fastbn::FlatWalk;
using fastbn::Moments;
using fastbn::PlaneWalk;
using fastbn::kUnroll;

static void print_moments(const char* name, const Moments<float>& m) {
    std::printf("%%s %%lld %%a %%a\n", name, m.n, (double)m.mean, (double)m.m2);  // exact
}

static int merges() {
    const Moments<float> empty = {0, 0.0f, 0.0f};
    const Moments<float> huge = {3, 1e20f, 5.0f};
    const Moments<float> neg = {2, -3e19f, 7.0f};
    print_moments("empty+huge", fastbn::merge(empty, huge));
    print_moments("huge+empty", fastbn::merge(huge, empty));
    print_moments("empty+empty", fastbn::merge(empty, empty));
    print_moments("neg+empty", fastbn::merge(neg, empty));
    const Moments<float> a = {4, 1.5f, 2.0f};
    const Moments<float> b = {2, -0.5f, 1.0f};
    print_moments("a+b", fastbn::merge(a, b));
    // a chunk with its last two values invalid, into an empty state
    Moments<float> s = empty;
    const float v[4] = {1.0f, 4.0f, 1e30f, -1e30f};
    const bool ok[4] = {true, true, false, false};
    fastbn::merge_chunk(s, v, ok);
    print_moments("chunk", s);
    const float nan = std::nanf("");
    std::printf("relu %%.9g %%.9g %%.9g %%d\n", (double)fastbn::relu(-1.5f),
                (double)fastbn::relu(2.5f), (double)fastbn::relu(0.0f),
                (int)std::isnan(fastbn::relu(nan)));
    std::printf("mask %%.9g %%.9g %%.9g %%.9g %%d\n", (double)fastbn::relu_mask(3.0f, 1e-30f),
                (double)fastbn::relu_mask(3.0f, 0.0f), (double)fastbn::relu_mask(3.0f, -2.0f),
                (double)fastbn::relu_mask(3.0f, nan),
                (int)std::isnan(fastbn::relu_mask(nan, 1.0f)));
    return 0;
}

// Every thread's walk (made by make(first, step)) run as the kernels' loops run it,
// kUnroll steps per iteration while in(w); visit(w, seen) marks the values of the
// current vector and returns how many it got wrong (wrong channel, or seen before).
template <typename Make, typename In, typename Visit>
static int tally(long long n, long long blocks, long long threads, Make make, In in,
                 Visit visit) {
    std::vector<unsigned char> seen(n, 0);
    long long wrong = 0, loads = 0, most = 0;
    for (long long blk = 0; blk < blocks; ++blk) {
        for (long long t = 0; t < threads; ++t) {
            auto w = make(blk * threads + t, blocks * threads);
            long long mine = 0;
            while (in(w)) {
                for (int k = 0; k < kUnroll; ++k) {
                    if (in(w)) {
                        wrong += visit(w, seen);
                        ++mine;
                    }
                    w.advance();
                }
            }
            loads += mine;
            most = mine > most ? mine : most;
        }
    }
    long long missed = 0;
    for (unsigned char s : seen) {
        missed += s == 0;
    }
    std::printf("wrong %%lld missed %%lld loads %%lld slots %%lld\n", wrong, missed, loads,
                most * blocks * threads);
    return 0;
}

// planes reduction of channel c: grid (C, slices), 1-D blocks of `threads`, the walk of
// stats_planes / backward_reduce_planes
template <int V>
static int planes(long long O, long long C, long long I, long long c, long long slices,
                  long long threads) {
    return tally(
        O * I, slices, threads,
        [&](long long first, long long step) { return PlaneWalk<long long>(I / V, first, step); },
        [&](const PlaneWalk<long long>& w) { return w.o < O; },
        [&](const PlaneWalk<long long>& w, std::vector<unsigned char>& seen) {
            long long bad = 0;
            const long long p = w.template offset<V>(C, c);
            for (int j = 0; j < V; ++j) {
                const long long e = p + j;
                const long long o = e / (C * I), ch = (e / I) %% C, i = e %% I;
                bad += ch != c || o >= O || seen[o * I + i]++;
            }
            return bad;
        });
}

// the elementwise walk (normalize_walk / backward_elemt_walk): n values of (O, C, I)
// (rows: I = 1), 1-D grid of `grid` blocks of `threads`
template <int V, bool ROWS>
static int elementwise(long long n, long long C, long long I, long long grid, long long threads) {
    const long long nv = n / V;
    return tally(
        n, grid, threads,
        [&](long long first, long long step) {
            return FlatWalk<long long>(ROWS ? 1 : I / V, ROWS ? C / V : C, first, step);
        },
        [&](const FlatWalk<long long>& w) { return w.ev < nv; },
        [&](const FlatWalk<long long>& w, std::vector<unsigned char>& seen) {
            long long bad = 0;
            const long long ch = w.template channel<V, ROWS>();
            for (int j = 0; j < V; ++j) {
                const long long e = w.ev * V + j;
                bad += (ROWS ? ch + j : ch) != (e / I) %% C || seen[e]++;
            }
            return bad;
        });
}

int main(int argc, char** argv) {
    if (argc >= 2 && !std::strcmp(argv[1], "merge")) {
        return merges();
    }
    std::vector<long long> a;
    for (int k = 2; k < argc; ++k) {
        a.push_back(std::atoll(argv[k]));
    }
    if (argc == 9 && !std::strcmp(argv[1], "planes")) {  // O C I c slices threads V
        switch (a[6]) {
            case 1: return planes<1>(a[0], a[1], a[2], a[3], a[4], a[5]);
            case 2: return planes<2>(a[0], a[1], a[2], a[3], a[4], a[5]);
            case 4: return planes<4>(a[0], a[1], a[2], a[3], a[4], a[5]);
        }
    }
    if (argc == 9 && !std::strcmp(argv[1], "elementwise")) {  // n C I rows grid threads V
        const bool rows = a[3] != 0;
        switch (a[6] * 2 + rows) {
            case 2: return elementwise<1, false>(a[0], a[1], a[2], a[4], a[5]);
            case 3: return elementwise<1, true>(a[0], a[1], a[2], a[4], a[5]);
            case 4: return elementwise<2, false>(a[0], a[1], a[2], a[4], a[5]);
            case 5: return elementwise<2, true>(a[0], a[1], a[2], a[4], a[5]);
            case 8: return elementwise<4, false>(a[0], a[1], a[2], a[4], a[5]);
            case 9: return elementwise<4, true>(a[0], a[1], a[2], a[4], a[5]);
        }
    }
    std::fprintf(stderr, "bad arguments\n");
    return 2;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The host program, built once: bn_cuda.cu (float32 instantiations) + the drivers."""
    if NVCC is None:
        pytest.skip("nvcc not found (on PATH, CUDA_HOME, CUDA_PATH or /usr/local/cuda): "
                    "the host emulation is compiled with it")
    import importlib.resources
    resource = importlib.resources.files("fastbn._kernels").joinpath(cupy_gpu.KERNEL_SOURCE)
    work = tmp_path_factory.mktemp("emu")
    with importlib.resources.as_file(resource) as source:
        program = work / "emu.cu"
        program.write_text(HOST_PROGRAM % {"source": str(source)})
        exe = work / "emu"
        cmd = [NVCC, "-std=c++17", "-O2", "-arch=sm_80", "-DFASTBN_FLOAT16=0",
               "-DFASTBN_BFLOAT16=0", "-DFASTBN_FLOAT64=0", "-Werror", "all-warnings",
               "-o", str(exe), str(program)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"

    def run(*args):
        out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


def _walk_result(text):
    words = text.split()
    return {words[k]: int(words[k + 1]) for k in range(0, len(words), 2)}


# --- merge and relu, from the kernel source ---------------------------------------------

def test_merge_with_an_empty_side_returns_the_other_side(emulator):
    rows = {}
    for line in emulator("merge").splitlines():
        name, *values = line.split()
        if name not in ("relu", "mask"):
            rows[name] = (int(values[0]), float.fromhex(values[1]), float.fromhex(values[2]))
    # |delta| = 1e20: delta*delta is inf in float32, so delta*delta*n*0 would be NaN
    def f32(v):
        return float(np.float32(v))

    for name, want in [("empty+huge", (3, f32(1e20), 5.0)), ("huge+empty", (3, f32(1e20), 5.0)),
                       ("neg+empty", (2, f32(-3e19), 7.0))]:
        assert rows[name] == want, (name, rows[name])
    assert rows["empty+empty"][0] == 0
    assert not any(math.isnan(v) for values in rows.values() for v in values)
    # an ordinary merge: Chan's formula
    n, mean, m2 = rows["a+b"]
    assert n == 6
    assert math.isclose(mean, (4 * 1.5 + 2 * -0.5) / 6, rel_tol=1e-6)
    assert math.isclose(m2, 2.0 + 1.0 + (2.0 ** 2) * 4 * 2 / 6, rel_tol=1e-6)
    # a chunk with invalid entries merges only the valid ones
    assert rows["chunk"] == (2, 2.5, 4.5)


def test_relu_keeps_nan_and_the_mask_reads_the_output(emulator):
    line = next(x for x in emulator("merge").splitlines() if x.startswith("relu "))
    _, neg, pos, zero, nan = line.split()
    assert float(neg) == 0 and float(pos) == 2.5 and float(zero) == 0 and nan == "1"
    line = next(x for x in emulator("merge").splitlines() if x.startswith("mask "))
    _, tiny, at_zero, negative, at_nan, dy_nan = line.split()
    assert float(tiny) == 3 and float(at_zero) == 0 and float(negative) == 0
    assert float(at_nan) == 0 and dy_nan == "1"


# --- the walks, with the adapter's launch plans ---------------------------------------------

def _vec_of(dtype, C, I):
    width = cupy_gpu.VECTOR_WIDTH[dtype]
    return width if cupy_gpu.vector_ok(dtype, C, I, [0]) else 1


# (O, C, I): the review's shapes (I = 65, 7x7, 14x14), powers of two, tiny ones
PLANES = [(256, 64, 65), (32, 512, 49), (32, 256, 196), (8, 3, 65), (1, 1, 2), (4, 2, 7),
          (64, 3, 2048), (2, 5, 12544), (128, 16, 49)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape", PLANES, ids=str)
def test_planes_reduction_walk_covers_each_value_once(emulator, shape, dtype):
    O, C, I = shape
    vec = _vec_of(dtype, C, I)
    (gx, slices, gz), (threads, by, bz) = cupy_gpu.plan_reduce_planes(O, C, I, *H100, vec=vec)
    assert gx == C and gz == by == bz == 1 and threads % 32 == 0
    for c in sorted({0, C // 2, C - 1}):
        r = _walk_result(emulator("planes", O, C, I, c, slices, threads, vec))
        assert r["wrong"] == 0 and r["missed"] == 0, r
        assert r["loads"] * vec == O * I


def _planes_idle(O, C, I, vec, emulator):
    (_, slices, _), (threads, _, _) = cupy_gpu.plan_reduce_planes(O, C, I, *H100, vec=vec)
    r = _walk_result(emulator("planes", O, C, I, 0, slices, threads, vec))
    return 1 - r["loads"] / r["slots"]


@pytest.mark.parametrize("shape", [(256, 64, 65), (32, 512, 49), (32, 256, 196),
                                   (256, 256, 196), (64, 128, 49)], ids=str)
def test_planes_reductions_keep_threads_busy(emulator, shape):
    """I = 65 used to idle 63 of 128 threads, 7x7 and 14x14 about 23%: now few idle
    (thread-steps without a value, over the block's longest walk)."""
    O, C, I = shape
    for vec in {1, _vec_of("float32", C, I)}:
        assert _planes_idle(O, C, I, vec, emulator) < 0.10, (shape, vec)


ELEMENTWISE = [(256, 64, 65), (32, 512, 49), (32, 256, 196), (4, 3, 8), (3, 5, 7),
               (1000, 33, 1), (1000, 64, 1), (7, 3, 1), (1, 1, 2), (64, 3, 2048)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", ELEMENTWISE, ids=str)
def test_elementwise_walk_covers_each_value_once_with_its_channel(emulator, shape, dtype):
    O, C, I = shape
    n = O * C * I
    vec = _vec_of(dtype, C, I)
    (grid, gy, gz), (threads, by, bz) = cupy_gpu.plan_elementwise(n, *H100, vec=vec)
    assert gy == gz == by == bz == 1
    r = _walk_result(emulator("elementwise", n, C, I, int(I == 1), grid, threads, vec))
    assert r["wrong"] == 0 and r["missed"] == 0, r
    assert r["loads"] * vec == n


@pytest.mark.parametrize("shape", [(256, 64, 65), (32, 512, 49), (32, 256, 196),
                                   (4096, 33, 1)], ids=str)
def test_elementwise_keeps_threads_busy(emulator, shape):
    O, C, I = shape
    n = O * C * I
    for vec in {1, _vec_of("float32", C, I)}:
        (grid, _, _), (threads, _, _) = cupy_gpu.plan_elementwise(n, *H100, vec=vec)
        r = _walk_result(emulator("elementwise", n, C, I, int(I == 1), grid, threads, vec))
        assert 1 - r["loads"] / r["slots"] < 0.10, (shape, vec, r)


def test_elementwise_walk_strides_past_a_run_in_one_step(emulator):
    """A grid stride longer than a run and than C runs: the channel carry logic."""
    r = _walk_result(emulator("elementwise", 3 * 5 * 7, 5, 7, 0, 2, 32, 1))
    assert r["wrong"] == 0 and r["missed"] == 0
    r = _walk_result(emulator("elementwise", 9 * 12, 12, 1, 1, 3, 32, 4))
    assert r["wrong"] == 0 and r["missed"] == 0


# --- rows reductions: the kernel's arithmetic, mirrored ------------------------------------

def _rows_reduction(O, C, vec):
    """Visits of each (o, c) by stats_rows' mapping under the adapter's plan, and the
    idle fraction of its thread-steps."""
    (gx, gy, _), (bx, by, _) = cupy_gpu.plan_reduce_rows(O, C, *H100, vec=vec)
    Cv = C // vec
    seen = np.zeros((O, C), np.int64)
    loads = np.zeros((gx, gy, bx, by), np.int64)
    o_step = gy * by
    for bxi in range(gx):
        for tx in range(bx):
            cv = bxi * bx + tx
            if cv >= Cv:
                continue
            for byi in range(gy):
                for ty in range(by):
                    rows = np.arange(byi * by + ty, O, o_step)
                    seen[rows[:, None], cv * vec + np.arange(vec)[None, :]] += 1
                    loads[bxi, byi, tx, ty] = len(rows)
    threads = gx * gy * bx * by
    warps_slots = gx * gy * 32 * -(-(bx * by) // 32)  # lanes of the warps launched
    steps = loads.max()
    return seen, 1 - loads.sum() / (warps_slots * steps), threads


@pytest.mark.parametrize("shape", [(1000, 33, 1), (4096, 33, 1), (512, 64, 1), (77, 5, 1),
                                   (300, 100, 1), (64, 1, 1), (2048, 2, 1)], ids=str)
def test_rows_reduction_mapping_covers_each_value_once(shape):
    O, C, _ = shape
    for vec in {1, _vec_of("float32", C, 1)}:
        seen, _, _ = _rows_reduction(O, C, vec)
        assert (seen == 1).all(), (shape, vec)


def test_rows_reduction_c33_does_not_launch_a_group_of_one_channel():
    """C = 33 used to take two groups of 32 lanes, one of them with 1 lane busy."""
    (gx, _, _), (bx, by, _) = cupy_gpu.plan_reduce_rows(4096, 33, *H100)
    assert gx * bx - 33 <= 1
    _, idle, _ = _rows_reduction(4096, 33, 1)
    assert idle < 0.15
    _, idle, _ = _rows_reduction(4096 * 4, 256, _vec_of("float32", 256, 1))
    assert idle < 0.05


# --- the 32-bit index switch -----------------------------------------------------------------

def test_index_type_switches_on_element_count_not_bytes():
    limit = cupy_gpu.I32_MAX_ELEMENTS
    assert cupy_gpu.index_type(2**29) == cupy_gpu.index_type(2**30) == "i32"  # any dtype
    assert cupy_gpu.index_type(limit - 1) == "i32" and cupy_gpu.index_type(limit) == "i64"
    # room for the loop counters' overshoot: UNROLL grid strides and UNROLL carries
    assert limit - 1 + cupy_gpu.UNROLL * (cupy_gpu.MAX_STRIDE + 1) < 2**31
    assert limit > 2**31 * 0.99  # float32 arrays of 2^29..2^31 elements stay 32-bit


@pytest.mark.parametrize("n", [2**31 - 2**25, 3 * 2**29])
def test_plans_keep_32bit_counters_in_range_near_the_limit(n):
    assert cupy_gpu.index_type(n) == "i32"
    for sm, per_sm in [(132, 2048), (200, 2048), (1, 2048)]:
        (grid, _, _), (threads, _, _) = cupy_gpu.plan_elementwise(n, sm, per_sm)
        assert n + cupy_gpu.UNROLL * grid * threads < 2**31
        for shape in [(n // 64 // 4, 64, 4), (n // 3, 3, 1)]:
            O, C, I = shape
            if I > 1:
                (_, slices, _), (threads, _, _) = cupy_gpu.plan_reduce_planes(O, C, I, sm, per_sm)
                assert O * I + cupy_gpu.UNROLL * (slices * threads + 1) < 2**31
            else:
                (_, gy, _), (_, by, _) = cupy_gpu.plan_reduce_rows(O, C, sm, per_sm)
                assert O + cupy_gpu.UNROLL * gy * by < 2**31


def test_vector_path_needs_alignment_and_a_whole_number_of_vectors():
    assert cupy_gpu.vector_ok("float32", 3, 8, [0, 256])
    assert not cupy_gpu.vector_ok("float32", 3, 8, [0, 260])       # misaligned view
    assert not cupy_gpu.vector_ok("float32", 3, 49, [0])           # 7x7: runs of 49
    assert cupy_gpu.vector_ok("float32", 64, 1, [512])             # rows: C % 4
    assert not cupy_gpu.vector_ok("float32", 33, 1, [512])
    assert cupy_gpu.vector_ok("float64", 3, 2, [16])               # double2
    assert not cupy_gpu.vector_ok("float64", 3, 2, [8])
    assert cupy_gpu.vector_ok("float16", 3, 4, [8])                # four halves, 8 bytes
    assert not cupy_gpu.vector_ok("bfloat16", 3, 4, [4])
    for dtype in DTYPES:
        assert cupy_gpu.VECTOR_WIDTH[dtype] * cupy_gpu.ITEMSIZE[dtype] in (8, 16)
