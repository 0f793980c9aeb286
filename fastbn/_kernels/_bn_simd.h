/* Inner loops of the fastbn CPU kernels: contiguous runs, no threads, no Python.
 *
 * Everything here is plain C that gcc/clang vectorise at -O3 for the portable
 * x86-64 baseline (SSE2): reductions keep FBN_LANES independent partial sums in
 * a small array, which the compiler keeps in vector registers (no -ffast-math
 * needed, results do not depend on the vector width). The only intrinsics are
 * SSE2 streaming stores, the prefetch hint and sfence, all behind FBN_X86 with
 * a plain fallback, so the file compiles on any target.
 *
 * The float and double versions of each loop are instantiated from
 * _bn_simd_t.h (included twice below); float16 data is converted to float32
 * on the way in and rounded back (round-to-nearest-even) on the way out.
 */
#ifndef FASTBN_BN_SIMD_H
#define FASTBN_BN_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)
#include <emmintrin.h>
#define FBN_X86 1
#else
#define FBN_X86 0
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#define FBN_HAVE_MINCORE 1
#else
#define FBN_HAVE_MINCORE 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FBN_VEXT 1
#else
#define FBN_VEXT 0   /* scalar loops: correct everywhere, vectorised where the compiler can */
#endif

/* Independent partial sums per reduction: 16 floats = 4 SSE / 2 AVX registers,
 * enough to hide the add latency. */
#define FBN_LANES 16
/* Channels per block in the wide rows kernels (two L1 arrays of partial sums). */
#define FBN_WIDE 1024
/* Elements per staging buffer (outputs computed here, then streamed out). */
#define FBN_STAGE 1024
/* Outputs smaller than this are written with ordinary stores: they fit in the
 * last-level cache and whoever reads them next finds them there. */
#define FBN_STREAM_MIN_BYTES ((size_t)1 << 20)

static inline void fbn_prefetch(const void *p)
{
#if FBN_X86
    _mm_prefetch((const char *)p, _MM_HINT_T0);
#elif defined(__GNUC__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
}

/* Prefetch into L2 only (far-ahead streams: more lines in flight than L1 holds). */
static inline void fbn_prefetch_l2(const void *p)
{
#if FBN_X86
    _mm_prefetch((const char *)p, _MM_HINT_T1);
#elif defined(__GNUC__)
    __builtin_prefetch(p, 0, 2);
#else
    (void)p;
#endif
}

static inline void fbn_sfence(void)
{
#if FBN_X86
    _mm_sfence();
#endif
}

/* Copy n bytes to dst with non-temporal stores for the 16-byte-aligned body
 * (dst need not be aligned: the head and tail go through memcpy). */
static inline void fbn_stream_bytes(void *dst_, const void *src_, size_t n)
{
    char *dst = (char *)dst_;
    const char *src = (const char *)src_;
#if FBN_X86
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15, i = 0;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    for (; i + 16 <= n; i += 16)
        _mm_stream_si128((__m128i *)(dst + i), _mm_loadu_si128((const __m128i *)(src + i)));
    memcpy(dst + i, src + i, n - i);
#else
    memcpy(dst, src, n);
#endif
}

/* Whether an output of nbytes at p should be written with streaming stores:
 * only when it is large, 64-byte aligned (a caller's out= buffer; numpy's own
 * large allocations are 16 mod 64) and already touched. Streaming into fresh,
 * never-touched pages takes a page fault per 4 KiB under the streaming store
 * and was measured 8x slower than ordinary stores, so on Linux the first,
 * middle and last pages must be resident (mincore). */
