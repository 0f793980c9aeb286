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
 * on the way in and rounded back (round-to-nearest-even) on the way out: in
 * software on the baseline, with F16C (vcvtph2ps / vcvtps2ph, chosen at run
 * time with the AVX2 loops) in registers otherwise, bit-identical either way.
 * bfloat16 likewise, by integer shifts and adds (a float32 tile on the
 * baseline, AVX2 in registers otherwise). The entry points for 16-bit data
 * (fbn_*_u16, fbn_u2f, fbn_store_u16) take `bf16`: 0 float16, 1 bfloat16.
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

/* Prefetch [p, p + nbytes) into L2, line by line: a plane of a per-channel walk,
 * which the hardware prefetchers do not see coming. */
static inline void fbn_prefetch_bytes(const void *p, size_t nbytes)
{
    const char *c = (const char *)p;
    size_t q;
    for (q = 0; q < nbytes; q += 64)
        fbn_prefetch_l2(c + q);
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

static inline void fbn_h2f_base(const uint16_t *h, float *f, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        f[i] = fbn_half_to_float(h[i]);
}

static inline void fbn_f2h_base(const float *f, uint16_t *h, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        h[i] = fbn_float_to_half(f[i]);
}

/* Store n float results as float16 at dst (streaming when asked). */
static inline void fbn_store_half_base(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    uint16_t tmp[FBN_STAGE];
    Py_ssize_t i, len;
    if (!stream) {
        fbn_f2h_base(src, dst, n);
        return;
    }
    for (i = 0; i < n; i += len) {
        len = n - i < FBN_STAGE ? n - i : FBN_STAGE;
        fbn_f2h_base(src + i, tmp, len);
        fbn_stream_bytes(dst + i, tmp, (size_t)len * sizeof(uint16_t));
    }
}

/* ---- bfloat16 <-> float32 (integer arithmetic on the float32 bit pattern) ----
 *
 * bfloat16 is the upper half of a float32 (same sign and exponent, 7 fraction
 * bits): loading is exact (bits << 16), subnormals included; storing rounds
 * to nearest even (add 0x7fff plus the lowest kept bit, drop the low half), so
 * values past the largest finite bfloat16 round to inf and inf stays inf. A
 * NaN becomes the canonical quiet NaN 0x7fc0 with its sign (as ml_dtypes'
 * astype(bfloat16) does), never rounded into inf. Written branch-free so the
 * baseline loops vectorise. */

static inline float fbn_bf16_to_float(uint16_t h)
{
    fbn_bits32 o;
    o.u = (uint32_t)h << 16;
    return o.f;
}

static inline uint16_t fbn_float_to_bf16(float x)
{
    fbn_bits32 f;
    uint32_t r, q;
    f.f = x;
    r = (f.u + 0x7fffu + ((f.u >> 16) & 1u)) >> 16;
    q = ((f.u >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)((int32_t)(f.u & 0x7fffffffu) > 0x7f800000 ? q : r);
}

static inline void fbn_b2f_base(const uint16_t *h, float *f, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        f[i] = fbn_bf16_to_float(h[i]);
}

static inline void fbn_f2b_base(const float *f, uint16_t *h, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        h[i] = fbn_float_to_bf16(f[i]);
}

/* Store n float results as bfloat16 at dst (streaming when asked). */
static inline void fbn_store_bf16_base(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    uint16_t tmp[FBN_STAGE];
    Py_ssize_t i, len;
    if (!stream) {
        fbn_f2b_base(src, dst, n);
        return;
    }
    for (i = 0; i < n; i += len) {
        len = n - i < FBN_STAGE ? n - i : FBN_STAGE;
        fbn_f2b_base(src + i, tmp, len);
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
static int fbn_f16c = 0;   /* 1: float16 <-> float32 with F16C (only with fbn_avx2) */

/* Pick the instruction set: the best the CPU (and OS) supports, capped by
 * `level` (0 = baseline, 1 = AVX2+FMA allowed). Returns the level in use. */
static inline int fbn_simd_init(int level)
{
#if FBN_AVX2_DISPATCH
    __builtin_cpu_init();
    fbn_avx2 = level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    fbn_f16c = fbn_avx2 && __builtin_cpu_supports("f16c");
#else
    (void)level;
    fbn_avx2 = 0;
    fbn_f16c = 0;
#endif
    return fbn_avx2;
}

static inline int fbn_simd_get(void)
{
    return fbn_avx2;
}

/* ---- float16 <-> float32 with F16C (vcvtph2ps / vcvtps2ph), dispatched ----
 *
 * Chosen at run time with the AVX2 loops (every AVX2 CPU has F16C, but its
 * cpuid bit is checked too). Bit-identical to the software conversions above:
 * half -> float is exact either way, float -> half rounds to nearest even
 * (immediate rounding mode, MXCSR not consulted), overflows to inf; a NaN
 * result is made the software's canonical quiet NaN 0x7e00 (sign kept) rather
 * than vcvtps2ph's truncated payload. Tails of < 8 go through the software. */
#if FBN_AVX2_DISPATCH
#define FBN_F16C_FN static inline __attribute__((target("avx2,fma,f16c")))
#define FBN_F16C_RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

FBN_F16C_FN void fbn_h2f_f16c(const uint16_t *h, float *f, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m128i a = _mm_loadu_si128((const __m128i *)(h + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(h + i + 8));
        __m128i c = _mm_loadu_si128((const __m128i *)(h + i + 16));
        __m128i d = _mm_loadu_si128((const __m128i *)(h + i + 24));
        _mm256_storeu_ps(f + i, _mm256_cvtph_ps(a));
        _mm256_storeu_ps(f + i + 8, _mm256_cvtph_ps(b));
        _mm256_storeu_ps(f + i + 16, _mm256_cvtph_ps(c));
        _mm256_storeu_ps(f + i + 24, _mm256_cvtph_ps(d));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++)
        f[i] = fbn_half_to_float(h[i]);
}

/* 8 floats -> 8 halves, round to nearest even, NaN -> 0x7e00 | sign. */
FBN_F16C_FN __m128i fbn_cvt8_f16c(__m256 v)
{
    __m128i h = _mm256_cvtps_ph(v, FBN_F16C_RN);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(nan, nan), 0)) {
        __m256i mi = _mm256_castps_si256(nan);
        __m128i m = _mm_packs_epi32(_mm256_castsi256_si128(mi), _mm256_extracti128_si256(mi, 1));
        __m128i q = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16((short)0x8000)),
                                 _mm_set1_epi16(0x7e00));
        h = _mm_or_si128(_mm_andnot_si128(m, h), _mm_and_si128(m, q));
    }
    return h;
}

