/* One instantiation of the fastbn inner loops for the element type FBN_T,
 * vectors of FBN_VBYTES bytes, functions declared FBN_FN and named FBN_NAME(..);
 * included by _bn_simd.h per (type, instruction set). No include guard on purpose. */

/* ---------------- reductions on one contiguous run ---------------- */

/* The rows reductions prefetch ~8 KiB ahead on four rows at once: into L2,
 * which holds more lines in flight than L1 (measured faster than into L1). */
#ifndef FBN_PF_ROWS
#define FBN_PF_ROWS fbn_prefetch_l2
#endif

#if FBN_VEXT
/* 16-byte vectors (the SSE2 baseline); FBN_NV of them per reduction = FBN_LANES
 * floats (or FBN_LANES/2 doubles) of independent partial sums. Written with
 * GCC vector extensions because the auto-vectoriser turns the equivalent
 * "array of lanes" loop into an interleaving shuffle mess. */
typedef FBN_T FBN_NAME(fbn_v) __attribute__((vector_size(FBN_VBYTES)));
typedef FBN_T FBN_NAME(fbn_vu) __attribute__((vector_size(FBN_VBYTES), aligned(sizeof(FBN_T)), may_alias));
#define FBN_VT FBN_NAME(fbn_v)
#define FBN_LD(p) (*(const FBN_NAME(fbn_vu) *)(p))
#define FBN_W ((Py_ssize_t)(FBN_VBYTES / sizeof(FBN_T)))
#define FBN_NV 4

FBN_FN double FBN_NAME(fbn_hsum)(FBN_VT v)
{
    double s = 0.0;
    int j;
    for (j = 0; j < (int)FBN_W; j++)
        s += v[j];
    return s;
}
#endif

/* The reductions read their data through FBN_IN_T / FBN_LDI / FBN_XI: the
 * element type itself, or (FBN_U16_IN: 16-bit bit patterns, float16 or
 * bfloat16, FBN_T float, 32-byte vectors) values converted in registers by the
 * includer's FBN_U16_LD8(p) (8 values -> __m256) and FBN_U16_X(v) (one value),
 * with the same float arithmetic and accumulation order as the float
 * instantiation run on converted data. */
#ifdef FBN_U16_IN
#if FBN_VBYTES != 32
#error "FBN_U16_IN: 16-bit input is converted 8 values (32 bytes of float) at a time"
#endif
#define FBN_IN_T uint16_t
#define FBN_LDI(p) ((FBN_VT)FBN_U16_LD8(p))
#define FBN_XI(v) FBN_U16_X(v)
#else
#define FBN_IN_T FBN_T
#define FBN_LDI(p) FBN_LD(p)
#define FBN_XI(v) (v)
#endif
/* Bytes of input per reduction step of FBN_NV vectors (prefetch span). */
#define FBN_STEP_BYTES ((int)(FBN_NV * FBN_W * sizeof(FBN_IN_T)))

/* Sum of n values (independent vector partial sums, then double); pf as in
 * fbn_shifted_sums. */
FBN_FN double FBN_NAME(fbn_sum)(const FBN_IN_T *x, Py_ssize_t n, const FBN_IN_T *pf)
{
    double s = 0.0;
    Py_ssize_t i = 0;
#if FBN_VEXT
    FBN_VT a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (; i + FBN_NV * FBN_W <= n; i += FBN_NV * FBN_W) {
        if (pf) {   /* as in fbn_shifted_sums: the read yardstick prefetches too */
            int q;
            for (q = 0; q < FBN_STEP_BYTES; q += 64)
                fbn_prefetch((const char *)(pf + i) + q);
        }
        a0 += FBN_LDI(x + i);
        a1 += FBN_LDI(x + i + FBN_W);
        a2 += FBN_LDI(x + i + 2 * FBN_W);
        a3 += FBN_LDI(x + i + 3 * FBN_W);
    }
    s = FBN_NAME(fbn_hsum)((a0 + a1) + (a2 + a3));
#endif
    for (; i < n; i++)
        s += FBN_XI(x[i]);
    return s;
}