static inline int fbn_should_stream(const void *p, size_t nbytes)
{
#if FBN_X86
    if (nbytes < FBN_STREAM_MIN_BYTES || ((uintptr_t)p & 63) != 0)
        return 0;
#if FBN_HAVE_MINCORE
    {
        long page = sysconf(_SC_PAGESIZE);
        uintptr_t lo, probes[3];
        int k;
        if (page <= 0)
            return 0;
        lo = (uintptr_t)p & ~(uintptr_t)(page - 1);
        probes[0] = lo;
        probes[1] = ((uintptr_t)p + nbytes / 2) & ~(uintptr_t)(page - 1);
        probes[2] = ((uintptr_t)p + nbytes - 1) & ~(uintptr_t)(page - 1);
        for (k = 0; k < 3; k++) {
            unsigned char vec = 0;
            if (mincore((void *)probes[k], 1, &vec) != 0 || !(vec & 1))
                return 0;
        }
    }
#endif
    return 1;
#else
    (void)p;
    (void)nbytes;
    return 0;
#endif
}

/* ---- Chan's merge of (count, mean, M2) states, in double ---- */

static inline void fbn_chan_merge(double *cnt, double *mean, double *m2,
                                  double n_b, double mean_b, double m2_b)
{
    double n_a = *cnt, n = n_a + n_b, d;
    if (n_b == 0)
        return;
    if (n_a == 0) {
        *cnt = n_b;
        *mean = mean_b;
        *m2 = m2_b;
        return;
    }
    d = mean_b - *mean;
    *mean += d * (n_b / n);
    *m2 += m2_b + d * d * (n_a * n_b / n);
    *cnt = n;
}

/* Add one tile's shifted sums (n_t values, shift k, s1 = sum(x-k),
 * s2 = sum((x-k)^2)) to a channel's state (cnt, K, S1, S2): sums about the
 * channel's fixed anchor K (its first tile's mean). Tiles are shifted by the
 * running mean, so their element-type partial sums never cancel; moving them
 * to the anchor frame is exact-ish double arithmetic (d = k - K is exact by
 * Sterbenz), with no division: this runs once per plane, and M-shaped planes
 * are only 3 KiB. mean = K + S1/cnt, M2 = S2 - S1^2/cnt at the end. */
static inline void fbn_add_tile(double *cnt, double *K, double *S1, double *S2,
                                double n_t, double k, double s1, double s2)
{
    double d;
    if (*cnt == 0)
        *K = k;
    d = k - *K;
    *S2 += s2 + d * (2.0 * s1 + n_t * d);
    *S1 += s1 + n_t * d;
    *cnt += n_t;
}

/* ---- float16 <-> float32 (bit manipulation; exact, round-to-nearest-even) ---- */

typedef union {
    uint32_t u;
    float f;
} fbn_bits32;

static inline float fbn_half_to_float(uint16_t h)
{
    /* F. Giesen's half_to_float_fast5: exact for every half, incl. subnormals,
     * without ever multiplying a float subnormal (safe under DAZ). */
    const fbn_bits32 magic = {113u << 23};
    const uint32_t shifted_exp = 0x7c00u << 13;
    fbn_bits32 o;
    uint32_t e;
    o.u = (uint32_t)(h & 0x7fffu) << 13;
    e = shifted_exp & o.u;
    o.u += (127u - 15u) << 23;
    if (e == shifted_exp) {
        o.u += (128u - 16u) << 23;          /* inf / nan */
    } else if (e == 0) {
        o.u += 1u << 23;                    /* zero / subnormal */
        o.f -= magic.f;
    }
    o.u |= (uint32_t)(h & 0x8000u) << 16;
    return o.f;
}