FBN_F16C_FN void fbn_f2h_f16c(const float *f, uint16_t *h, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i a = fbn_cvt8_f16c(_mm256_loadu_ps(f + i));
        __m128i b = fbn_cvt8_f16c(_mm256_loadu_ps(f + i + 8));
        _mm_storeu_si128((__m128i *)(h + i), a);
        _mm_storeu_si128((__m128i *)(h + i + 8), b);
    }
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), fbn_cvt8_f16c(_mm256_loadu_ps(f + i)));
    for (; i < n; i++)
        h[i] = fbn_float_to_half(f[i]);
}

/* As fbn_store_half_base, streaming 16-byte vectors straight from registers. */
FBN_F16C_FN void fbn_store_half_f16c(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    Py_ssize_t i = 0, head;
    if (!stream) {
        fbn_f2h_f16c(src, dst, n);
        return;
    }
    if (((uintptr_t)dst & 1) != 0) {   /* never for a uint16 array; keep it correct anyway */
        fbn_store_half_base(dst, src, n, stream);
        return;
    }
    head = (Py_ssize_t)(((16 - ((uintptr_t)dst & 15)) & 15) / sizeof(uint16_t));
    if (head > n)
        head = n;
    for (; i < head; i++)
        dst[i] = fbn_float_to_half(src[i]);
    for (; i + 16 <= n; i += 16) {
        __m128i a = fbn_cvt8_f16c(_mm256_loadu_ps(src + i));
        __m128i b = fbn_cvt8_f16c(_mm256_loadu_ps(src + i + 8));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 8), b);
    }
    for (; i + 8 <= n; i += 8)
        _mm_stream_si128((__m128i *)(dst + i), fbn_cvt8_f16c(_mm256_loadu_ps(src + i)));
    for (; i < n; i++)
        dst[i] = fbn_float_to_half(src[i]);
}