/* Shifted sums of one tile: s1 = sum(x - k), s2 = sum((x - k)^2). When pf is
 * not NULL, pf[0:n] (the same channel's next plane) is prefetched line by line:
 * a channel-order walk jumps between short planes, where the hardware
 * prefetchers keep retraining. The shift k
 * is the channel's running mean, so d is small and the element-type partial
 * sums over a tile of <= 2048 values lose nothing that matters; tiles are
 * merged in double (Chan) by the caller. */
FBN_FN void FBN_NAME(fbn_shifted_sums)(const FBN_IN_T *x, Py_ssize_t n, FBN_T k,
                                              double *s1, double *s2, const FBN_IN_T *pf)
{
    double t1 = 0.0, t2 = 0.0;
    Py_ssize_t i = 0;
#if FBN_VEXT
    FBN_VT p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};
    FBN_VT q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    FBN_VT kv = {0};
    kv += k;
    for (; i + FBN_NV * FBN_W <= n; i += FBN_NV * FBN_W) {
        FBN_VT d0, d1, d2, d3;
        if (pf) {   /* one prefetch per 64-byte line of the iteration's span */
            int q;
            for (q = 0; q < FBN_STEP_BYTES; q += 64)
                fbn_prefetch((const char *)(pf + i) + q);
        }
        d0 = FBN_LDI(x + i) - kv;
        d1 = FBN_LDI(x + i + FBN_W) - kv;
        d2 = FBN_LDI(x + i + 2 * FBN_W) - kv;
        d3 = FBN_LDI(x + i + 3 * FBN_W) - kv;
        p0 += d0;
        p1 += d1;
        p2 += d2;
        p3 += d3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    t1 = FBN_NAME(fbn_hsum)((p0 + p1) + (p2 + p3));
    t2 = FBN_NAME(fbn_hsum)((q0 + q1) + (q2 + q3));
#endif
    for (; i < n; i++) {
        FBN_T d = FBN_XI(x[i]) - k;
        t1 += d;
        t2 += (double)d * d;
    }
    *s1 = t1;
    *s2 = t2;
}

/* Backward sums of one tile: sum(dy) and sum(dy * (x - m)); when pf != 0,
 * dy + pf and x + pf are prefetched alongside (see fbn_shifted_sums). */
FBN_FN void FBN_NAME(fbn_dot_xmu)(const FBN_IN_T *dy, const FBN_IN_T *x, Py_ssize_t n,
                                         FBN_T m, double *sdy, double *sdyxmu, Py_ssize_t pf)
{
    double t1 = 0.0, t2 = 0.0;
    Py_ssize_t i = 0;
#if FBN_VEXT
    FBN_VT p0 = {0}, p1 = {0}, p2 = {0}, p3 = {0};
    FBN_VT q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    FBN_VT mv = {0};
    mv += m;
    for (; i + FBN_NV * FBN_W <= n; i += FBN_NV * FBN_W) {
        FBN_VT g0, g1, g2, g3;
        if (pf) {
            int q;
            for (q = 0; q < FBN_STEP_BYTES; q += 64) {
                fbn_prefetch((const char *)(dy + i + pf) + q);
                fbn_prefetch((const char *)(x + i + pf) + q);
            }
        }
        g0 = FBN_LDI(dy + i);
        g1 = FBN_LDI(dy + i + FBN_W);
        g2 = FBN_LDI(dy + i + 2 * FBN_W);
        g3 = FBN_LDI(dy + i + 3 * FBN_W);
        p0 += g0;
        p1 += g1;
        p2 += g2;
        p3 += g3;
        q0 += g0 * (FBN_LDI(x + i) - mv);
        q1 += g1 * (FBN_LDI(x + i + FBN_W) - mv);
        q2 += g2 * (FBN_LDI(x + i + 2 * FBN_W) - mv);
        q3 += g3 * (FBN_LDI(x + i + 3 * FBN_W) - mv);
    }
    t1 = FBN_NAME(fbn_hsum)((p0 + p1) + (p2 + p3));
    t2 = FBN_NAME(fbn_hsum)((q0 + q1) + (q2 + q3));
#endif
    for (; i < n; i++) {
        FBN_T g = FBN_XI(dy[i]);
        t1 += g;
        t2 += (double)g * (FBN_XI(x[i]) - m);
    }
    *sdy = t1;
    *sdyxmu = t2;
}

