# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython + OpenMP kernels of fastbn.

This module holds only math on C-contiguous buffers. Every kernel takes
``n_threads`` resolved by the caller (``fastbn._threads``) and releases the GIL
for the whole computation.

Data arrays are the canonical ``(O, C, I)`` view, C-contiguous, of float32,
float64, or a 16-bit float passed as its uint16 bit pattern
(``x.view(np.uint16)``): float16, or bfloat16 when the kernel is called with
``bf16=True`` (every kernel takes the flag; it names the format of uint16
data and is an error with any other). Per-channel vectors have the stat dtype:
float32 for float16/bfloat16/float32 data, float64 for float64 data. 16-bit
data is converted to float32 on load (exactly) and rounded back to nearest
even on store (a NaN stays a NaN, overflow gives inf); the arithmetic in
between is the float32 path's.

Two kernel families:

* planes (``I > 1``): the array is one flat range of ``O*C`` contiguous
  planes of ``I`` values; each thread takes one contiguous slice of that range
  (memory order, cut anywhere, even inside a plane), so the split fits many
  channels and one huge channel alike. Reductions keep per-thread, per-channel
  partial states that are merged at the end (Chan). Training paths fuse per
  channel (statistics, then the second read from L2) when a channel is small.
* rows (``I == 1``): the array is ``(O, C)``; reductions walk the rows in
  memory order, four at a time, with a tile's per-channel partial sums in L1
  (blocks of up to FBN_WIDE channels); threads split the rows (or, with few
  rows, the channels). Element-wise kernels run along the flat range with
  constants tiled to a period (see _expand).

Statistics are single-read and stable: shifted sums per tile about the
channel's running mean (element-type partials over <= 2048 values), moved to a
per-channel anchor and accumulated in double; threads merged with Chan.
Outputs use streaming stores when large, 64-byte aligned and already touched.

The inner loops on contiguous runs live in ``_bn_simd.h`` (vector-extension C
for the portable x86-64 baseline, plus an AVX2+FMA instantiation chosen at
run time; see :func:`simd_level`).
"""
import os

import numpy as np

from cython.parallel cimport prange
from libc.math cimport sqrt
from cython cimport floating
from libc.stdint cimport uint16_t, uintptr_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, calloc, free

cdef extern from "_omp_compat.h":
    int FASTBN_OPENMP
    int omp_get_max_threads() noexcept nogil

cdef extern from "_bn_simd.h" nogil:
    int fbn_simd_init(int level)
    int fbn_simd_get()
    void fbn_sfence()
    void fbn_prefetch_bytes(const void *p, size_t nbytes)
    void fbn_stream_bytes(void *dst, const void *src, size_t n)
    int fbn_should_stream(const void *p, size_t nbytes)
    void fbn_chan_merge(double *cnt, double *mean, double *m2,
                        double n_b, double mean_b, double m2_b)
    void fbn_add_tile(double *cnt, double *K, double *S1, double *S2,
                      double n_t, double k, double s1, double s2)
    # 16-bit data (uint16 bit patterns); bf16 names the format: 0 float16, 1 bfloat16
    void fbn_u2f(int bf16, const uint16_t *h, float *f, Py_ssize_t n)
    void fbn_store_u16(int bf16, uint16_t *dst, const float *src, Py_ssize_t n, int stream)
    int fbn_u16_regs(int bf16)
    double fbn_sum_u16(int bf16, const uint16_t *x, Py_ssize_t n, const uint16_t *pf)
    void fbn_shifted_sums_u16(int bf16, const uint16_t *x, Py_ssize_t n, float k, double *s1,
                              double *s2, const uint16_t *pf)
    # the epilogue arguments (z, relu: forward; ys, dz: backward) are NULL / 0 when
    # absent (see "epilogues" in _bn_simd_t.h)
    void fbn_dot_xmu_u16(int bf16, const uint16_t *dy, const uint16_t *x, Py_ssize_t n, float m,
                         double *sdy, double *sdyxmu, Py_ssize_t pf, const uint16_t *ys)
    void fbn_rows_stats_wide_u16(int bf16, const uint16_t *x, Py_ssize_t ld, Py_ssize_t R,
                                 Py_ssize_t w, double n_old, float *k, double *anchor,
                                 double *off, double *m2, Py_ssize_t pfd,
                                 const uint16_t *pf_end)
    void fbn_rows_dot_wide_u16(int bf16, const uint16_t *dy, const uint16_t *x, Py_ssize_t ld,
                               Py_ssize_t R, Py_ssize_t w, const float *m, double *sdy,
                               double *sdyxmu, Py_ssize_t pfd, const uint16_t *pf_end,
                               const uint16_t *ys)
    int fbn_affine_u16(int bf16, const uint16_t *x, uint16_t *y, Py_ssize_t n, float m,
                       float s, float b, const uint16_t *z, int relu, int stream)
    int fbn_elemt_u16(int bf16, const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                      Py_ssize_t n, float m, float kdy, float kx, float kc,
                      const uint16_t *ys, uint16_t *dz, int stream)
    int fbn_rows_affine_u16(int bf16, const uint16_t *x, uint16_t *y, Py_ssize_t n,
                            Py_ssize_t c0, Py_ssize_t P, const float *m, const float *s,
                            const float *b, const uint16_t *z, int relu, int stream)
    int fbn_rows_elemt_u16(int bf16, const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                           Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P, const float *m,
                           const float *kdy, const float *kx, const float *kc,
                           const uint16_t *ys, uint16_t *dz, int stream)

    double fbn_sum_f32(const float *x, Py_ssize_t n, const float *pf)
    double fbn_sum_f64(const double *x, Py_ssize_t n, const double *pf)
    void fbn_shifted_sums_f32(const float *x, Py_ssize_t n, float k, double *s1, double *s2,
                              const float *pf)
    void fbn_shifted_sums_f64(const double *x, Py_ssize_t n, double k, double *s1, double *s2,
                              const double *pf)
    void fbn_dot_xmu_f32(const float *dy, const float *x, Py_ssize_t n, float m,
                         double *sdy, double *sdyxmu, Py_ssize_t pf, const float *ys)
    void fbn_dot_xmu_f64(const double *dy, const double *x, Py_ssize_t n, double m,
                         double *sdy, double *sdyxmu, Py_ssize_t pf, const double *ys)
    void fbn_affine_f32(const float *x, float *y, Py_ssize_t n, float m, float s, float b,
                        const float *z, int relu)
    void fbn_affine_out_f32(const float *x, float *y, Py_ssize_t n,
                            float m, float s, float b, const float *z, int relu, int stream)
    void fbn_affine_out_f64(const double *x, double *y, Py_ssize_t n,
                            double m, double s, double b, const double *z, int relu,
                            int stream)
    void fbn_elemt_f32(const float *dy, const float *x, float *dx, Py_ssize_t n,
                       float m, float kdy, float kx, float kc, const float *ys, float *dz)
    void fbn_elemt_out_f32(const float *dy, const float *x, float *dx, Py_ssize_t n,
                           float m, float kdy, float kx, float kc, const float *ys, float *dz,
                           int stream)
    void fbn_elemt_out_f64(const double *dy, const double *x, double *dx, Py_ssize_t n,
                           double m, double kdy, double kx, double kc, const double *ys,
                           double *dz, int stream)

    int FBN_WIDE
    void fbn_rows_stats_wide_f32(const float *x, Py_ssize_t ld, Py_ssize_t R, Py_ssize_t w,
                                 double n_old, float *k, double *anchor, double *off,
                                 double *m2, Py_ssize_t pfd, const float *pf_end)
    void fbn_rows_stats_wide_f64(const double *x, Py_ssize_t ld, Py_ssize_t R, Py_ssize_t w,
                                 double n_old, double *k, double *anchor, double *off,
                                 double *m2, Py_ssize_t pfd, const double *pf_end)
    void fbn_rows_dot_wide_f32(const float *dy, const float *x, Py_ssize_t ld, Py_ssize_t R,
                               Py_ssize_t w, const float *m, double *sdy, double *sdyxmu,
                               Py_ssize_t pfd, const float *pf_end, const float *ys)
    void fbn_rows_dot_wide_f64(const double *dy, const double *x, Py_ssize_t ld, Py_ssize_t R,
                               Py_ssize_t w, const double *m, double *sdy, double *sdyxmu,
                               Py_ssize_t pfd, const double *pf_end, const double *ys)
    void fbn_rows_affine_f32(const float *x, float *y, Py_ssize_t n, Py_ssize_t c0,
                             Py_ssize_t P, const float *m, const float *s, const float *b,
                             const float *z, int relu)
    void fbn_rows_affine_out_f32(const float *x, float *y, Py_ssize_t n, Py_ssize_t c0,
                                 Py_ssize_t P, const float *m, const float *s, const float *b,
                                 const float *z, int relu, int stream)
    void fbn_rows_affine_out_f64(const double *x, double *y, Py_ssize_t n, Py_ssize_t c0,
                                 Py_ssize_t P, const double *m, const double *s,
                                 const double *b, const double *z, int relu, int stream)
    void fbn_rows_elemt_f32(const float *dy, const float *x, float *dx, Py_ssize_t n,
                            Py_ssize_t c0, Py_ssize_t P, const float *m, const float *kdy,
                            const float *kx, const float *kc, const float *ys, float *dz)
    void fbn_rows_elemt_out_f32(const float *dy, const float *x, float *dx, Py_ssize_t n,
                                Py_ssize_t c0, Py_ssize_t P, const float *m, const float *kdy,
                                const float *kx, const float *kc, const float *ys, float *dz,
                                int stream)
    void fbn_rows_elemt_out_f64(const double *dy, const double *x, double *dx, Py_ssize_t n,
                                Py_ssize_t c0, Py_ssize_t P, const double *m,
                                const double *kdy, const double *kx, const double *kc,
                                const double *ys, double *dz, int stream)


# float16 and bfloat16 travel as their bit pattern (Cython memoryviews have no
# 16-bit float type); the kernels' `bf16` flag says which of the two it is.
ctypedef fused data_t:
    uint16_t
    float
    double

ctypedef fused stat_t:
    float
    double

# Values per reduction tile: 2048 float32 = 8 KiB, inside the 8-32 KiB range
# that measured best (1 KiB tiles were 1.7x slower); also bounds the float32
# partial sums of a tile to 128 values per lane.
cdef enum:
    TILE = 2048
# Rows per tile in the rows family: every tile costs one Chan merge per channel.
cdef enum:
    ROW_TILE = 256
# Below this many elements per thread, a thread team costs more than it saves.
cdef enum:
    MIN_PER_THREAD = 32768
cdef enum:
    PF_BYTES = 8192
# Bytes of the rows family's first tile (its column means are the first shift).
# Bytes of the rows family's first tile, whose column means are the first shift
# (read twice: capped so the second read finds it in L2). 32-128 KiB measured
# alike; the full 256-row tile (1 MiB per thread at 1024 channels) was 1.13-1.3x
# slower for NC (4096, 1024) stats, S/M channels-last unchanged.
cdef enum:
    FIRST_TILE_BYTES = 65536
# Fused per-channel paths re-read a channel from L2 (1 MiB per core here), so
# they are taken only when the bytes one channel reads (x; or dy and x) fit in
# it with room. Module state only so benchmarks can compare both paths.
# Measured (2 threads, cold): forward S/M NCHW fused 0.86-0.92x (read + copy)
# vs 1.05-1.08x for stats + normalize; backward S/M (802 KiB of dy and x per
# channel) fused 1.02x vs 1.2x (2 reads + copy). L (12.8 MB per channel) is
# never fused.
cdef Py_ssize_t _fuse_fwd_max = 786432
cdef Py_ssize_t _fuse_bwd_max = 917504


_BF16_DATA = "bf16=True: expected bfloat16 data as its uint16 bit pattern"


def _fuse_limits(fwd_bytes=None, bwd_bytes=None):
    """Get (and optionally set) the per-channel byte limits of the fused paths
    (0 disables fusion). For benchmarks and tests; returns the previous limits."""
    global _fuse_fwd_max, _fuse_bwd_max
    old = (_fuse_fwd_max, _fuse_bwd_max)
    if fwd_bytes is not None:
        _fuse_fwd_max = fwd_bytes
    if bwd_bytes is not None:
        _fuse_bwd_max = bwd_bytes
    return old


# Instruction set of the inner loops: AVX2+FMA when the CPU has it (chosen at
# run time; the build itself targets the baseline), unless FASTBN_SIMD=baseline.
fbn_simd_init(0 if os.environ.get("FASTBN_SIMD", "").lower() == "baseline" else 1)


def simd_level(level=None):
    """Return the instruction set the inner loops use: "avx2" or "baseline".

    Parameters
    ----------
    level : {"avx2", "baseline"}, optional
        Set it first (for tests and benchmarks); "avx2" falls back to
        "baseline" where the CPU lacks AVX2/FMA or the build can't dispatch.
    """
    if level is not None:
        if level not in ("avx2", "baseline"):
            raise ValueError(f"level: expected 'avx2' or 'baseline', got {level!r}")
        fbn_simd_init(1 if level == "avx2" else 0)
    return "avx2" if fbn_simd_get() else "baseline"


def openmp_enabled():
    """True when this extension was compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def openmp_max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