/* Elements before dst + i is 16-byte aligned (all of them if dst is odd). */
static inline Py_ssize_t fbn_half_head(const uint16_t *dst, Py_ssize_t n, int stream)
{
    Py_ssize_t head;
    if (!stream)
        return 0;
    if (((uintptr_t)dst & 1) != 0)
        return n;
    head = (Py_ssize_t)(((16 - ((uintptr_t)dst & 15)) & 15) / sizeof(uint16_t));
    return head > n ? n : head;
}

/* Elements before dst + i is 32-byte aligned (all of them if dst is odd). */
static inline Py_ssize_t fbn_u16_head32(const uint16_t *dst, Py_ssize_t n, int stream)
{
    Py_ssize_t head;
    if (!stream)
        return 0;
    if (((uintptr_t)dst & 1) != 0)
        return n;
    head = (Py_ssize_t)(((32 - ((uintptr_t)dst & 31)) & 31) / sizeof(uint16_t));
    return head > n ? n : head;
}

/* ---- bfloat16 <-> float32 with AVX2 (integer shifts in registers) ----
 *
 * Chosen at run time with the AVX2 loops. Load: a bfloat16 is the upper half
 * of its float32, so 16 of them interleaved with zeros (vpunpck{l,h}wd, in
 * 128-bit lanes) are 16 floats, exact; stored, the rounded upper halves are
 * packed back by vpackusdw, whose in-lane order undoes the interleave. The
 * element-wise loops take 16 values at a time that way (fbn_ld16_bf16 /
 * fbn_cvt16_bf16, the order inside a pair of vectors is theirs), or in memory
 * order when their constants vary along the vector (rows: the _o forms, a
 * vpmovzxwd per 8 loaded and a vpermq per 16 stored); the reductions take 8 in
 * memory order (fbn_ld8_bf16). Rounding is fbn_float_to_bf16's, 8 lanes at a
 * time: to nearest even, overflow to inf, NaN -> 0x7fc0 | sign. Measured (1
 * thread, (32, 64, 56, 56) NCHW and NHWC, cold): 8 at a time in memory order
 * with 16-byte stores, normalize and backward_elemt were 1.6-2.6x float16's
 * time; 16 at a time as here, 1.0-1.2x. Memory-bound streaming loops here are
 * sensitive to every instruction between stores (see fbn_cvt16_bf16). */
#define FBN_BF16_FN static inline __attribute__((target("avx2,fma")))

/* 8 bfloat16 -> 8 floats, memory order */
FBN_BF16_FN __m256 fbn_ld8_bf16(const uint16_t *p)
{
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 16 bfloat16 -> 2 x 8 floats: a = p[0..3, 8..11], b = p[4..7, 12..15] */
FBN_BF16_FN void fbn_ld16_bf16(const uint16_t *p, __m256 *a, __m256 *b)
{
    __m256i h = _mm256_loadu_si256((const __m256i *)p), z = _mm256_setzero_si256();
    *a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h));
    *b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h));
}