/* ---------------- element-wise on one contiguous run ---------------- */

/* Output stores: FBN_ST_NT streams a 16-byte vector to a 16-byte-aligned
 * address (non-temporal: no read-for-ownership of the line, and the output
 * does not evict the input from cache); FBN_ST is the ordinary store. */
#if FBN_VEXT
#define FBN_ST(p, v) (*(FBN_NAME(fbn_vu) *)(p) = (v))
#if FBN_X86
#if FBN_VBYTES == 32
#define FBN_ST_NT(p, v) _mm256_stream_si256((__m256i *)(p), (__m256i)(v))
#else
#define FBN_ST_NT(p, v) _mm_stream_si128((__m128i *)(p), (__m128i)(v))
#endif
#else
#define FBN_ST_NT(p, v) FBN_ST(p, v)
#endif
#endif

FBN_FN void FBN_NAME(fbn_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                        FBN_T m, FBN_T s, FBN_T b)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        y[i] = (x[i] - m) * s + b;
}

/* y = (x - m)*s + b; streaming stores when `stream` (the output is not read
 * back soon). */
FBN_FN void FBN_NAME(fbn_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                            FBN_T m, FBN_T s, FBN_T b, int stream)
{
#if FBN_VEXT
    Py_ssize_t i = 0;
    FBN_VT mv = {0}, sv = {0}, bv = {0};
    mv += m;
    sv += s;
    bv += b;
    if (stream) {
        for (; i < n && ((uintptr_t)(y + i) & (FBN_VBYTES - 1)) != 0; i++)
            y[i] = (x[i] - m) * s + b;
        for (; i + 2 * FBN_W <= n; i += 2 * FBN_W) {
            FBN_VT v0 = (FBN_LD(x + i) - mv) * sv + bv;
            FBN_VT v1 = (FBN_LD(x + i + FBN_W) - mv) * sv + bv;
            FBN_ST_NT(y + i, v0);
            FBN_ST_NT(y + i + FBN_W, v1);
        }
        for (; i < n; i++)
            y[i] = (x[i] - m) * s + b;
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_affine)(x, y, n, m, s, b);
}

FBN_FN void FBN_NAME(fbn_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                       Py_ssize_t n, FBN_T m, FBN_T kdy, FBN_T kx, FBN_T kc)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        dx[i] = kdy * dy[i] + (kx * (x[i] - m) + kc);
}

FBN_FN void FBN_NAME(fbn_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                           Py_ssize_t n, FBN_T m, FBN_T kdy, FBN_T kx,
                                           FBN_T kc, int stream)
{
#if FBN_VEXT
    Py_ssize_t i = 0;
    FBN_VT mv = {0}, av = {0}, bv = {0}, cv = {0};
    mv += m;
    av += kdy;
    bv += kx;
    cv += kc;
    if (stream) {
        for (; i < n && ((uintptr_t)(dx + i) & (FBN_VBYTES - 1)) != 0; i++)
            dx[i] = kdy * dy[i] + (kx * (x[i] - m) + kc);
        for (; i + 2 * FBN_W <= n; i += 2 * FBN_W) {
            FBN_VT v0 = av * FBN_LD(dy + i) + (bv * (FBN_LD(x + i) - mv) + cv);
            FBN_VT v1 = av * FBN_LD(dy + i + FBN_W) + (bv * (FBN_LD(x + i + FBN_W) - mv) + cv);
            FBN_ST_NT(dx + i, v0);
            FBN_ST_NT(dx + i + FBN_W, v1);
        }
        for (; i < n; i++)
            dx[i] = kdy * dy[i] + (kx * (x[i] - m) + kc);
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_elemt)(dy, x, dx, n, m, kdy, kx, kc);
}