cdef inline int _team(Py_ssize_t work, int n_threads) noexcept nogil:
    """Threads worth using for `work` elements (1 without OpenMP)."""
    cdef Py_ssize_t t = work // MIN_PER_THREAD
    if not FASTBN_OPENMP or n_threads < 1:
        return 1
    if t < 1:
        t = 1
    if t > n_threads:
        t = n_threads
    return <int>t


cdef inline Py_ssize_t _tile_len(Py_ssize_t left) noexcept nogil:
    """Next tile length: TILE, but split the last two tiles evenly."""
    if left <= TILE:
        return left
    if left < 2 * TILE:
        return left // 2
    return TILE


cdef inline Py_ssize_t _cut(Py_ssize_t n, int t, int T) noexcept nogil:
    """Start of thread t's share of n items (64-bit safe for n < 2**62 / T)."""
    return (n // T) * t + (n % T) * t // T


# --- one contiguous run of one channel -------------------------------------

cdef inline void _stats_run(const data_t *x, Py_ssize_t n, double *cnt, double *K,
                            double *S1, double *S2, float *scratch,
                            Py_ssize_t pf, bint bf16) noexcept nogil:
    """Add the statistics of x[:n] (one channel) to its state (cnt, K, S1, S2).

    Shifted sums per tile, the shift being the channel's running mean (for the
    first tile its own mean: a second pass over the tile while it is in L1), so
    the tile sums never cancel; see fbn_add_tile. pf != 0: prefetch
    x[pf:pf + n] alongside. bf16: 16-bit data is bfloat16, not float16."""
    cdef Py_ssize_t i = 0, nt
    cdef double s1, s2, k
    cdef float kf
    cdef const float *xf
    while i < n:
        nt = _tile_len(n - i)
        if data_t is double:
            if cnt[0] == 0:
                k = fbn_sum_f64(x + i, nt, NULL) / nt
            else:
                k = K[0] + S1[0] / cnt[0]
            fbn_shifted_sums_f64(x + i, nt, k, &s1, &s2, x + i + pf if pf else NULL)
        elif data_t is uint16_t and fbn_u16_regs(bf16):
            # F16C (float16) or AVX2 (bfloat16): 16-bit values converted in
            # registers, as the float32 loops on a tile
            if cnt[0] == 0:
                kf = <float>(fbn_sum_u16(bf16, x + i, nt, NULL) / nt)
            else:
                kf = <float>(K[0] + S1[0] / cnt[0])
            fbn_shifted_sums_u16(bf16, x + i, nt, kf, &s1, &s2, x + i + pf if pf else NULL)
            k = kf
        else:
            if data_t is float:
                xf = x + i
            else:
                fbn_u2f(bf16, x + i, scratch, nt)
                xf = scratch
            if cnt[0] == 0:
                kf = <float>(fbn_sum_f32(xf, nt, NULL) / nt)
            else:
                kf = <float>(K[0] + S1[0] / cnt[0])
            if data_t is float:
                fbn_shifted_sums_f32(xf, nt, kf, &s1, &s2, xf + pf if pf else NULL)
            else:
                fbn_shifted_sums_f32(xf, nt, kf, &s1, &s2, NULL)
            k = kf
        fbn_add_tile(cnt, K, S1, S2, <double>nt, k, s1, s2)
        i += nt


cdef inline const data_t *_at(const data_t *p, Py_ssize_t k) noexcept nogil:
    """p + k, or NULL for an absent (NULL) epilogue array."""
    return p + k if p != NULL else NULL


cdef inline const float *_tile_of(bint bf16, const data_t *p, Py_ssize_t n,
                                  float *tile) noexcept nogil:
    """16-bit data through a float32 tile: p[:n] converted into tile (NULL stays NULL)."""
    if p == NULL:
        return NULL
    fbn_u2f(bf16, <const uint16_t *>p, tile, n)
    return tile


# Epilogues (see fastbn._registry.Backend): the forward runs take z (a residual,
# added; NULL: none) and relu; the backward runs take ys (the saved forward output:
# g = dy where ys > 0, else 0, in place of dy; NULL: g = dy) and dz (written g;
# NULL: not written). 16-bit data through a float32 tile (the baseline) uses
# scratch[0:3*TILE]: dy or x, x or z, ys.

cdef inline void _dot_run(const data_t *dy, const data_t *x, Py_ssize_t n, double m,
                          double *sdy, double *sdyxmu, float *scratch,
                          Py_ssize_t pf, bint bf16, const data_t *ys) noexcept nogil:
    """sdy += sum(g[:n]), sdyxmu += sum(g*(x - m)); float partial sums per tile."""
    cdef Py_ssize_t i = 0, nt
    cdef double a, b
    while i < n:
        nt = _tile_len(n - i)
        if data_t is double:
            fbn_dot_xmu_f64(dy + i, x + i, nt, m, &a, &b, pf, _at(ys, i))
        elif data_t is float:
            fbn_dot_xmu_f32(dy + i, x + i, nt, <float>m, &a, &b, pf, _at(ys, i))
        elif fbn_u16_regs(bf16):
            fbn_dot_xmu_u16(bf16, dy + i, x + i, nt, <float>m, &a, &b, pf, _at(ys, i))
        else:
            fbn_u2f(bf16, dy + i, scratch, nt)
            fbn_u2f(bf16, x + i, scratch + TILE, nt)
            fbn_dot_xmu_f32(scratch, scratch + TILE, nt, <float>m, &a, &b, 0,
                            _tile_of(bf16, _at(ys, i), nt, scratch + 2 * TILE))
        sdy[0] += a
        sdyxmu[0] += b
        i += nt


cdef inline void _affine_run(const data_t *x, data_t *y, Py_ssize_t n, double m, double s,
                             double b, int stream, float *scratch, bint bf16,
                             const data_t *z, bint relu) noexcept nogil:
    """y[:n] = act((x - m)*s + b [+ z])."""
    cdef Py_ssize_t i = 0, nt
    if data_t is double:
        fbn_affine_out_f64(x, y, n, m, s, b, z, relu, stream)
    elif data_t is float:
        fbn_affine_out_f32(x, y, n, <float>m, <float>s, <float>b, z, relu, stream)
    elif not fbn_affine_u16(bf16, x, y, n, <float>m, <float>s, <float>b, z, relu, stream):
        while i < n:
            nt = TILE if n - i > TILE else n - i
            fbn_u2f(bf16, x + i, scratch, nt)
            fbn_affine_f32(scratch, scratch, nt, <float>m, <float>s, <float>b,
                           _tile_of(bf16, _at(z, i), nt, scratch + TILE), relu)
            fbn_store_u16(bf16, y + i, scratch, nt, stream)
            i += nt


cdef inline void _elemt_run(const data_t *dy, const data_t *x, data_t *dx, Py_ssize_t n,
                            double m, double kdy, double kx, double kc, int stream,
                            float *scratch, bint bf16, const data_t *ys,
                            data_t *dz) noexcept nogil:
    """dx[:n] = kdy*g + kx*(x - m) + kc; dz[:n] = g unless dz is NULL."""
    cdef Py_ssize_t i = 0, nt
    if data_t is double:
        fbn_elemt_out_f64(dy, x, dx, n, m, kdy, kx, kc, ys, dz, stream)
    elif data_t is float:
        fbn_elemt_out_f32(dy, x, dx, n, <float>m, <float>kdy, <float>kx, <float>kc, ys, dz,
                          stream)
    elif not fbn_elemt_u16(bf16, dy, x, dx, n, <float>m, <float>kdy, <float>kx, <float>kc,
                           ys, dz, stream):
        while i < n:
            nt = TILE if n - i > TILE else n - i
            fbn_u2f(bf16, dy + i, scratch, nt)
            fbn_u2f(bf16, x + i, scratch + TILE, nt)
            # dx over the x tile, g over the dy tile (element by element: in place)
            fbn_elemt_f32(scratch, scratch + TILE, scratch + TILE, nt, <float>m, <float>kdy,
                          <float>kx, <float>kc,
                          _tile_of(bf16, _at(ys, i), nt, scratch + 2 * TILE),
                          scratch if dz != NULL else NULL)
            fbn_store_u16(bf16, dx + i, scratch + TILE, nt, stream)
            if dz != NULL:
                fbn_store_u16(bf16, dz + i, scratch, nt, 0)
            i += nt


# --- per-thread slices of the planes family ---------------------------------

cdef void _planes_stats_range(const data_t *x, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t C,
                              Py_ssize_t I, double *st, float *scratch,
                              bint bf16) noexcept nogil:
    """Statistics of the flat slice [lo, hi) into per-channel states
    st = (cnt, K, S1, S2) x C (see fbn_add_tile). Prefetches PF_BYTES ahead:
    1 thread, M-shaped planes: 1.54x -> 1.04-1.11x one read; L 1.16x -> 1.0x."""
    cdef Py_ssize_t pos = lo, p = lo // I, a = lo - p * I, b, c = p % C
    cdef Py_ssize_t pfa = PF_BYTES // sizeof(data_t)
    while pos < hi:
        b = I if hi - pos >= I - a else a + (hi - pos)
        _stats_run(x + pos, b - a, st + c, st + C + c, st + 2 * C + c, st + 3 * C + c, scratch,
                   pfa if pos + pfa < hi else 0, bf16)
        pos += b - a
        a = 0
        c = c + 1 if c + 1 < C else 0


cdef void _planes_dot_range(const data_t *dy, const data_t *x, Py_ssize_t lo, Py_ssize_t hi,
                            Py_ssize_t C, Py_ssize_t I, const stat_t *mean, double *sdy,
                            double *sdyxmu, float *scratch, bint bf16,
                            const data_t *ys) noexcept nogil:
    cdef Py_ssize_t pos = lo, p = lo // I, a = lo - p * I, b, c = p % C
    cdef Py_ssize_t pfa = PF_BYTES // sizeof(data_t)
    while pos < hi:
        b = I if hi - pos >= I - a else a + (hi - pos)
        _dot_run(dy + pos, x + pos, b - a, mean[c], sdy + c, sdyxmu + c, scratch,
                 pfa if pos + pfa < hi else 0, bf16, _at(ys, pos))
        pos += b - a
        a = 0
        c = c + 1 if c + 1 < C else 0


cdef void _planes_affine_range(const data_t *x, data_t *y, Py_ssize_t lo, Py_ssize_t hi,
                               Py_ssize_t C, Py_ssize_t I, const stat_t *mean,
                               const stat_t *scale, const stat_t *shift, int stream,
                               float *scratch, bint bf16, const data_t *z,
                               bint relu) noexcept nogil:
    """Normalize the flat slice [lo, hi) in memory order (not channel order)."""
    cdef Py_ssize_t pos = lo, p = lo // I, a = lo - p * I, b, c = p % C
    while pos < hi:
        b = I if hi - pos >= I - a else a + (hi - pos)
        _affine_run(x + pos, y + pos, b - a, mean[c], scale[c], shift[c], stream, scratch,
                    bf16, _at(z, pos), relu)
        pos += b - a
        a = 0
        c = c + 1 if c + 1 < C else 0
    if stream:
        fbn_sfence()


cdef void _planes_elemt_range(const data_t *dy, const data_t *x, data_t *dx, Py_ssize_t lo,
                              Py_ssize_t hi, Py_ssize_t C, Py_ssize_t I, const stat_t *mean,
                              const stat_t *kdy, const stat_t *kx, const stat_t *kc,
                              int stream, float *scratch, bint bf16, const data_t *ys,
                              data_t *dz) noexcept nogil:
    cdef Py_ssize_t pos = lo, p = lo // I, a = lo - p * I, b, c = p % C
    while pos < hi:
        b = I if hi - pos >= I - a else a + (hi - pos)
        _elemt_run(dy + pos, x + pos, dx + pos, b - a, mean[c], kdy[c], kx[c], kc[c],
                   stream, scratch, bf16, _at(ys, pos), <data_t *>_at(dz, pos))
        pos += b - a
        a = 0
        c = c + 1 if c + 1 < C else 0
    if stream:
        fbn_sfence()


# --- per-thread slices of the rows family ------------------------------------

cdef void _rows_stats_range(const data_t *x, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                            Py_ssize_t c1, Py_ssize_t C, double *st, void *kbuf, float *scratch,
                            Py_ssize_t R, bint bf16) noexcept nogil:
    """Statistics of rows [r0, r1) x channels [c0, c1), R rows per tile, rows
    walked in memory order with the tile's partial sums in L1 (wide blocks of
    up to FBN_WIDE channels), tiles merged per channel (Chan)."""
    cdef Py_ssize_t r = r0, rt, cb, w, c, i, ld, R1
    cdef Py_ssize_t pfd = _pf_rows(C, sizeof(data_t)) * C
    cdef double n_old = 0
    cdef float *kf = <float *>kbuf
    cdef double *kd = <double *>kbuf
    cdef const float *xf
    if r1 <= r0 or c1 <= c0:
        return
    # first shift: the first tile's column means (a second pass over a tile
    # that is still in cache), so the first tile's sums don't cancel even if
    # its first row is an outlier; summed in double in the anchor slots
    # the first tile is capped at FIRST_TILE_BYTES (at least one row, at most R)
    # so the main pass finds it still in L2: a full 256-row tile of 1024 float32
    # channels is 1 MiB per thread, summed here scalar and read twice
    R1 = FIRST_TILE_BYTES // ((c1 - c0) * sizeof(data_t))
    R1 = 1 if R1 < 1 else (R if R1 > R else R1)
    rt = R1 if r1 - r0 > R1 else r1 - r0
    for c in range(c0, c1):
        st[C + c] = 0
    for i in range(r0, r0 + rt):
        if data_t is uint16_t:
            # a row converted at once (scratch holds R*C floats), summed in order
            fbn_u2f(bf16, x + i * C + c0, scratch, c1 - c0)
            for c in range(c0, c1):
                st[C + c] += scratch[c - c0]
        else:
            for c in range(c0, c1):
                st[C + c] += x[i * C + c]
    for c in range(c0, c1):
        if data_t is double:
            kd[c] = st[C + c] / rt
        else:
            kf[c] = <float>(st[C + c] / rt)
    while r < r1:
        if r == r0:
            rt = R1 if r1 - r > R1 else r1 - r
        else:
            rt = R if r1 - r > R else r1 - r
        if data_t is double:
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                fbn_rows_stats_wide_f64(x + r * C + cb, C, rt, w, n_old, kd + cb,
                                        st + C + cb, st + 2 * C + cb, st + 3 * C + cb,
                                        pfd, x + r1 * C)
                cb += w
        elif data_t is uint16_t and fbn_u16_regs(bf16):
            # F16C (float16) or AVX2 (bfloat16): converted in registers, no float32 tile
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                fbn_rows_stats_wide_u16(bf16, x + r * C + cb, C, rt, w, n_old, kf + cb,
                                        st + C + cb, st + 2 * C + cb, st + 3 * C + cb,
                                        pfd, x + r1 * C)
                cb += w
        else:
            if data_t is float:
                xf = x + r * C + c0
                ld = C
            else:
                ld = c1 - c0
                for i in range(rt):
                    fbn_u2f(bf16, x + (r + i) * C + c0, scratch + i * ld, ld)
                xf = scratch
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                if data_t is float:
                    fbn_rows_stats_wide_f32(xf + (cb - c0), ld, rt, w, n_old, kf + cb,
                                            st + C + cb, st + 2 * C + cb, st + 3 * C + cb,
                                            pfd, x + r1 * C)
                else:
                    fbn_rows_stats_wide_f32(xf + (cb - c0), ld, rt, w, n_old, kf + cb,
                                            st + C + cb, st + 2 * C + cb, st + 3 * C + cb,
                                            0, NULL)
                cb += w
        n_old += rt
        r += rt
    # (anchor, off, m2) -> the planes' (K, S1, S2) form, shared by _merge_stats
    for c in range(c0, c1):
        st[c] = n_old
        st[3 * C + c] += st[2 * C + c] * st[2 * C + c] * n_old
        st[2 * C + c] *= n_old


cdef void _rows_dot_range(const data_t *dy, const data_t *x, Py_ssize_t r0, Py_ssize_t r1,
                          Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, const stat_t *mean,
                          double *sdy, double *sdyxmu, float *scratch,
                          Py_ssize_t R, bint bf16, const data_t *ys) noexcept nogil:
    """ys: as _dot_run (16-bit data through float32 tiles: scratch holds 3*R*(c1-c0))."""
    cdef Py_ssize_t r = r0, rt, cb, w, i, ld
    cdef Py_ssize_t pfd = _pf_rows(C, (3 if ys != NULL else 2) * sizeof(data_t)) * C
    cdef const float *gf
    cdef const float *xf
    cdef const float *yf = NULL
    while r < r1:
        rt = R if r1 - r > R else r1 - r
        if data_t is double:
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                fbn_rows_dot_wide_f64(dy + r * C + cb, x + r * C + cb, C, rt, w,
                                      <const double *>(mean + cb), sdy + cb, sdyxmu + cb,
                                      pfd, x + r1 * C, _at(ys, r * C + cb))
                cb += w
        elif data_t is uint16_t and fbn_u16_regs(bf16):
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                fbn_rows_dot_wide_u16(bf16, dy + r * C + cb, x + r * C + cb, C, rt, w,
                                      <const float *>(mean + cb), sdy + cb, sdyxmu + cb,
                                      pfd, x + r1 * C, _at(ys, r * C + cb))
                cb += w
        else:
            if data_t is float:
                gf = dy + r * C + c0
                xf = x + r * C + c0
                yf = _at(ys, r * C + c0)
                ld = C
            else:
                ld = c1 - c0
                for i in range(rt):
                    fbn_u2f(bf16, dy + (r + i) * C + c0, scratch + i * ld, ld)
                    fbn_u2f(bf16, x + (r + i) * C + c0, scratch + (rt + i) * ld, ld)
                    _tile_of(bf16, _at(ys, (r + i) * C + c0), ld, scratch + (2 * rt + i) * ld)
                gf = scratch
                xf = scratch + rt * ld
                yf = scratch + 2 * rt * ld if ys != NULL else NULL
            cb = c0
            while cb < c1:
                w = FBN_WIDE if c1 - cb > FBN_WIDE else c1 - cb
                if data_t is float:
                    fbn_rows_dot_wide_f32(gf + (cb - c0), xf + (cb - c0), ld, rt, w,
                                          <const float *>(mean + cb), sdy + cb, sdyxmu + cb,
                                          pfd, x + r1 * C, _at(yf, cb - c0))
                else:
                    fbn_rows_dot_wide_f32(gf + (cb - c0), xf + (cb - c0), ld, rt, w,
                                          <const float *>(mean + cb), sdy + cb, sdyxmu + cb,
                                          0, NULL, _at(yf, cb - c0))
                cb += w
        r += rt


cdef void _rows_affine_range(const data_t *x, data_t *y, Py_ssize_t lo, Py_ssize_t hi,
                             Py_ssize_t P, const stat_t *m, const stat_t *s, const stat_t *b,
                             int stream, float *scratch, bint bf16, const data_t *z,
                             bint relu) noexcept nogil:
    """Normalize the flat slice [lo, hi) of an (O, C) array; constants of period P;
    z, relu: as _affine_run."""
    cdef Py_ssize_t i = lo, nt
    if data_t is double:
        fbn_rows_affine_out_f64(x + lo, y + lo, hi - lo, lo % P, P, <const double *>m,
                                <const double *>s, <const double *>b, _at(z, lo), relu, stream)
    elif data_t is float:
        fbn_rows_affine_out_f32(x + lo, y + lo, hi - lo, lo % P, P, <const float *>m,
                                <const float *>s, <const float *>b, _at(z, lo), relu, stream)
    elif not fbn_rows_affine_u16(bf16, x + lo, y + lo, hi - lo, lo % P, P,
                                 <const float *>m, <const float *>s, <const float *>b,
                                 _at(z, lo), relu, stream):
        while i < hi:
            nt = TILE if hi - i > TILE else hi - i
            fbn_u2f(bf16, x + i, scratch, nt)
            fbn_rows_affine_f32(scratch, scratch, nt, i % P, P, <const float *>m,
                                <const float *>s, <const float *>b,
                                _tile_of(bf16, _at(z, i), nt, scratch + TILE), relu)
            fbn_store_u16(bf16, y + i, scratch, nt, stream)
            i += nt
    if stream:
        fbn_sfence()


cdef void _rows_elemt_range(const data_t *dy, const data_t *x, data_t *dx, Py_ssize_t lo,
                            Py_ssize_t hi, Py_ssize_t P, const stat_t *m, const stat_t *kdy,
                            const stat_t *kx, const stat_t *kc, int stream,
                            float *scratch, bint bf16, const data_t *ys,
                            data_t *dz) noexcept nogil:
    """ys, dz: as _elemt_run."""
    cdef Py_ssize_t i = lo, nt
    cdef data_t *dzl = <data_t *>_at(dz, lo)
    if data_t is double:
        fbn_rows_elemt_out_f64(dy + lo, x + lo, dx + lo, hi - lo, lo % P, P,
                               <const double *>m, <const double *>kdy, <const double *>kx,
                               <const double *>kc, _at(ys, lo), dzl, stream)
    elif data_t is float:
        fbn_rows_elemt_out_f32(dy + lo, x + lo, dx + lo, hi - lo, lo % P, P,
                               <const float *>m, <const float *>kdy, <const float *>kx,
                               <const float *>kc, _at(ys, lo), dzl, stream)
    elif not fbn_rows_elemt_u16(bf16, dy + lo, x + lo, dx + lo, hi - lo, lo % P, P,
                                <const float *>m, <const float *>kdy, <const float *>kx,
                                <const float *>kc, _at(ys, lo), dzl, stream):
        while i < hi:
            nt = TILE if hi - i > TILE else hi - i
            fbn_u2f(bf16, dy + i, scratch, nt)
            fbn_u2f(bf16, x + i, scratch + TILE, nt)
            # dx over the x tile, g over the dy tile (as _elemt_run)
            fbn_rows_elemt_f32(scratch, scratch + TILE, scratch + TILE, nt, i % P, P,
                               <const float *>m, <const float *>kdy, <const float *>kx,
                               <const float *>kc,
                               _tile_of(bf16, _at(ys, i), nt, scratch + 2 * TILE),
                               scratch if dz != NULL else NULL)
            fbn_store_u16(bf16, dx + i, scratch + TILE, nt, stream)
            if dz != NULL:
                fbn_store_u16(bf16, dz + i, scratch, nt, 0)
            i += nt
    if stream:
        fbn_sfence()


# --- merging per-thread partials ----------------------------------------------

cdef void _merge_stats(const double *st, int T, Py_ssize_t C,  # IN: (T, 4, C)
                       double[::1] mean_out, double[::1] m2_out) noexcept nogil:  # OUT
    """Merge the per-thread (cnt, K, S1, S2) states (Chan, in thread order,
    means kept as offsets from the first thread's anchor: anchors are close,
    their difference exact)."""
    cdef Py_ssize_t c
    cdef int t
    cdef double cnt, a, off, m2, n_t, m2_t
    cdef const double *s
    for c in range(C):
        cnt = 0
        a = 0
        off = 0
        m2 = 0
        for t in range(T):
            s = st + t * 4 * C + c
            n_t = s[0]
            if n_t == 0:
                continue
            if cnt == 0:
                a = s[C]
            m2_t = s[3 * C] - s[2 * C] * s[2 * C] / n_t
            # clamp rounding below 0 only: NaN (a NaN or inf in the channel)
            # must pass through, never become 0 (`m2_t > 0` is false for NaN)
            fbn_chan_merge(&cnt, &off, &m2, n_t, (s[C] - a) + s[2 * C] / n_t,
                           0.0 if m2_t < 0 else m2_t)
        mean_out[c] = a + off
        m2_out[c] = m2


cdef void _merge_sums(const double *st, int T, Py_ssize_t C,          # IN: (T, 2, C)
                      stat_t *a_out, stat_t *b_out) noexcept nogil:  # OUT
    cdef Py_ssize_t c
    cdef int t
    cdef double a, b
    for c in range(C):
        a = 0
        b = 0
        for t in range(T):
            a += st[t * 2 * C + c]
            b += st[(t * 2 + 1) * C + c]
        a_out[c] = <stat_t>a
        b_out[c] = <stat_t>b


cdef float *_scratch_c(int T, Py_ssize_t per_thread, Py_ssize_t *ss) except NULL:
    """_scratch's float32 staging for 16-bit data, malloc'ed (the caller frees it):
    T rows of ss[0] floats."""
    ss[0] = max(per_thread, 3 * TILE)
    cdef float *p = <float *>malloc(<size_t>(T * ss[0]) * sizeof(float))
    if p == NULL:
        raise MemoryError()
    return p


def _scratch(data_kind, int T, Py_ssize_t per_thread):
    """Per-thread float32 staging for 16-bit data, data_kind "float16" (float16
    or bfloat16; a token array otherwise)."""
    if data_kind == "float16":
        return np.empty((T, max(per_thread, 3 * TILE)), dtype=np.float32)
    return np.empty((T, 1), dtype=np.float32)


cdef inline Py_ssize_t _row_tile(Py_ssize_t C) noexcept nogil:
    """Rows per tile: each tile costs a Chan merge per channel (~20 flops), so
    ROW_TILE = 256 rows amortises it; float32 partial sums then cover 256
    values per lane, as in the planes tiles."""
    return ROW_TILE


cdef inline Py_ssize_t _pf_rows(Py_ssize_t C, Py_ssize_t row_bytes_per_ch) noexcept nogil:
    """Prefetch distance of the rows reductions, in rows: ~PF_BYTES ahead (8 KiB
    measured best for 64-channel rows: 4 KiB and 16 KiB were slower)."""
    cdef Py_ssize_t r = PF_BYTES // (C * row_bytes_per_ch if C > 0 else 1)
    return r if r > 4 else 4


cdef inline bint _split_rows(Py_ssize_t O, int T) noexcept nogil:
    """Rows family: split the rows across threads (else the channels)."""
    return O >= 16 * T


cdef inline Py_ssize_t _period(Py_ssize_t C) noexcept nogil:
    """The period of the rows kernels' tiled constants (see _expand)."""
    cdef Py_ssize_t P = C
    while P % 4 != 0 or P < 64:
        P += C
    return P


cdef stat_t *_tiled(int k, const stat_t[::1] a, const stat_t[::1] b, const stat_t[::1] c,
                    const stat_t[::1] d, Py_ssize_t C, Py_ssize_t P) except NULL:
    """The first k of (a, b, c, d) tiled to period P as _expand does, in one malloc'ed
    block of k rows of P + 16 (the caller frees it): no numpy calls, for the per-call
    cost of small inputs."""
    cdef Py_ssize_t L = P + 16, i, j = 0
    cdef stat_t *cb = <stat_t *>malloc(<size_t>(k * L) * sizeof(stat_t))
    if cb == NULL:
        raise MemoryError()
    for i in range(L):
        cb[i] = a[j]
        cb[L + i] = b[j]
        cb[2 * L + i] = c[j]
        if k > 3:
            cb[3 * L + i] = d[j]
        j = j + 1 if j + 1 < C else 0
    return cb


def _expand(v, Py_ssize_t C):
    """Per-channel constants for the rows kernels, which run along a flat range:
    tiled to a period P that is a multiple of C and of 4 (every output vector
    then starts at the same column phase) and at least 64 (few channels make
    too short a row), plus 16 wrapped-around values so a vector starting at
    any column reads its constants contiguously."""
    cdef Py_ssize_t P = C
    while P % 4 != 0 or P < 64:
        P += C
    return np.ascontiguousarray(np.resize(v, P + 16)), P


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------

def stats(const data_t[:, :, ::1] x, int n_threads=1, bint bf16=False):  # IN
    """Per-channel ``mean`` and ``m2 = sum((x - mean)**2)`` over axes 0 and 2.

    One read of ``x``; shifted sums per tile about the running mean, tiles and
    threads merged in double with Chan's formula. ``bf16=True``: ``x`` (uint16)
    holds bfloat16, not float16 (so in every kernel below).

    Returns
    -------
    (mean, m2) : two (C,) arrays of the stat dtype.
    """
    if data_t is double:
        dt = np.float64
    else:
        dt = np.float32
    mean, m2 = _stats64(x, n_threads, bf16)
    return mean.astype(dt), m2.astype(dt)


def _stats64(const data_t[:, :, ::1] x, int n_threads, bint bf16):  # IN
    """stats() with float64 results (forward_train folds with the exact mean)."""
    cdef Py_ssize_t C = x.shape[1]
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    mean = np.empty(C, dtype=np.float64)
    m2 = np.empty(C, dtype=np.float64)
    if x.shape[0] * C * x.shape[2] == 0:
        mean.fill(np.nan)
        m2.fill(0)
        return mean, m2
    cdef double[::1] mean_v = mean, m2_v = m2
    _stats64_c(x, n_threads, bf16, mean_v, m2_v)
    return mean, m2


cdef int _stats64_c(const data_t[:, :, ::1] x, int n_threads, bint bf16,
                    double[::1] mean_v, double[::1] m2_v) except -1:
    """_stats64 into mean_v, m2_v (N > 0); its workspace malloc'ed (no numpy calls
    on the small-input path)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I, R = _row_tile(C), c0, c1, blk
    cdef int T = _team(N, n_threads), t
    cdef bint by_rows = _split_rows(O, T)
    cdef float *sp = NULL
    cdef Py_ssize_t ss = 0
    cdef Py_ssize_t kstride = C * (sizeof(double) if data_t is double else sizeof(float))
    cdef double *st = <double *>calloc(<size_t>(T * 4 * C), sizeof(double))
    cdef char *kbuf = <char *>malloc(<size_t>(T * kstride))
    cdef const data_t *xp = &x[0, 0, 0]
    try:
        if st == NULL or kbuf == NULL:
            raise MemoryError()
        if I > 1:
            if data_t is uint16_t:
                sp = _scratch_c(T, TILE, &ss)
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    _planes_stats_range(xp, _cut(N, t, T), _cut(N, t + 1, T), C, I,
                                        st + t * 4 * C, sp + t * ss, bf16)
        else:
            if data_t is uint16_t:
                if R * C > 1 << 20:
                    R = max(1, (1 << 20) // C)
                sp = _scratch_c(T, R * C, &ss)
            blk = 16   # channel-split granularity: 64-byte boundaries for float32
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    if by_rows:
                        _rows_stats_range(xp, _cut(O, t, T), _cut(O, t + 1, T), 0, C, C,
                                          st + t * 4 * C, kbuf + t * kstride, sp + t * ss, R,
                                          bf16)
                    else:
                        c0 = _cut(C // blk, t, T) * blk
                        c1 = C if t == T - 1 else _cut(C // blk, t + 1, T) * blk
                        _rows_stats_range(xp, 0, O, c0, c1, C, st + t * 4 * C,
                                          kbuf + t * kstride, sp + t * ss, R, bf16)
        with nogil:
            _merge_stats(st, T, C, mean_v, m2_v)
    finally:
        free(st)
        free(kbuf)
        free(sp)
    return 0


cdef int _optional(object a, const data_t[:, :, ::1] like, str name, bint writable,
                   data_t **ptr) except -1:
    """ptr[0] = the data of the epilogue array a, an array of like's shape and type
    (writable: an output), or NULL when a is None (or empty)."""
    cdef const data_t[:, :, ::1] v
    cdef data_t[:, :, ::1] w
    ptr[0] = NULL
    if a is None:
        return 0
    if writable:
        w = a
        v = w
    else:
        v = a
    if v.shape[0] != like.shape[0] or v.shape[1] != like.shape[1] or v.shape[2] != like.shape[2]:
        raise ValueError(f"{name}: expected shape {(like.shape[0], like.shape[1], like.shape[2])}, "
                         f"got {(v.shape[0], v.shape[1], v.shape[2])}")
    if v.shape[0] * v.shape[1] * v.shape[2] > 0:
        ptr[0] = <data_t *>&v[0, 0, 0]
    return 0


def _kind_of(const data_t[:, :, ::1] x):
    """The data kind: float64, float32, or float16 for any 16-bit data (bfloat16 too)."""
    if data_t is double:
        return "float64"
    elif data_t is float:
        return "float32"
    return "float16"


def normalize(const data_t[:, :, ::1] x,      # IN
              const stat_t[::1] mean,         # IN
              const stat_t[::1] scale,        # IN
              const stat_t[::1] shift,        # IN
              data_t[:, :, ::1] y,            # OUT
              int n_threads=1, bint bf16=False,
              z=None,                         # IN (optional)
              bint relu=False):
    """Write ``y = act((x - mean)*scale + shift [+ z])`` (per-channel vectors
    broadcast): ``z`` (like x, or None) a residual added, ``relu`` the activation
    ``0 where v < 0 else v`` (NaN stays NaN); in the stat dtype, rounded once.
    ``y`` may be ``z`` itself.

    Threads take contiguous slices in memory order. Streaming stores when y is
    large, 64-byte aligned and already touched (see fbn_should_stream)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I
    if data_t is double:
        if stat_t is float:
            raise TypeError("mean, scale, shift: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    elif stat_t is double:
        raise TypeError("mean, scale, shift: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    if N == 0:
        return
    cdef data_t *zp
    _optional(z, x, "z", False, &zp)
    _normalize_c(x, mean, scale, shift, y, n_threads, bf16, zp, relu)


cdef int _normalize_c(const data_t[:, :, ::1] x, const stat_t[::1] mean,
                      const stat_t[::1] scale, const stat_t[::1] shift, data_t[:, :, ::1] y,
                      int n_threads, bint bf16, const data_t *zp, bint relu) except -1:
    """normalize() once its arguments are checked (N > 0): also the second step of
    forward_train's composed path, called without going through Python."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I, P, L
    cdef int T = _team(N, n_threads), t
    cdef int stream = fbn_should_stream(&y[0, 0, 0], <size_t>N * sizeof(data_t))
    cdef float *sp = NULL
    cdef Py_ssize_t ss = 0
    cdef stat_t *cb = NULL
    cdef const data_t *xp = &x[0, 0, 0]
    cdef data_t *yp = &y[0, 0, 0]
    try:
        if data_t is uint16_t:
            sp = _scratch_c(T, TILE, &ss)
        if I > 1:
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    _planes_affine_range(xp, yp, _cut(N, t, T), _cut(N, t + 1, T), C, I,
                                         &mean[0], &scale[0], &shift[0], stream, sp + t * ss,
                                         bf16, zp, relu)
            return 0
        P = _period(C)
        L = P + 16
        cb = _tiled(3, mean, scale, shift, shift, C, P)
        with nogil:
            for t in prange(T, schedule='static', num_threads=T):
                _rows_affine_range(xp, yp, _cut(N, t, T), _cut(N, t + 1, T), P, cb, cb + L,
                                   cb + 2 * L, stream, sp + t * ss, bf16, zp, relu)
    finally:
        free(cb)
        free(sp)
    return 0


def backward_reduce(const data_t[:, :, ::1] dy,   # IN
                    const data_t[:, :, ::1] x,    # IN
                    const stat_t[::1] mean,       # IN
                    int n_threads=1, bint bf16=False,
                    ys=None):                     # IN (optional)
    """Per-channel ``sum(dy)`` and ``sum(dy*(x - mean))`` in one read of (dy, x).

    ``ys`` (like x, or None): the saved output of a forward with relu; dy is then
    taken as ``g = dy where ys > 0 else 0`` (read with dy and x).

    Element-type partial sums per tile (<= 2048 values, or one row tile),
    accumulated in double per thread and channel.

    Returns
    -------
    (sum_dy, sum_dy_xmu) : two (C,) arrays of the stat dtype.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I
    if data_t is double:
        if stat_t is float:
            raise TypeError("mean: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    elif stat_t is double:
        raise TypeError("mean: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    if data_t is double:
        dt = np.float64
    else:
        dt = np.float32
    sum_dy = np.zeros(C, dtype=dt)
    sum_dy_xmu = np.zeros(C, dtype=dt)
    if N == 0:
        return sum_dy, sum_dy_xmu
    cdef data_t *yp
    _optional(ys, x, "ys", False, &yp)
    cdef stat_t[::1] a_v = sum_dy, b_v = sum_dy_xmu
    _backward_reduce_c(dy, x, mean, n_threads, bf16, yp, &a_v[0], &b_v[0])
    return sum_dy, sum_dy_xmu


cdef int _backward_reduce_c(const data_t[:, :, ::1] dy, const data_t[:, :, ::1] x,
                            const stat_t[::1] mean, int n_threads, bint bf16,
                            const data_t *yp, stat_t *a_out, stat_t *b_out) except -1:
    """backward_reduce() once its arguments are checked (N > 0), into a_out, b_out."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I, R = _row_tile(C), c0, c1, blk
    cdef int T = _team(2 * N, n_threads), t
    cdef bint by_rows = _split_rows(O, T)
    cdef float *sp = NULL
    cdef Py_ssize_t ss = 0
    cdef double *st = <double *>calloc(<size_t>(T * 2 * C), sizeof(double))
    cdef const data_t *gp = &dy[0, 0, 0]
    cdef const data_t *xp = &x[0, 0, 0]
    cdef const stat_t *mp = &mean[0]
    if st == NULL:
        raise MemoryError()
    try:
        if I > 1:
            if data_t is uint16_t:
                sp = _scratch_c(T, 3 * TILE, &ss)
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    _planes_dot_range(gp, xp, _cut(N, t, T), _cut(N, t + 1, T), C, I, mp,
                                      st + t * 2 * C, st + (t * 2 + 1) * C, sp + t * ss, bf16,
                                      yp)
        else:
            if data_t is uint16_t:
                if R * C > 1 << 19:
                    R = max(1, (1 << 19) // C)
                sp = _scratch_c(T, (2 if yp == NULL else 3) * R * C, &ss)
            blk = 16   # channel-split granularity: 64-byte boundaries for float32
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    if by_rows:
                        _rows_dot_range(gp, xp, _cut(O, t, T), _cut(O, t + 1, T), 0, C, C, mp,
                                        st + t * 2 * C, st + (t * 2 + 1) * C, sp + t * ss, R,
                                        bf16, yp)
                    else:
                        c0 = _cut(C // blk, t, T) * blk
                        c1 = C if t == T - 1 else _cut(C // blk, t + 1, T) * blk
                        _rows_dot_range(gp, xp, 0, O, c0, c1, C, mp, st + t * 2 * C,
                                        st + (t * 2 + 1) * C, sp + t * ss, R, bf16, yp)
        with nogil:
            _merge_sums(st, T, C, a_out, b_out)
    finally:
        free(st)
        free(sp)
    return 0


def backward_elemt(const data_t[:, :, ::1] dy,    # IN
                   const data_t[:, :, ::1] x,     # IN
                   const stat_t[::1] mean,        # IN
                   const stat_t[::1] k_dy,        # IN
                   const stat_t[::1] k_x,         # IN
                   const stat_t[::1] k_c,         # IN
                   data_t[:, :, ::1] dx,          # OUT
                   int n_threads=1, bint bf16=False,
                   ys=None,                       # IN (optional)
                   dz=None):                      # OUT (optional)
    """Write ``dx = k_dy*dy + k_x*(x - mean) + k_c`` (per-channel vectors broadcast).

    ``ys`` (like x, or None): dy is taken as ``g = dy where ys > 0 else 0`` (see
    :func:`backward_reduce`); ``dz`` (like x, or None): written ``g``."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I
    if data_t is double:
        if stat_t is float:
            raise TypeError("mean, k_dy, k_x, k_c: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    elif stat_t is double:
        raise TypeError("mean, k_dy, k_x, k_c: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    if N == 0:
        return
    cdef data_t *yp
    cdef data_t *dzp
    _optional(ys, x, "ys", False, &yp)
    _optional(dz, x, "dz", True, &dzp)
    _backward_elemt_c(dy, x, mean, k_dy, k_x, k_c, dx, n_threads, bf16, yp, dzp)


cdef int _backward_elemt_c(const data_t[:, :, ::1] dy, const data_t[:, :, ::1] x,
                           const stat_t[::1] mean, const stat_t[::1] k_dy,
                           const stat_t[::1] k_x, const stat_t[::1] k_c,
                           data_t[:, :, ::1] dx, int n_threads, bint bf16, const data_t *yp,
                           data_t *dzp) except -1:
    """backward_elemt() once its arguments are checked (N > 0)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t N = O * C * I, P, L
    cdef int T = _team(2 * N, n_threads), t
    cdef int stream = fbn_should_stream(&dx[0, 0, 0], <size_t>N * sizeof(data_t))
    cdef float *sp = NULL
    cdef Py_ssize_t ss = 0
    cdef stat_t *cb = NULL
    cdef const data_t *gp = &dy[0, 0, 0]
    cdef const data_t *xp = &x[0, 0, 0]
    cdef data_t *dp = &dx[0, 0, 0]
    try:
        if data_t is uint16_t:
            sp = _scratch_c(T, 3 * TILE, &ss)
        if I > 1:
            with nogil:
                for t in prange(T, schedule='static', num_threads=T):
                    _planes_elemt_range(gp, xp, dp, _cut(N, t, T), _cut(N, t + 1, T), C, I,
                                        &mean[0], &k_dy[0], &k_x[0], &k_c[0], stream,
                                        sp + t * ss, bf16, yp, dzp)
            return 0
        P = _period(C)
        L = P + 16
        cb = _tiled(4, mean, k_dy, k_x, k_c, C, P)
        with nogil:
            for t in prange(T, schedule='static', num_threads=T):
                _rows_elemt_range(gp, xp, dp, _cut(N, t, T), _cut(N, t + 1, T), P, cb, cb + L,
                                  cb + 2 * L, cb + 3 * L, stream, sp + t * ss, bf16, yp, dzp)
    finally:
        free(cb)
        free(sp)
    return 0


# --- fused per-channel paths ----------------------------------------------------

cdef void _fused_forward_channel(const data_t *x, data_t *y, Py_ssize_t O, Py_ssize_t C,
                                 Py_ssize_t I, Py_ssize_t c, const stat_t *weight,
                                 const stat_t *bias, double eps, stat_t *mean_out,
                                 stat_t *m2_out, int stream, float *scratch,
                                 bint bf16, const data_t *z, bint relu) noexcept nogil:
    """Statistics of channel c, then its normalization (and epilogue: z, relu as
    _affine_run) while it is still in L2."""
    cdef double cnt = 0, K = 0, S1 = 0, S2 = 0, mean, m2, invstd, scale, shift
    cdef Py_ssize_t o, k, j, nt, ahead = _planes_ahead(I, sizeof(data_t))
    for o in range(O):
        # prefetch the channel's plane `ahead` planes on (>= PF_BYTES ahead):
        # short planes far apart defeat the hardware prefetchers
        _stats_run(x + (o * C + c) * I, I, &cnt, &K, &S1, &S2, scratch,
                   ahead * C * I if o + ahead < O else 0, bf16)
    mean = K + S1 / cnt
    m2 = S2 - S1 * S1 / cnt
    if m2 < 0:
        m2 = 0
    invstd = 1.0 / sqrt(m2 / cnt + eps)
    scale = weight[c] * invstd
    # (x - m)*s + b with m the stat-dtype mean: fold its rounding error into
    # the shift so large-mean channels lose nothing to it.
    shift = bias[c] - ((mean - <double>(<stat_t>mean)) * scale)
    for o in range(O):
        k = (o * C + c) * I
        if z == NULL:
            _affine_run(x + k, y + k, I, <stat_t>mean, scale, shift, stream, scratch, bf16,
                        NULL, relu)
            continue
        # x comes from L2, the residual from memory (its short planes far apart):
        # in runs of PF_BYTES, each with the same run `ahead` planes on prefetched
        # (measured, 2 threads, cold, (32, 64, 56, 56): 0.85-0.9x the time without)
        j = 0
        while j < I:
            nt = PF_BYTES // sizeof(data_t) if I - j > PF_BYTES // sizeof(data_t) else I - j
            if o + ahead < O:
                fbn_prefetch_bytes(z + k + ahead * C * I + j, <size_t>nt * sizeof(data_t))
            _affine_run(x + k + j, y + k + j, nt, <stat_t>mean, scale, shift, stream, scratch,
                        bf16, z + k + j, relu)
            j += nt
    mean_out[c] = <stat_t>mean
    m2_out[c] = <stat_t>m2


cdef void _fused_backward_channel(const data_t *dy, const data_t *x, data_t *dx, Py_ssize_t O,
                                  Py_ssize_t C, Py_ssize_t I, Py_ssize_t c,
                                  const stat_t *mean, const stat_t *invstd,
                                  const stat_t *weight, stat_t *sdy_out, stat_t *sdyx_out,
                                  int stream, float *scratch, bint bf16, const data_t *ys,
                                  data_t *dz) noexcept nogil:
    """Both reductions of channel c, then its dx while (dy, x) are still in L2 (ys,
    dz: as _elemt_run)."""
    cdef double sdy = 0, sdyx = 0, n = <double>O * I, w_is, kdy, kx, kc
    cdef double m = mean[c], istd = invstd[c]
    cdef Py_ssize_t o, p, k, ahead = _planes_ahead(I, (3 if ys != NULL else 2) * sizeof(data_t))
    for o in range(O):
        k = (o * C + c) * I
        _dot_run(dy + k, x + k, I, m, &sdy, &sdyx, scratch,
                 ahead * C * I if o + ahead < O else 0, bf16, _at(ys, k))
    w_is = weight[c] * istd
    kdy = w_is
    kx = -w_is * istd * istd * sdyx / n
    kc = -w_is * sdy / n
    for o in range(O):
        p = o
        if ys != NULL:
            # (dy, x, ys) of a channel may not all fit in L2: the planes read last
            # (still in L2) are taken first, and the planes ahead are prefetched
            p = O - 1 - o
            _prefetch_plane(dy, p - ahead, O, C, I, c)
            _prefetch_plane(x, p - ahead, O, C, I, c)
            _prefetch_plane(ys, p - ahead, O, C, I, c)
        k = (p * C + c) * I
        _elemt_run(dy + k, x + k, dx + k, I, m, <stat_t>kdy, <stat_t>kx, <stat_t>kc, stream,
                   scratch, bf16, _at(ys, k), <data_t *>_at(dz, k))
    sdy_out[c] = <stat_t>sdy
    sdyx_out[c] = <stat_t>sdyx


cdef inline void _prefetch_plane(const data_t *p, Py_ssize_t o, Py_ssize_t O, Py_ssize_t C,
                                 Py_ssize_t I, Py_ssize_t c) noexcept nogil:
    """Prefetch plane o (of O) of channel c, if there is one."""
    if 0 <= o < O:
        fbn_prefetch_bytes(p + (o * C + c) * I, <size_t>I * sizeof(data_t))


cdef inline Py_ssize_t _planes_ahead(Py_ssize_t I, Py_ssize_t bytes_per_value) noexcept nogil:
    """Prefetch distance of the per-channel walks, in planes: >= PF_BYTES."""
    cdef Py_ssize_t plane = I * bytes_per_value
    return (PF_BYTES + plane - 1) // plane if plane > 0 else 1


cdef inline bint _fuse(Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, Py_ssize_t bytes_per_value,
                       int T, Py_ssize_t limit) noexcept nogil:
    """Per-channel fusion pays when a channel's bytes fit in L2 and the channels
    share out evenly over the threads (planes only)."""
    if I <= 1 or O * I * bytes_per_value > limit:
        return False
    return C >= 4 * T or C % T == 0


def forward_train(const data_t[:, :, ::1] x,    # IN
                  const stat_t[::1] weight,     # IN
                  const stat_t[::1] bias,       # IN
                  double eps,
                  data_t[:, :, ::1] y,          # OUT
                  int n_threads=1, bint bf16=False,
                  z=None,                       # IN (optional)
                  bint relu=False):
    """Training forward: statistics, then ``y = (x - mean)*scale + bias`` with
    ``scale = weight/sqrt(m2/n + eps)``; then the epilogue ``z``, ``relu`` as in
    :func:`normalize`, in the same store step.

    Fused per channel (the second read comes from L2) when a channel is small
    enough; otherwise the stats kernel then the normalize kernel.

    Returns
    -------
    (mean, m2) : as :func:`stats`.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2], c
    cdef Py_ssize_t N = O * C * I
    cdef int T = _team(N, n_threads), t
    cdef int stream
    cdef double n = <double>(O * I), mu, invstd, sc
    cdef float[:, ::1] scr
    cdef data_t *zp
    cdef const double[::1] m64_v, v64_v
    cdef stat_t[::1] ms_v, sc_v, sh_v
    if data_t is double:
        if stat_t is float:
            raise TypeError("weight, bias: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    elif stat_t is double:
        raise TypeError("weight, bias: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    if data_t is double:
        dt = np.float64
    else:
        dt = np.float32
    # (with a residual too: measured, 2 threads, cold caches, (32, 64, 56, 56), fused
    # 0.35-0.4x the wall time of the composed path; CPU time 1.3x, the residual's
    # planes read at latency)
    if N == 0 or not _fuse(O, C, I, sizeof(data_t), T, _fuse_fwd_max):
        mean64, m2_64 = _stats64(x, n_threads, bf16)
        mean = mean64.astype(dt)
        if N == 0:
            return mean, m2_64.astype(dt)
        scale = np.empty(C, dtype=dt)
        shift = np.empty(C, dtype=dt)
        # the cdef steps directly (no Python calls: per-call cost of small inputs)
        m64_v = mean64
        v64_v = m2_64
        ms_v = mean
        sc_v = scale
        sh_v = shift
        _fold_forward(m64_v, v64_v, ms_v, weight, bias, eps, n, sc_v, sh_v)
        _optional(z, x, "z", False, &zp)
        _normalize_c(x, ms_v, sc_v, sh_v, y, n_threads, bf16, zp, relu)
        return mean, m2_64.astype(dt)
    mean = np.empty(C, dtype=dt)
    m2 = np.empty(C, dtype=dt)
    cdef stat_t[::1] mean_v = mean, m2_v = m2
    _optional(z, x, "z", False, &zp)
    stream = fbn_should_stream(&y[0, 0, 0], <size_t>N * sizeof(data_t))
    scr = _scratch("float16" if data_t is uint16_t else "", T, TILE)
    cdef const data_t *xp = &x[0, 0, 0]
    cdef data_t *yp = &y[0, 0, 0]
    with nogil:
        for t in prange(T, schedule='static', num_threads=T):
            for c in range(_cut(C, t, T), _cut(C, t + 1, T)):
                _fused_forward_channel(xp, yp, O, C, I, c, &weight[0], &bias[0], eps,
                                       &mean_v[0], &m2_v[0], stream, &scr[t, 0], bf16, zp,
                                       relu)
            if stream:
                fbn_sfence()
    return mean, m2


def _fold_forward_py(const double[::1] mean64, const double[::1] m2, const stat_t[::1] mean,
                     const stat_t[::1] weight, const stat_t[::1] bias, double eps, double n,
                     stat_t[::1] scale, stat_t[::1] shift):
    with nogil:
        _fold_forward(mean64, m2, mean, weight, bias, eps, n, scale, shift)


def _fold_backward_py(const stat_t[::1] sum_dy, const stat_t[::1] sum_dy_xmu,
                      const stat_t[::1] invstd, const stat_t[::1] weight, double n,
                      stat_t[::1] k_dy, stat_t[::1] k_x, stat_t[::1] k_c):
    with nogil:
        _fold_backward(sum_dy, sum_dy_xmu, invstd, weight, n, k_dy, k_x, k_c)


cdef void _fold_forward(const double[::1] mean64, const double[::1] m2,    # IN
                        const stat_t[::1] mean,                             # IN
                        const stat_t[::1] weight, const stat_t[::1] bias,  # IN
                        double eps, double n,
                        stat_t[::1] scale, stat_t[::1] shift) noexcept nogil:  # OUT
    """scale = weight/sqrt(m2/n + eps), shift = bias, in double; normalize
    subtracts the stat-dtype mean, so its rounding error moves into the shift
    (large-mean float32 channels keep full accuracy)."""
    cdef Py_ssize_t c
    cdef double sc
    for c in range(mean64.shape[0]):
        sc = weight[c] / sqrt(m2[c] / n + eps)
        scale[c] = <stat_t>sc
        shift[c] = <stat_t>(bias[c] - (mean64[c] - <double>mean[c]) * sc)


def backward_train(const data_t[:, :, ::1] dy,   # IN
                   const data_t[:, :, ::1] x,    # IN
                   const stat_t[::1] mean,       # IN
                   const stat_t[::1] invstd,     # IN
                   const stat_t[::1] weight,     # IN
                   data_t[:, :, ::1] dx,         # OUT
                   int n_threads=1, bint bf16=False,
                   ys=None,                      # IN (optional)
                   dz=None):                     # OUT (optional)
    """Training backward (``ys``, ``dz``: the relu mask and the residual's
    gradient, as in :func:`backward_elemt`): the two reductions, then
    ``dx = k_dy*dy + k_x*(x - mean) + k_c`` with ``k_dy = w*invstd``,
    ``k_x = -w*invstd**3*sum_dy_xmu/n``, ``k_c = -w*invstd*sum_dy/n``.

    Fused per channel when (dy, x) of one channel fit in L2; otherwise the
    reduce kernel then the element-wise kernel.

    Returns
    -------
    (sum_dy, sum_dy_xmu) : as :func:`backward_reduce`.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2], c
    cdef Py_ssize_t N = O * C * I
    cdef int T = _team(2 * N, n_threads), t
    cdef int stream
    cdef double n = <double>(O * I)
    cdef float[:, ::1] scr
    cdef data_t *yp
    cdef data_t *dzp
    cdef stat_t[:, ::1] kv
    if data_t is double:
        if stat_t is float:
            raise TypeError("mean, invstd, weight: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    elif stat_t is double:
        raise TypeError("mean, invstd, weight: expected float64 for float64 data, "
                        "float32 for float16/bfloat16/float32 data")
    if bf16 and data_t is not uint16_t:
        raise TypeError(_BF16_DATA)
    if data_t is double:
        dt = np.float64
    else:
        dt = np.float32
    # with ys, fused where the plain backward is: the second read prefetches the
    # planes of (dy, x, ys), which may not all fit in L2 (measured, 2 threads, S/M
    # NCHW, CPU time: 1.41-1.46x the plain backward fused, 1.62x composed)
    if N == 0 or not _fuse(O, C, I, 2 * sizeof(data_t), T, _fuse_bwd_max):
        if N == 0:
            return backward_reduce(dy, x, mean, n_threads, bf16, ys)
        # the cdef steps directly (no Python calls: per-call cost of small inputs)
        _optional(ys, x, "ys", False, &yp)
        _optional(dz, x, "dz", True, &dzp)
        k = np.empty((5, C), dtype=dt)
        kv = k
        _backward_reduce_c(dy, x, mean, n_threads, bf16, yp, &kv[0, 0], &kv[1, 0])
        _fold_backward(kv[0], kv[1], invstd, weight, n, kv[2], kv[3], kv[4])
        _backward_elemt_c(dy, x, mean, kv[2], kv[3], kv[4], dx, n_threads, bf16, yp, dzp)
        return k[0], k[1]
    sum_dy = np.empty(C, dtype=dt)
    sum_dy_xmu = np.empty(C, dtype=dt)
    cdef stat_t[::1] a_v = sum_dy, b_v = sum_dy_xmu
    _optional(ys, x, "ys", False, &yp)
    _optional(dz, x, "dz", True, &dzp)
    stream = fbn_should_stream(&dx[0, 0, 0], <size_t>N * sizeof(data_t))
    scr = _scratch("float16" if data_t is uint16_t else "", T, 3 * TILE)
    cdef const data_t *gp = &dy[0, 0, 0]
    cdef const data_t *xp = &x[0, 0, 0]
    cdef data_t *dp = &dx[0, 0, 0]
    with nogil:
        for t in prange(T, schedule='static', num_threads=T):
            for c in range(_cut(C, t, T), _cut(C, t + 1, T)):
                _fused_backward_channel(gp, xp, dp, O, C, I, c, &mean[0], &invstd[0],
                                        &weight[0], &a_v[0], &b_v[0], stream, &scr[t, 0], bf16,
                                        yp, dzp)
            if stream:
                fbn_sfence()
    return sum_dy, sum_dy_xmu


cdef void _fold_backward(const stat_t[::1] sum_dy, const stat_t[::1] sum_dy_xmu,  # IN
                         const stat_t[::1] invstd, const stat_t[::1] weight,      # IN
                         double n, stat_t[::1] k_dy, stat_t[::1] k_x,             # OUT
                         stat_t[::1] k_c) noexcept nogil:                        # OUT
    cdef Py_ssize_t c
    cdef double w_is, istd
    for c in range(sum_dy.shape[0]):
        istd = invstd[c]
        w_is = weight[c] * istd
        k_dy[c] = <stat_t>w_is
        k_x[c] = <stat_t>(-w_is * istd * istd * <double>sum_dy_xmu[c] / n)
        k_c[c] = <stat_t>(-w_is * <double>sum_dy[c] / n)


# ----------------------------------------------------------------------------
# memory-bandwidth yardsticks
# ----------------------------------------------------------------------------

def stream_read(const floating[::1] src, int n_threads=1):  # IN
    """Read every element once (the memory-read floor); return their sum.

    The threads read contiguous equal slices with the same vectorised loop and
    software prefetch the reductions use, so a kernel's time divided by this
    is its overhead over one pass."""
    cdef Py_ssize_t n = src.shape[0]
    cdef int T = _team(n, n_threads), t
    cdef double[::1] part = np.zeros(max(T, 1), dtype=np.float64)
    if n == 0:
        return 0.0
    cdef const floating *p = &src[0]
    with nogil:
        for t in prange(T, schedule='static', num_threads=T):
            if floating is double:
                part[t] = fbn_sum_f64(p + _cut(n, t, T), _cut(n, t + 1, T) - _cut(n, t, T),
                                      p + _cut(n, t, T) + PF_BYTES // sizeof(double))
            else:
                part[t] = fbn_sum_f32(p + _cut(n, t, T), _cut(n, t + 1, T) - _cut(n, t, T),
                                      p + _cut(n, t, T) + PF_BYTES // sizeof(float))
    return float(np.sum(part))


def stream_copy(const floating[::1] src, floating[::1] dst, int n_threads=1):  # IN, OUT
    """Copy src into dst (the memory-write floor).

    Streaming (non-temporal) stores when dst is 64-byte aligned, ordinary
    stores otherwise; each thread's slice starts on a 64-byte boundary."""
    cdef Py_ssize_t n = src.shape[0], per_line = 64 // sizeof(floating), lines
    cdef int T = _team(n, n_threads), t
    cdef bint stream = (<uintptr_t>&dst[0] & 63) == 0 if n > 0 else False
    if dst.shape[0] != n:
        raise ValueError("dst: expected the same length as src")
    if n == 0:
        return
    lines = (n + per_line - 1) // per_line
    cdef const floating *s = &src[0]
    cdef floating *d = &dst[0]
    with nogil:
        for t in prange(T, schedule='static', num_threads=T):
            _copy_slice(s, d, min(n, _cut(lines, t, T) * per_line),
                        min(n, _cut(lines, t + 1, T) * per_line), stream)


cdef void _copy_slice(const floating *s, floating *d, Py_ssize_t lo, Py_ssize_t hi,
                      bint stream) noexcept nogil:
    if hi <= lo:
        return
    if stream:
        fbn_stream_bytes(d + lo, s + lo, <size_t>(hi - lo) * sizeof(floating))
        fbn_sfence()
    else:
        memcpy(d + lo, s + lo, <size_t>(hi - lo) * sizeof(floating))