/* 16 bfloat16 -> 2 x 8 floats in memory order: a = p[0..7], b = p[8..15] */
FBN_BF16_FN void fbn_ld16o_bf16(const uint16_t *p, __m256 *a, __m256 *b)
{
    *a = fbn_ld8_bf16(p);
    *b = fbn_ld8_bf16(p + 8);
}

/* Round 8 floats to bfloat16 in the low half of each 32-bit lane (not NaN-safe:
 * see fbn_nan_bf16). */
FBN_BF16_FN __m256i fbn_rne_bf16(__m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                             16);
}

/* r (fbn_rne_bf16(v)) with the lanes where v is NaN made 0x7fc0 | sign. */
FBN_BF16_FN __m256i fbn_nan_bf16(__m256i r, __m256 v)
{
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256i q = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000)),
        _mm256_set1_epi32(0x7fc0));
    return _mm256_blendv_epi8(r, q, _mm256_castps_si256(nan));
}

/* 8 floats -> 8 bfloat16 (memory order). */
FBN_BF16_FN __m128i fbn_cvt8_bf16(__m256 v)
{
    __m256i r = fbn_rne_bf16(v);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(nan, nan), 0))
        r = fbn_nan_bf16(r, v);
    /* every lane is in [0, 0xffff]: the signed-to-unsigned pack never saturates */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 2 x 8 floats -> 16 bfloat16: packed in-lane, [a0..3 b0..3 | a4..7 b4..7], which
 * undoes fbn_ld16_bf16's order; with `ordered`, a then b (vpermq). */
FBN_BF16_FN __m256i fbn_cvt16_bf16(__m256 a, __m256 b, int ordered)
{
    __m256i ra = fbn_rne_bf16(a), rb = fbn_rne_bf16(b), h;
    /* one compare for both: unordered when a or b is NaN (lanes are fixed one by
     * one below, rarely); in memory-bound streaming, two compares and an OR here
     * measured 1.1-1.3x slower */
    __m256 nan = _mm256_cmp_ps(a, b, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(nan, nan), 0)) {
        ra = fbn_nan_bf16(ra, a);
        rb = fbn_nan_bf16(rb, b);
    }
    h = _mm256_packus_epi32(ra, rb);
    return ordered ? _mm256_permute4x64_epi64(h, 0xd8) : h;
}

FBN_BF16_FN void fbn_b2f_avx2(const uint16_t *h, float *f, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(f + i, fbn_ld8_bf16(h + i));
        _mm256_storeu_ps(f + i + 8, fbn_ld8_bf16(h + i + 8));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(f + i, fbn_ld8_bf16(h + i));
    for (; i < n; i++)
        f[i] = fbn_bf16_to_float(h[i]);
}

#undef FBN_BF16_FN

#undef FBN_F16C_RN
#undef FBN_F16C_FN
#define FBN_F16C_CALL(name, args) (fbn_f16c ? name##_f16c args : name##_base args)
#else
#define FBN_F16C_CALL(name, args) (name##_base args)
#endif

/* The float16 tile conversions. */
static inline void fbn_h2f(const uint16_t *h, float *f, Py_ssize_t n)
{
    FBN_F16C_CALL(fbn_h2f, (h, f, n));
}

static inline void fbn_f2h(const float *f, uint16_t *h, Py_ssize_t n)
{
    FBN_F16C_CALL(fbn_f2h, (f, h, n));
}

/* Store n float results as float16 at dst (streaming when asked). */
static inline void fbn_store_half(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    FBN_F16C_CALL(fbn_store_half, (dst, src, n, stream));
}

#undef FBN_F16C_CALL

/* The bfloat16 tile conversions. Stores through a float32 tile happen only on
 * the baseline (with AVX2 every bfloat16 store is in the fused loops), so only
 * the load has an AVX2 form (the rows statistics convert their first tile). */