/* ---------------- rows: (R, ld) row-major, a block of w <= FBN_RL channels ---------------- */

/* Rows statistics, wide form: R rows x w channels (w <= FBN_WIDE, row stride
 * ld) walked one row at a time in memory order, with the tile's per-channel
 * partial sums in two L1-resident arrays; then merged into the per-channel
 * state (n_old rows so far; mean as `off` from `anchor`; m2). k holds the
 * shifts (the first tile's means, then the running mean; the first shift
 * becomes the anchor) and is updated. A strictly sequential walk plus a
 * software prefetch pfd elements ahead (below pf_end) is what streams: a
 * column block walking down the rows was 1.5x one read, four rows at a time
 * 1.7x, one row at a time 1.1-1.3x (1 thread, S/M channels-last). */
FBN_FN void FBN_NAME(fbn_rows_stats_wide)(const FBN_IN_T *x, Py_ssize_t ld, Py_ssize_t R,
                                          Py_ssize_t w, double n_old, FBN_T *k,
                                          double *anchor, double *off, double *m2,
                                          Py_ssize_t pfd, const FBN_IN_T *pf_end)
{
    /* one array, a2 64 bytes past a 4 KiB multiple from a1: a1[j] and a2[j]
     * 4 KiB apart falsely alias (a load of a2[j] waits on the store to a1[j]) */
    FBN_T acc[2 * FBN_WIDE + 64 / sizeof(FBN_T)];
    FBN_T *a1 = acc, *a2 = acc + FBN_WIDE + 64 / sizeof(FBN_T);
    double n_t = (double)R, n_new = n_old + n_t, f = n_t / n_new, g = n_old * n_t / n_new;
    double inv_n = 1.0 / n_t;
    Py_ssize_t r, j;
    for (j = 0; j < w; j++) {
        a1[j] = 0;
        a2[j] = 0;
    }
    for (r = 0; r < R; r++) {
        const FBN_IN_T *x0 = x + r * ld;
        j = 0;
#if FBN_VEXT
        for (; j + FBN_W <= w; j += FBN_W) {
            FBN_VT d0;
            if (((j * sizeof(FBN_IN_T)) & 63) == 0 && x0 + j + pfd < pf_end)
                FBN_PF_ROWS(x0 + j + pfd);
            d0 = FBN_LDI(x0 + j) - FBN_LD(k + j);
            FBN_ST(a1 + j, FBN_LD(a1 + j) + d0);
            FBN_ST(a2 + j, FBN_LD(a2 + j) + d0 * d0);
        }
#endif
        for (; j < w; j++) {
            FBN_T d0 = FBN_XI(x0[j]) - k[j];
            a1[j] += d0;
            a2[j] += d0 * d0;
        }
    }
    if (n_old == 0)
        for (j = 0; j < w; j++) {
            anchor[j] = k[j];
            off[j] = 0;
            m2[j] = 0;
        }
    for (j = 0; j < w; j++) {
        double t1 = a1[j], mt = t1 * inv_n, m2t = a2[j] - t1 * mt, d;
        /* clamp rounding only (no cancellation about the running mean); NaN,
         * from a NaN or inf in the channel, passes through: not `m2t > 0 ? m2t : 0` */
        m2t = m2t < 0 ? 0 : m2t;
        d = ((double)k[j] - anchor[j]) + mt - off[j];
        off[j] += d * f;
        m2[j] += m2t + d * d * g;
        k[j] = (FBN_T)(anchor[j] + off[j]);
    }
}