static inline uint16_t fbn_float_to_half(float x)
{
    /* F. Giesen's float_to_half_fast3_rtne: round to nearest, ties to even,
     * overflow to inf, nan stays nan. Matches numpy's npy_float_to_half. */
    const fbn_bits32 f32infty = {255u << 23};
    const fbn_bits32 f16max = {(127u + 16u) << 23};
    const fbn_bits32 denorm_magic = {((127u - 15u) + (23u - 10u) + 1u) << 23};
    fbn_bits32 f;
    uint32_t sign, o;
    f.f = x;
    sign = f.u & 0x80000000u;
    f.u ^= sign;
    if (f.u >= f16max.u) {
        o = (f.u > f32infty.u) ? 0x7e00u : 0x7c00u;
    } else if (f.u < (113u << 23)) {
        f.f += denorm_magic.f;
        o = f.u - denorm_magic.u;
    } else {
        uint32_t mant_odd = (f.u >> 13) & 1u;
        f.u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        f.u += mant_odd;
        o = f.u >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}

static inline void fbn_h2f(const uint16_t *h, float *f, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        f[i] = fbn_half_to_float(h[i]);
}

static inline void fbn_f2h(const float *f, uint16_t *h, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        h[i] = fbn_float_to_half(f[i]);
}

/* Store n float results as float16 at dst (streaming when asked). */
static inline void fbn_store_half(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    uint16_t tmp[FBN_STAGE];
    Py_ssize_t i, len;
    if (!stream) {
        fbn_f2h(src, dst, n);
        return;
    }
    for (i = 0; i < n; i += len) {
        len = n - i < FBN_STAGE ? n - i : FBN_STAGE;
        fbn_f2h(src + i, tmp, len);
        fbn_stream_bytes(dst + i, tmp, (size_t)len * sizeof(uint16_t));
    }
}

/* ---- float and double instantiations of the loops ---- */
/* ---- instantiations: {float, double} x {baseline, AVX2+FMA} ----
 *
 * The wheel targets the x86-64 baseline (SSE2), where the rows reductions are
 * bound by the two FP-add pipes (~8 G floats/s per core, below one core's
 * ~30 GB/s of memory bandwidth). With gcc/clang on x86-64 the loops are also
 * compiled for AVX2+FMA (function target attribute, no -m flag) and chosen at
 * run time by fbn_simd_init(); the baseline stays the fallback. */
#if FBN_VEXT && (defined(__x86_64__) || defined(__i386__)) && !defined(FBN_NO_AVX2)
#define FBN_AVX2_DISPATCH 1
#include <immintrin.h>
#else
#define FBN_AVX2_DISPATCH 0
#endif

static int fbn_avx2 = 0;   /* 1: run the AVX2+FMA instantiation */

/* Pick the instruction set: the best the CPU (and OS) supports, capped by
 * `level` (0 = baseline, 1 = AVX2+FMA allowed). Returns the level in use. */
static inline int fbn_simd_init(int level)
{
#if FBN_AVX2_DISPATCH
    __builtin_cpu_init();
    fbn_avx2 = level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    (void)level;
    fbn_avx2 = 0;
#endif
    return fbn_avx2;
}

static inline int fbn_simd_get(void)
{
    return fbn_avx2;
}

#define FBN_FN static inline
#define FBN_VBYTES 16
#define FBN_T float
#define FBN_NAME(name) name##_f32_base
#include "_bn_simd_t.h"
#undef FBN_T
#undef FBN_NAME
#define FBN_T double
#define FBN_NAME(name) name##_f64_base
#include "_bn_simd_t.h"
#undef FBN_T
#undef FBN_NAME
#undef FBN_VBYTES
#undef FBN_FN

#if FBN_AVX2_DISPATCH
#define FBN_FN static inline __attribute__((target("avx2,fma")))
#define FBN_VBYTES 32
#define FBN_T float
#define FBN_NAME(name) name##_f32_avx2
#include "_bn_simd_t.h"
#undef FBN_T
#undef FBN_NAME
#define FBN_T double
#define FBN_NAME(name) name##_f64_avx2
#include "_bn_simd_t.h"
#undef FBN_T
#undef FBN_NAME
#undef FBN_VBYTES
#undef FBN_FN
#endif

/* The entry points used by the Cython kernels: fbn_<loop>_f32 / _f64. */
#define FBN_T float
#define FBN_D(name) name##_f32
#define FBN_BASE(name) name##_f32_base
#define FBN_AVX(name) name##_f32_avx2
#include "_bn_simd_d.h"
#undef FBN_T
#undef FBN_D
#undef FBN_BASE
#undef FBN_AVX
#define FBN_T double
#define FBN_D(name) name##_f64
#define FBN_BASE(name) name##_f64_base
#define FBN_AVX(name) name##_f64_avx2
#include "_bn_simd_d.h"
#undef FBN_T
#undef FBN_D
#undef FBN_BASE
#undef FBN_AVX

#endif /* FASTBN_BN_SIMD_H */