static inline void fbn_b2f(const uint16_t *h, float *f, Py_ssize_t n)
{
#if FBN_AVX2_DISPATCH
    if (fbn_avx2) {
        fbn_b2f_avx2(h, f, n);
        return;
    }
#endif
    fbn_b2f_base(h, f, n);
}

static inline void fbn_f2b(const float *f, uint16_t *h, Py_ssize_t n)
{
    fbn_f2b_base(f, h, n);
}

static inline void fbn_store_bf16(uint16_t *dst, const float *src, Py_ssize_t n, int stream)
{
    fbn_store_bf16_base(dst, src, n, stream);
}

/* 16-bit data as the Cython kernels see it: a uint16 bit pattern whose format
 * is named by `bf16` (0: float16, 1: bfloat16). Convert n values to float32,
 * or store n float32 results rounded to nearest even (streaming when asked). */
static inline void fbn_u2f(int bf16, const uint16_t *h, float *f, Py_ssize_t n)
{
    if (bf16)
        fbn_b2f(h, f, n);
    else
        fbn_h2f(h, f, n);
}

static inline void fbn_store_u16(int bf16, uint16_t *dst, const float *src, Py_ssize_t n,
                                 int stream)
{
    if (bf16)
        fbn_store_bf16(dst, src, n, stream);
    else
        fbn_store_half(dst, src, n, stream);
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
/* 16-bit input converted in registers, float arithmetic as _f32_avx2: the
 * reductions, and the fused element-wise loops of the FBN_U16_IN section
 * (every element-wise kernel on 16-bit data, unless the baseline is in use).
 * float16 with F16C (_hin_f16c), bfloat16 with AVX2 shifts (_bin_avx2). */
#define FBN_ST16(p, h, stream)                                              \
    do {                                                                    \
        __m128i h_ = (h);                                                   \
        if (stream)                                                         \
            _mm_stream_si128((__m128i *)(p), h_);                           \
        else                                                                \
            _mm_storeu_si128((__m128i *)(p), h_);                           \
    } while (0)
#define FBN_ST32(p, h, stream)                                              \
    do {                                                                    \
        __m256i h_ = (h);                                                   \
        if (stream)                                                         \
            _mm256_stream_si256((__m256i *)(p), h_);                        \
        else                                                                \
            _mm256_storeu_si256((__m256i *)(p), h_);                        \
    } while (0)
#define FBN_VBYTES 32
#define FBN_T float
#define FBN_U16_IN 1
#define FBN_FN static inline __attribute__((target("avx2,fma,f16c")))
#define FBN_U16_HEAD(dst, n, stream) fbn_half_head((dst), (n), (stream))
#define FBN_U16_LD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define FBN_U16_X(v) fbn_half_to_float(v)
#define FBN_U16_TO(f) fbn_float_to_half(f)
#define FBN_U16_ST8(p, v, stream) FBN_ST16((p), fbn_cvt8_f16c(v), (stream))
#define FBN_NAME(name) name##_hin_f16c
#include "_bn_simd_t.h"
#undef FBN_NAME
#undef FBN_U16_ST8
#undef FBN_U16_TO
#undef FBN_U16_X
#undef FBN_U16_LD8
#undef FBN_U16_HEAD
#undef FBN_FN
#define FBN_FN static inline __attribute__((target("avx2,fma")))
#define FBN_U16_HEAD(dst, n, stream) fbn_u16_head32((dst), (n), (stream))
#define FBN_U16_LD8(p) fbn_ld8_bf16(p)
#define FBN_U16_X(v) fbn_bf16_to_float(v)
#define FBN_U16_TO(f) fbn_float_to_bf16(f)
#define FBN_U16_ST8(p, v, stream) FBN_ST16((p), fbn_cvt8_bf16(v), (stream))
#define FBN_U16_LD16_(p, a, b, ld)                                          \
    do {                                                                    \
        __m256 a_, b_;                                                      \
        ld((p), &a_, &b_);                                                  \
        (a) = a_;                                                           \
        (b) = b_;                                                           \
    } while (0)
#define FBN_U16_LD16(p, a, b) FBN_U16_LD16_(p, a, b, fbn_ld16_bf16)
#define FBN_U16_LD16_ORD(p, a, b) FBN_U16_LD16_(p, a, b, fbn_ld16o_bf16)
#define FBN_U16_ST16(p, a, b, stream) FBN_ST32((p), fbn_cvt16_bf16((a), (b), 0), (stream))
#define FBN_U16_ST16_ORD(p, a, b, stream) FBN_ST32((p), fbn_cvt16_bf16((a), (b), 1), (stream))
#define FBN_NAME(name) name##_bin_avx2
#include "_bn_simd_t.h"
#undef FBN_NAME
#undef FBN_U16_ST16_ORD
#undef FBN_U16_ST16
#undef FBN_U16_LD16_ORD
#undef FBN_U16_LD16
#undef FBN_U16_LD16_
#undef FBN_U16_ST8
#undef FBN_U16_TO
#undef FBN_U16_X
#undef FBN_U16_LD8
#undef FBN_U16_HEAD
#undef FBN_FN
#undef FBN_U16_IN
#undef FBN_T
#undef FBN_VBYTES
#undef FBN_ST32
#undef FBN_ST16
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

/* 16-bit loops on the data itself, converted in registers (see FBN_U16_IN):
 * the entry points for the Cython kernels, `bf16` naming the format (0:
 * float16, 1: bfloat16). They run when fbn_u16_regs(bf16): float16 needs
 * F16C, bfloat16 the AVX2 loops. Otherwise the kernels go through a float32
 * tile: the reductions below are then never called, and the element-wise ones
 * return 0 without touching anything (they return 1 when they ran). Same
 * accumulation order and arithmetic as the float32 AVX2 loops on converted data. */
static inline int fbn_u16_regs(int bf16)
{
    return bf16 ? fbn_avx2 : fbn_f16c;
}

#if FBN_AVX2_DISPATCH
#define FBN_U16(name, args) (bf16 ? name##_bin_avx2 args : name##_hin_f16c args)
#else
#define FBN_U16(name, args) ((void)0)
#endif

static inline double fbn_sum_u16(int bf16, const uint16_t *x, Py_ssize_t n, const uint16_t *pf)
{
#if FBN_AVX2_DISPATCH
    return FBN_U16(fbn_sum, (x, n, pf));
#else
    (void)bf16; (void)x; (void)n; (void)pf;
    return 0.0;
#endif
}

static inline void fbn_shifted_sums_u16(int bf16, const uint16_t *x, Py_ssize_t n, float k,
                                        double *s1, double *s2, const uint16_t *pf)
{
    (void)bf16; (void)x; (void)n; (void)k; (void)s1; (void)s2; (void)pf;
    FBN_U16(fbn_shifted_sums, (x, n, k, s1, s2, pf));
}

static inline void fbn_dot_xmu_u16(int bf16, const uint16_t *dy, const uint16_t *x, Py_ssize_t n,
                                   float m, double *sdy, double *sdyxmu, Py_ssize_t pf,
                                   const uint16_t *ys)
{
    (void)bf16; (void)dy; (void)x; (void)n; (void)m; (void)sdy; (void)sdyxmu; (void)pf; (void)ys;
    FBN_U16(fbn_dot_xmu, (dy, x, n, m, sdy, sdyxmu, pf, ys));
}

static inline void fbn_rows_stats_wide_u16(int bf16, const uint16_t *x, Py_ssize_t ld,
                                           Py_ssize_t R, Py_ssize_t w, double n_old, float *k,
                                           double *anchor, double *off, double *m2,
                                           Py_ssize_t pfd, const uint16_t *pf_end)
{
    (void)bf16; (void)x; (void)ld; (void)R; (void)w; (void)n_old; (void)k; (void)anchor;
    (void)off; (void)m2; (void)pfd; (void)pf_end;
    FBN_U16(fbn_rows_stats_wide, (x, ld, R, w, n_old, k, anchor, off, m2, pfd, pf_end));
}

static inline void fbn_rows_dot_wide_u16(int bf16, const uint16_t *dy, const uint16_t *x,
                                         Py_ssize_t ld, Py_ssize_t R, Py_ssize_t w,
                                         const float *m, double *sdy, double *sdyxmu,
                                         Py_ssize_t pfd, const uint16_t *pf_end,
                                         const uint16_t *ys)
{
    (void)bf16; (void)dy; (void)x; (void)ld; (void)R; (void)w; (void)m; (void)sdy;
    (void)sdyxmu; (void)pfd; (void)pf_end; (void)ys;
    FBN_U16(fbn_rows_dot_wide, (dy, x, ld, R, w, m, sdy, sdyxmu, pfd, pf_end, ys));
}

/* The epilogue arguments (z, relu; ys, dz) are NULL / 0 when absent. */
static inline int fbn_affine_u16(int bf16, const uint16_t *x, uint16_t *y, Py_ssize_t n,
                                 float m, float s, float b, const uint16_t *z, int relu,
                                 int stream)
{
#if FBN_AVX2_DISPATCH
    if (fbn_u16_regs(bf16)) {
        FBN_U16(fbn_affine_u16, (x, y, n, m, s, b, z, relu, stream));
        return 1;
    }
#endif
    (void)bf16; (void)x; (void)y; (void)n; (void)m; (void)s; (void)b; (void)z; (void)relu;
    (void)stream;
    return 0;
}

static inline int fbn_elemt_u16(int bf16, const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                Py_ssize_t n, float m, float kdy, float kx, float kc,
                                const uint16_t *ys, uint16_t *dz, int stream)
{
#if FBN_AVX2_DISPATCH
    if (fbn_u16_regs(bf16)) {
        FBN_U16(fbn_elemt_u16, (dy, x, dx, n, m, kdy, kx, kc, ys, dz, stream));
        return 1;
    }
#endif
    (void)bf16; (void)dy; (void)x; (void)dx; (void)n; (void)m; (void)kdy; (void)kx; (void)kc;
    (void)ys; (void)dz; (void)stream;
    return 0;
}

static inline int fbn_rows_affine_u16(int bf16, const uint16_t *x, uint16_t *y, Py_ssize_t n,
                                      Py_ssize_t c0, Py_ssize_t P, const float *m,
                                      const float *s, const float *b, const uint16_t *z,
                                      int relu, int stream)
{
#if FBN_AVX2_DISPATCH
    if (fbn_u16_regs(bf16)) {
        FBN_U16(fbn_rows_affine_u16, (x, y, n, c0, P, m, s, b, z, relu, stream));
        return 1;
    }
#endif
    (void)bf16; (void)x; (void)y; (void)n; (void)c0; (void)P; (void)m; (void)s; (void)b;
    (void)z; (void)relu; (void)stream;
    return 0;
}

static inline int fbn_rows_elemt_u16(int bf16, const uint16_t *dy, const uint16_t *x,
                                     uint16_t *dx, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                     const float *m, const float *kdy, const float *kx,
                                     const float *kc, const uint16_t *ys, uint16_t *dz,
                                     int stream)
{
#if FBN_AVX2_DISPATCH
    if (fbn_u16_regs(bf16)) {
        FBN_U16(fbn_rows_elemt_u16, (dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, dz, stream));
        return 1;
    }
#endif
    (void)bf16; (void)dy; (void)x; (void)dx; (void)n; (void)c0; (void)P; (void)m; (void)kdy;
    (void)kx; (void)kc; (void)ys; (void)dz; (void)stream;
    return 0;
}

#undef FBN_U16

#endif /* FASTBN_BN_SIMD_H */