/* Rows backward sums, wide form (see fbn_rows_stats_wide):
 * sdy += sum(dy), sdyxmu += sum(dy*(x - m)) over R rows x w channels. */
FBN_FN void FBN_NAME(fbn_rows_dot_wide)(const FBN_IN_T *dy, const FBN_IN_T *x, Py_ssize_t ld,
                                        Py_ssize_t R, Py_ssize_t w, const FBN_T *m,
                                        double *sdy, double *sdyxmu,
                                        Py_ssize_t pfd, const FBN_IN_T *pf_end)
{
    /* one array, a2 64 bytes past a 4 KiB multiple from a1: a1[j] and a2[j]
     * 4 KiB apart falsely alias (a load of a2[j] waits on the store to a1[j]) */
    FBN_T acc[2 * FBN_WIDE + 64 / sizeof(FBN_T)];
    FBN_T *a1 = acc, *a2 = acc + FBN_WIDE + 64 / sizeof(FBN_T);
    Py_ssize_t r, j;
    for (j = 0; j < w; j++) {
        a1[j] = 0;
        a2[j] = 0;
    }
    for (r = 0; r < R; r++) {
        const FBN_IN_T *g0 = dy + r * ld, *x0 = x + r * ld;
        j = 0;
#if FBN_VEXT
        for (; j + FBN_W <= w; j += FBN_W) {
            FBN_VT u0;
            if (((j * sizeof(FBN_IN_T)) & 63) == 0 && x0 + j + pfd < pf_end) {
                FBN_PF_ROWS(g0 + j + pfd);
                FBN_PF_ROWS(x0 + j + pfd);
            }
            u0 = FBN_LDI(g0 + j);
            FBN_ST(a1 + j, FBN_LD(a1 + j) + u0);
            FBN_ST(a2 + j, FBN_LD(a2 + j) + u0 * (FBN_LDI(x0 + j) - FBN_LD(m + j)));
        }
#endif
        for (; j < w; j++) {
            FBN_T g = FBN_XI(g0[j]);
            a1[j] += g;
            a2[j] += g * (FBN_XI(x0[j]) - m[j]);
        }
    }
    for (j = 0; j < w; j++) {
        sdy[j] += a1[j];
        sdyxmu[j] += a2[j];
    }
}

/* Element-wise over a flat run of n elements of a (rows, C) array starting at
 * column c0. The per-column constants are tiled to a period P (a multiple of
 * C and of 4, so every vector of outputs sees the same column phase) and
 * padded with 16 wrapped-around values, so a vector starting at any column
 * c < P reads its constants contiguously. */
FBN_FN void FBN_NAME(fbn_rows_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                             Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                             const FBN_T *s, const FBN_T *b)
{
    Py_ssize_t i = 0, c = c0;
#if FBN_VEXT
    for (; i + FBN_W <= n; i += FBN_W) {
        FBN_ST(y + i, (FBN_LD(x + i) - FBN_LD(m + c)) * FBN_LD(s + c) + FBN_LD(b + c));
        c += FBN_W;
        if (c >= P)
            c -= P;
    }
#endif
    for (; i < n; i++) {
        y[i] = (x[i] - m[c]) * s[c] + b[c];
        if (++c == P)
            c = 0;
    }
}

FBN_FN void FBN_NAME(fbn_rows_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                                 Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                                 const FBN_T *s, const FBN_T *b, int stream)
{
#if FBN_VEXT
    if (stream) {
        Py_ssize_t i = 0, c = c0;
        for (; i < n && ((uintptr_t)(y + i) & (FBN_VBYTES - 1)) != 0; i++) {
            y[i] = (x[i] - m[c]) * s[c] + b[c];
            if (++c == P)
                c = 0;
        }
        for (; i + FBN_W <= n; i += FBN_W) {
            FBN_ST_NT(y + i, (FBN_LD(x + i) - FBN_LD(m + c)) * FBN_LD(s + c) + FBN_LD(b + c));
            c += FBN_W;
            if (c >= P)
                c -= P;
        }
        FBN_NAME(fbn_rows_affine)(x + i, y + i, n - i, c, P, m, s, b);
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_rows_affine)(x, y, n, c0, P, m, s, b);
}

FBN_FN void FBN_NAME(fbn_rows_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                            Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                            const FBN_T *m, const FBN_T *kdy, const FBN_T *kx,
                                            const FBN_T *kc)
{
    Py_ssize_t i = 0, c = c0;
#if FBN_VEXT
    for (; i + FBN_W <= n; i += FBN_W) {
        FBN_ST(dx + i, FBN_LD(kdy + c) * FBN_LD(dy + i)
                       + (FBN_LD(kx + c) * (FBN_LD(x + i) - FBN_LD(m + c)) + FBN_LD(kc + c)));
        c += FBN_W;
        if (c >= P)
            c -= P;
    }
#endif
    for (; i < n; i++) {
        dx[i] = kdy[c] * dy[i] + (kx[c] * (x[i] - m[c]) + kc[c]);
        if (++c == P)
            c = 0;
    }
}

FBN_FN void FBN_NAME(fbn_rows_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                                Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                                const FBN_T *m, const FBN_T *kdy,
                                                const FBN_T *kx, const FBN_T *kc, int stream)
{
#if FBN_VEXT
    if (stream) {
        Py_ssize_t i = 0, c = c0;
        for (; i < n && ((uintptr_t)(dx + i) & (FBN_VBYTES - 1)) != 0; i++) {
            dx[i] = kdy[c] * dy[i] + (kx[c] * (x[i] - m[c]) + kc[c]);
            if (++c == P)
                c = 0;
        }
        for (; i + FBN_W <= n; i += FBN_W) {
            FBN_ST_NT(dx + i, FBN_LD(kdy + c) * FBN_LD(dy + i)
                              + (FBN_LD(kx + c) * (FBN_LD(x + i) - FBN_LD(m + c))
                                 + FBN_LD(kc + c)));
            c += FBN_W;
            if (c >= P)
                c -= P;
        }
        FBN_NAME(fbn_rows_elemt)(dy + i, x + i, dx + i, n - i, c, P, m, kdy, kx, kc);
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_rows_elemt)(dy, x, dx, n, c0, P, m, kdy, kx, kc);
}

#ifdef FBN_U16_IN
/* ---------------- element-wise on 16-bit data (FBN_U16_IN) ----------------
 *
 * Fused loops for 16-bit data: load 8 values converted in registers
 * (FBN_U16_LD8), the same float32 arithmetic as the float AVX2+FMA loops above,
 * round back with FBN_U16_ST8(p, v, stream) (8 values; a 16-byte streaming
 * store when asked) or FBN_U16_TO(f) (one value). The FMAs are spelled out:
 * gcc contracts (x - m)*s + b and kdy*dy + (kx*(x - m) + kc) in the float
 * loops to fma(x - m, s, b) and fma(kdy, dy, fma(kx, x - m, kc)), but would
 * not contract the outer add in the scalar form here; spelled out, the results
 * are bit-identical to converting a float32 tile, running fbn_affine_f32 etc.
 * on it and rounding back.
 *
 * Optionally (FBN_U16_LD16 defined) a main loop takes 16 values at a time:
 * FBN_U16_LD16(p, a, b) loads them as two vectors in an order of the
 * includer's choosing and FBN_U16_ST16(p, a, b, stream) stores two result
 * vectors given in that same order (a 32-byte store; streaming ones need
 * FBN_U16_HEAD to align the output to 32 bytes); FBN_U16_LD16_ORD /
 * FBN_U16_ST16_ORD do the same in memory order, for the rows loops whose
 * constants vary along the vector. Same arithmetic per element either way.
 * FBN_U16_HEAD(dst, n, stream): elements written one by one before the
 * vector stores are aligned. */

FBN_FN void FBN_NAME(fbn_affine_u16)(const uint16_t *x, uint16_t *y, Py_ssize_t n, float m,
                                     float s, float b, int stream)
{
    Py_ssize_t i = 0, head = FBN_U16_HEAD(y, n, stream);
    FBN_VT mv = {0}, sv = {0}, bv = {0};
    mv += m;
    sv += s;
    bv += b;
    for (; i < head; i++)
        y[i] = FBN_U16_TO(__builtin_fmaf(FBN_XI(x[i]) - m, s, b));
#ifdef FBN_U16_LD16
    for (; i + 16 <= n; i += 16) {
        FBN_VT a0, a1;
        FBN_U16_LD16(x + i, a0, a1);
        FBN_U16_ST16(y + i, _mm256_fmadd_ps(a0 - mv, sv, bv), _mm256_fmadd_ps(a1 - mv, sv, bv),
                     stream);
    }
#endif
    for (; i + 8 <= n; i += 8)
        FBN_U16_ST8(y + i, _mm256_fmadd_ps(FBN_LDI(x + i) - mv, sv, bv), stream);
    for (; i < n; i++)
        y[i] = FBN_U16_TO(__builtin_fmaf(FBN_XI(x[i]) - m, s, b));
}

FBN_FN void FBN_NAME(fbn_elemt_u16)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                    Py_ssize_t n, float m, float kdy, float kx, float kc,
                                    int stream)
{
    Py_ssize_t i = 0, head = FBN_U16_HEAD(dx, n, stream);
    FBN_VT mv = {0}, av = {0}, bv = {0}, cv = {0};
    mv += m;
    av += kdy;
    bv += kx;
    cv += kc;
    for (; i < head; i++)
        dx[i] = FBN_U16_TO(__builtin_fmaf(kdy, FBN_XI(dy[i]), __builtin_fmaf(kx, FBN_XI(x[i]) - m, kc)));
#ifdef FBN_U16_LD16
    for (; i + 16 <= n; i += 16) {
        FBN_VT g0, g1, a0, a1;
        FBN_U16_LD16(dy + i, g0, g1);
        FBN_U16_LD16(x + i, a0, a1);
        FBN_U16_ST16(dx + i, _mm256_fmadd_ps(av, g0, _mm256_fmadd_ps(bv, a0 - mv, cv)),
                     _mm256_fmadd_ps(av, g1, _mm256_fmadd_ps(bv, a1 - mv, cv)), stream);
    }
#endif
    for (; i + 8 <= n; i += 8)
        FBN_U16_ST8(dx + i, _mm256_fmadd_ps(av, FBN_LDI(dy + i), _mm256_fmadd_ps(bv, FBN_LDI(x + i) - mv, cv)), stream);
    for (; i < n; i++)
        dx[i] = FBN_U16_TO(__builtin_fmaf(kdy, FBN_XI(dy[i]), __builtin_fmaf(kx, FBN_XI(x[i]) - m, kc)));
}

/* Rows forms: constants tiled to period P (see fbn_rows_affine above; their 16
 * wrapped-around values let a 16-value step read m + c .. m + c + 15, c < P). */
FBN_FN void FBN_NAME(fbn_rows_affine_u16)(const uint16_t *x, uint16_t *y, Py_ssize_t n,
                                          Py_ssize_t c0, Py_ssize_t P, const float *m,
                                          const float *s, const float *b, int stream)
{
    Py_ssize_t i = 0, c = c0, head = FBN_U16_HEAD(y, n, stream);
    for (; i < head; i++) {
        y[i] = FBN_U16_TO(__builtin_fmaf(FBN_XI(x[i]) - m[c], s[c], b[c]));
        if (++c == P)
            c = 0;
    }
#ifdef FBN_U16_LD16_ORD
    for (; i + 16 <= n; i += 16) {
        FBN_VT a0, a1;
        FBN_U16_LD16_ORD(x + i, a0, a1);
        FBN_U16_ST16_ORD(y + i,
                         _mm256_fmadd_ps(a0 - FBN_LD(m + c), FBN_LD(s + c), FBN_LD(b + c)),
                         _mm256_fmadd_ps(a1 - FBN_LD(m + c + 8), FBN_LD(s + c + 8),
                                         FBN_LD(b + c + 8)),
                         stream);
        c += 16;
        if (c >= P)
            c -= P;
    }
#endif
    for (; i + 8 <= n; i += 8) {
        FBN_U16_ST8(y + i, _mm256_fmadd_ps(FBN_LDI(x + i) - FBN_LD(m + c), FBN_LD(s + c), FBN_LD(b + c)), stream);
        c += 8;
        if (c >= P)
            c -= P;
    }
    for (; i < n; i++) {
        y[i] = FBN_U16_TO(__builtin_fmaf(FBN_XI(x[i]) - m[c], s[c], b[c]));
        if (++c == P)
            c = 0;
    }
}

FBN_FN void FBN_NAME(fbn_rows_elemt_u16)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                         Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                         const float *m, const float *kdy, const float *kx,
                                         const float *kc, int stream)
{
    Py_ssize_t i = 0, c = c0, head = FBN_U16_HEAD(dx, n, stream);
    for (; i < head; i++) {
        dx[i] = FBN_U16_TO(__builtin_fmaf(kdy[c], FBN_XI(dy[i]),
                                          __builtin_fmaf(kx[c], FBN_XI(x[i]) - m[c], kc[c])));
        if (++c == P)
            c = 0;
    }
#ifdef FBN_U16_LD16_ORD
    for (; i + 16 <= n; i += 16) {
        FBN_VT g0, g1, a0, a1;
        FBN_U16_LD16_ORD(dy + i, g0, g1);
        FBN_U16_LD16_ORD(x + i, a0, a1);
        FBN_U16_ST16_ORD(dx + i,
                         _mm256_fmadd_ps(FBN_LD(kdy + c), g0,
                                         _mm256_fmadd_ps(FBN_LD(kx + c), a0 - FBN_LD(m + c),
                                                         FBN_LD(kc + c))),
                         _mm256_fmadd_ps(FBN_LD(kdy + c + 8), g1,
                                         _mm256_fmadd_ps(FBN_LD(kx + c + 8), a1 - FBN_LD(m + c + 8),
                                                         FBN_LD(kc + c + 8))),
                         stream);
        c += 16;
        if (c >= P)
            c -= P;
    }
#endif
    for (; i + 8 <= n; i += 8) {
        FBN_U16_ST8(dx + i, _mm256_fmadd_ps(FBN_LD(kdy + c), FBN_LDI(dy + i),
                                            _mm256_fmadd_ps(FBN_LD(kx + c), FBN_LDI(x + i) - FBN_LD(m + c),
                                                            FBN_LD(kc + c))),
                    stream);
        c += 8;
        if (c >= P)
            c -= P;
    }
    for (; i < n; i++) {
        dx[i] = FBN_U16_TO(__builtin_fmaf(kdy[c], FBN_XI(dy[i]),
                                          __builtin_fmaf(kx[c], FBN_XI(x[i]) - m[c], kc[c])));
        if (++c == P)
            c = 0;
    }
}
#endif /* FBN_U16_IN */

#undef FBN_IN_T
#undef FBN_LDI
#undef FBN_XI
#undef FBN_STEP_BYTES
#if FBN_VEXT
#undef FBN_ST
#undef FBN_ST_NT
#undef FBN_VT
#undef FBN_LD
#undef FBN_W
#undef FBN_NV
#endif
