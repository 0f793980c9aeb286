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

/* ---------------- epilogues (activation, residual, gradient mask) ----------------
 *
 * Forward: v (+ z[i]) then relu(v) = 0 where v < 0, else v (NaN stays NaN, -0
 * stays -0: as maxps(0, v)), in FBN_T before the one rounding to the data type;
 * z NULL: no residual, no read. Backward: g = dy where the saved output ys > 0,
 * else 0; ys NULL: g = dy, no read. The flags and pointers are loop-invariant:
 * the compiler unswitches the loops, so the plain kernels run the plain loops. */
FBN_FN FBN_T FBN_NAME(fbn_epi1)(FBN_T v, const FBN_IN_T *z, Py_ssize_t i, int relu)
{
    if (z)
        v += FBN_XI(z[i]);
    return relu && v < 0 ? 0 : v;
}

FBN_FN FBN_T FBN_NAME(fbn_gate1)(FBN_T g, const FBN_IN_T *ys, Py_ssize_t i)
{
    return ys && !(FBN_XI(ys[i]) > 0) ? 0 : g;
}

#if FBN_VEXT
/* lanes of a vector comparison's result: all ones (true) or 0 */
typedef __typeof__((FBN_VT){0} < (FBN_VT){0}) FBN_NAME(fbn_vm);
#define FBN_VM FBN_NAME(fbn_vm)

FBN_FN FBN_VT FBN_NAME(fbn_relu)(FBN_VT v)
{
    FBN_VT zero = {0};
    return (FBN_VT)((FBN_VM)v & ~(v < zero));
}

/* g where yv > 0, else +0 (NaN in yv: 0) */
FBN_FN FBN_VT FBN_NAME(fbn_keep)(FBN_VT g, FBN_VT yv)
{
    FBN_VT zero = {0};
    return (FBN_VT)((FBN_VM)g & (yv > zero));
}

FBN_FN FBN_VT FBN_NAME(fbn_epi)(FBN_VT v, const FBN_IN_T *z, Py_ssize_t i, int relu)
{
    if (z)
        v += FBN_LDI(z + i);
    return relu ? FBN_NAME(fbn_relu)(v) : v;
}

FBN_FN FBN_VT FBN_NAME(fbn_gate)(FBN_VT g, const FBN_IN_T *ys, Py_ssize_t i)
{
    return ys ? FBN_NAME(fbn_keep)(g, FBN_LDI(ys + i)) : g;
}
#endif

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
                                         FBN_T m, double *sdy, double *sdyxmu, Py_ssize_t pf,
                                         const FBN_IN_T *ys)
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
                if (ys)
                    fbn_prefetch((const char *)(ys + i + pf) + q);
            }
        }
        g0 = FBN_NAME(fbn_gate)(FBN_LDI(dy + i), ys, i);
        g1 = FBN_NAME(fbn_gate)(FBN_LDI(dy + i + FBN_W), ys, i + FBN_W);
        g2 = FBN_NAME(fbn_gate)(FBN_LDI(dy + i + 2 * FBN_W), ys, i + 2 * FBN_W);
        g3 = FBN_NAME(fbn_gate)(FBN_LDI(dy + i + 3 * FBN_W), ys, i + 3 * FBN_W);
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
        FBN_T g = FBN_NAME(fbn_gate1)(FBN_XI(dy[i]), ys, i);
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

/* y = epilogue((x - m)*s + b): + z (unless NULL), relu when `relu`. */
FBN_FN void FBN_NAME(fbn_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                        FBN_T m, FBN_T s, FBN_T b, const FBN_IN_T *z, int relu)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        y[i] = FBN_NAME(fbn_epi1)((x[i] - m) * s + b, z, i, relu);
}

/* As fbn_affine; streaming stores when `stream` (the output is not read
 * back soon). */
FBN_FN void FBN_NAME(fbn_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                            FBN_T m, FBN_T s, FBN_T b, const FBN_IN_T *z,
                                            int relu, int stream)
{
#if FBN_VEXT
    Py_ssize_t i = 0;
    FBN_VT mv = {0}, sv = {0}, bv = {0};
    mv += m;
    sv += s;
    bv += b;
    if (stream) {
        for (; i < n && ((uintptr_t)(y + i) & (FBN_VBYTES - 1)) != 0; i++)
            y[i] = FBN_NAME(fbn_epi1)((x[i] - m) * s + b, z, i, relu);
        for (; i + 2 * FBN_W <= n; i += 2 * FBN_W) {
            FBN_VT v0 = FBN_NAME(fbn_epi)((FBN_LD(x + i) - mv) * sv + bv, z, i, relu);
            FBN_VT v1 = FBN_NAME(fbn_epi)((FBN_LD(x + i + FBN_W) - mv) * sv + bv, z, i + FBN_W,
                                          relu);
            FBN_ST_NT(y + i, v0);
            FBN_ST_NT(y + i + FBN_W, v1);
        }
        FBN_NAME(fbn_affine)(x + i, y + i, n - i, m, s, b, z ? z + i : z, relu);
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_affine)(x, y, n, m, s, b, z, relu);
}

/* dx = kdy*g + (kx*(x - m) + kc), g = dy masked by ys (unless NULL); dz = g
 * unless dz is NULL. */
FBN_FN void FBN_NAME(fbn_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                       Py_ssize_t n, FBN_T m, FBN_T kdy, FBN_T kx, FBN_T kc,
                                       const FBN_IN_T *ys, FBN_T *dz)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        FBN_T g = FBN_NAME(fbn_gate1)(dy[i], ys, i);
        dx[i] = kdy * g + (kx * (x[i] - m) + kc);
        if (dz)
            dz[i] = g;
    }
}

FBN_FN void FBN_NAME(fbn_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                           Py_ssize_t n, FBN_T m, FBN_T kdy, FBN_T kx,
                                           FBN_T kc, const FBN_IN_T *ys, FBN_T *dz, int stream)
{
#if FBN_VEXT
    Py_ssize_t i = 0;
    FBN_VT mv = {0}, av = {0}, bv = {0}, cv = {0};
    mv += m;
    av += kdy;
    bv += kx;
    cv += kc;
    if (stream) {
        Py_ssize_t h = 0;
        while (h < n && ((uintptr_t)(dx + h) & (FBN_VBYTES - 1)) != 0)
            h++;
        FBN_NAME(fbn_elemt)(dy, x, dx, h, m, kdy, kx, kc, ys, dz);
        for (i = h; i + 2 * FBN_W <= n; i += 2 * FBN_W) {
            FBN_VT g0 = FBN_NAME(fbn_gate)(FBN_LD(dy + i), ys, i);
            FBN_VT g1 = FBN_NAME(fbn_gate)(FBN_LD(dy + i + FBN_W), ys, i + FBN_W);
            FBN_VT v0 = av * g0 + (bv * (FBN_LD(x + i) - mv) + cv);
            FBN_VT v1 = av * g1 + (bv * (FBN_LD(x + i + FBN_W) - mv) + cv);
            FBN_ST_NT(dx + i, v0);
            FBN_ST_NT(dx + i + FBN_W, v1);
            if (dz) {   /* ordinary stores: dz need not share dx's alignment */
                FBN_ST(dz + i, g0);
                FBN_ST(dz + i + FBN_W, g1);
            }
        }
        FBN_NAME(fbn_elemt)(dy + i, x + i, dx + i, n - i, m, kdy, kx, kc, ys ? ys + i : ys,
                            dz ? dz + i : dz);
        return;
    }
#endif
    (void)stream;
    FBN_NAME(fbn_elemt)(dy, x, dx, n, m, kdy, kx, kc, ys, dz);
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
    r = 0;
#if FBN_VEXT
    /* two rows per step: one load and store of each partial sum per two vectors of x
     * (the partial sums' L1 traffic, not x, bounds the walk when x is in cache).
     * Measured, 1 thread, float32 stats against one row per step: hot (256, 2048)
     * 0.70x; cold (4096, 1024) 0.99x, (100352, 64) 0.81x, (100352, 256) 0.93x
     * (float16: 1.03x, 0.67x). Not for float64 (cold (4096, 1024): 1.05-1.08x), nor
     * in fbn_rows_dot_wide (four streams: 1.38x on cold (4096, 1024) float32). */
    for (; sizeof(FBN_T) == 4 && r + 2 <= R; r += 2) {
        const FBN_IN_T *x0 = x + r * ld, *x1 = x0 + ld;
        j = 0;
        for (; j + FBN_W <= w; j += FBN_W) {
            FBN_VT d0, d1, kj;
            if (((j * sizeof(FBN_IN_T)) & 63) == 0 && x1 + j + pfd < pf_end) {
                FBN_PF_ROWS(x0 + j + pfd);
                FBN_PF_ROWS(x1 + j + pfd);
            }
            kj = FBN_LD(k + j);
            d0 = FBN_LDI(x0 + j) - kj;
            d1 = FBN_LDI(x1 + j) - kj;
            FBN_ST(a1 + j, FBN_LD(a1 + j) + (d0 + d1));
            FBN_ST(a2 + j, FBN_LD(a2 + j) + (d0 * d0 + d1 * d1));
        }
        for (; j < w; j++) {
            FBN_T e0 = FBN_XI(x0[j]) - k[j], e1 = FBN_XI(x1[j]) - k[j];
            a1[j] += e0 + e1;
            a2[j] += e0 * e0 + e1 * e1;
        }
    }
#endif
    for (; r < R; r++) {
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
 * sdy += sum(g), sdyxmu += sum(g*(x - m)) over R rows x w channels, g = dy
 * masked by ys (same layout as dy) unless ys is NULL. */
FBN_FN void FBN_NAME(fbn_rows_dot_wide)(const FBN_IN_T *dy, const FBN_IN_T *x, Py_ssize_t ld,
                                        Py_ssize_t R, Py_ssize_t w, const FBN_T *m,
                                        double *sdy, double *sdyxmu,
                                        Py_ssize_t pfd, const FBN_IN_T *pf_end,
                                        const FBN_IN_T *ys)
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
        const FBN_IN_T *g0 = dy + r * ld, *x0 = x + r * ld, *y0 = ys ? ys + r * ld : ys;
        j = 0;
#if FBN_VEXT
        for (; j + FBN_W <= w; j += FBN_W) {
            FBN_VT u0;
            if (((j * sizeof(FBN_IN_T)) & 63) == 0 && x0 + j + pfd < pf_end) {
                FBN_PF_ROWS(g0 + j + pfd);
                FBN_PF_ROWS(x0 + j + pfd);
                if (y0)
                    FBN_PF_ROWS(y0 + j + pfd);
            }
            u0 = FBN_NAME(fbn_gate)(FBN_LDI(g0 + j), y0, j);
            FBN_ST(a1 + j, FBN_LD(a1 + j) + u0);
            FBN_ST(a2 + j, FBN_LD(a2 + j) + u0 * (FBN_LDI(x0 + j) - FBN_LD(m + j)));
        }
#endif
        for (; j < w; j++) {
            FBN_T g = FBN_NAME(fbn_gate1)(FBN_XI(g0[j]), y0, j);
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
/* Forward and backward of the rows family share one walk: a vector of outputs
 * at column c (the constants' phase) per step; `stream` writes the output with
 * streaming stores once it is aligned. Affine (kdy NULL): y = epilogue((x -
 * m)*s + b) (z, relu as fbn_affine). Element-wise backward (kdy set; s, b are
 * kx, kc): dx = kdy*g + (kx*(x - m) + kc), g = dy masked by ys, dz = g. */
FBN_FN __attribute__((always_inline)) void FBN_NAME(fbn_rows_walk)(const FBN_T *dy, const FBN_T *x, FBN_T *out, Py_ssize_t n,
                                    Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                    const FBN_T *kdy, const FBN_T *s, const FBN_T *b,
                                    const FBN_IN_T *z, int relu, FBN_T *dz, int stream)
{
    Py_ssize_t i = 0, c = c0, head = 0;
#if FBN_VEXT
    if (stream)
        while (head < n && ((uintptr_t)(out + head) & (FBN_VBYTES - 1)) != 0)
            head++;
#endif
    for (;;) {
        for (; i < head; i++) {
            if (kdy) {
                FBN_T g = FBN_NAME(fbn_gate1)(dy[i], z, i);
                out[i] = kdy[c] * g + (s[c] * (x[i] - m[c]) + b[c]);
                if (dz)
                    dz[i] = g;
            } else {
                out[i] = FBN_NAME(fbn_epi1)((x[i] - m[c]) * s[c] + b[c], z, i, relu);
            }
            if (++c == P)
                c = 0;
        }
        if (head == n)
            return;
#if FBN_VEXT
        for (; i + FBN_W <= n; i += FBN_W) {
            FBN_VT v, g = {0};
            if (kdy) {
                g = FBN_NAME(fbn_gate)(FBN_LD(dy + i), z, i);
                v = FBN_LD(kdy + c) * g + (FBN_LD(s + c) * (FBN_LD(x + i) - FBN_LD(m + c))
                                           + FBN_LD(b + c));
            } else {
                v = FBN_NAME(fbn_epi)((FBN_LD(x + i) - FBN_LD(m + c)) * FBN_LD(s + c)
                                      + FBN_LD(b + c), z, i, relu);
            }
            if (stream)
                FBN_ST_NT(out + i, v);
            else
                FBN_ST(out + i, v);
            if (kdy && dz)
                FBN_ST(dz + i, g);
            c += FBN_W;
            if (c >= P)
                c -= P;
        }
#endif
        head = n;   /* the scalar tail */
    }
}

FBN_FN void FBN_NAME(fbn_rows_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                             Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                             const FBN_T *s, const FBN_T *b,
                                             const FBN_IN_T *z, int relu)
{
    FBN_NAME(fbn_rows_walk)(NULL, x, y, n, c0, P, m, NULL, s, b, z, relu, NULL, 0);
}

FBN_FN void FBN_NAME(fbn_rows_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                                 Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                                 const FBN_T *s, const FBN_T *b,
                                                 const FBN_IN_T *z, int relu, int stream)
{
    FBN_NAME(fbn_rows_walk)(NULL, x, y, n, c0, P, m, NULL, s, b, z, relu, NULL, stream);
}

FBN_FN void FBN_NAME(fbn_rows_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                            Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                            const FBN_T *m, const FBN_T *kdy, const FBN_T *kx,
                                            const FBN_T *kc, const FBN_IN_T *ys, FBN_T *dz)
{
    FBN_NAME(fbn_rows_walk)(dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, 0, dz, 0);
}

FBN_FN void FBN_NAME(fbn_rows_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                                Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                                const FBN_T *m, const FBN_T *kdy,
                                                const FBN_T *kx, const FBN_T *kc,
                                                const FBN_IN_T *ys, FBN_T *dz, int stream)
{
    FBN_NAME(fbn_rows_walk)(dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, 0, dz, stream);
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

/* The epilogue on a pair of result vectors at element i loaded as LD16 loads
 * (z, relu as fbn_epi); and the gradient mask on a pair (ys as fbn_gate). */
#define FBN_EPI16(v0, v1, z, i, relu, LD16)                                 \
    do {                                                                    \
        if (z) {                                                            \
            FBN_VT z0_, z1_;                                                \
            LD16((z) + (i), z0_, z1_);                                      \
            (v0) += z0_;                                                    \
            (v1) += z1_;                                                    \
        }                                                                   \
        if (relu) {                                                         \
            (v0) = FBN_NAME(fbn_relu)(v0);                                  \
            (v1) = FBN_NAME(fbn_relu)(v1);                                  \
        }                                                                   \
    } while (0)
#define FBN_GATE16(g0, g1, ys, i, LD16)                                     \
    do {                                                                    \
        if (ys) {                                                           \
            FBN_VT y0_, y1_;                                                \
            LD16((ys) + (i), y0_, y1_);                                     \
            (g0) = FBN_NAME(fbn_keep)(g0, y0_);                             \
            (g1) = FBN_NAME(fbn_keep)(g1, y1_);                             \
        }                                                                   \
    } while (0)

/* y = epilogue((x - m)*s + b) (z, relu as fbn_affine). */
FBN_FN __attribute__((always_inline)) void FBN_NAME(fbn_affine_u16_k)(const uint16_t *x, uint16_t *y, Py_ssize_t n, float m,
                                     float s, float b, const uint16_t *z, int relu, int stream)
{
    Py_ssize_t i = 0, head = FBN_U16_HEAD(y, n, stream);
    FBN_VT mv = {0}, sv = {0}, bv = {0};
    mv += m;
    sv += s;
    bv += b;
    for (; i < head; i++)
        y[i] = FBN_U16_TO(FBN_NAME(fbn_epi1)(__builtin_fmaf(FBN_XI(x[i]) - m, s, b), z, i, relu));
#ifdef FBN_U16_LD16
    for (; i + 16 <= n; i += 16) {
        FBN_VT a0, a1;
        FBN_U16_LD16(x + i, a0, a1);
        a0 = _mm256_fmadd_ps(a0 - mv, sv, bv);
        a1 = _mm256_fmadd_ps(a1 - mv, sv, bv);
        FBN_EPI16(a0, a1, z, i, relu, FBN_U16_LD16);
        FBN_U16_ST16(y + i, a0, a1, stream);
    }
#endif
    for (; i + 8 <= n; i += 8)
        FBN_U16_ST8(y + i, FBN_NAME(fbn_epi)(_mm256_fmadd_ps(FBN_LDI(x + i) - mv, sv, bv), z, i,
                                             relu), stream);
    for (; i < n; i++)
        y[i] = FBN_U16_TO(FBN_NAME(fbn_epi1)(__builtin_fmaf(FBN_XI(x[i]) - m, s, b), z, i, relu));
}

/* dx = kdy*g + (kx*(x - m) + kc), g = dy masked by ys; dz = g (ordinary
 * stores) unless dz is NULL. */
FBN_FN __attribute__((always_inline)) void FBN_NAME(fbn_elemt_u16_k)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                    Py_ssize_t n, float m, float kdy, float kx, float kc,
                                    const uint16_t *ys, uint16_t *dz, int stream)
{
    Py_ssize_t i = 0, head = FBN_U16_HEAD(dx, n, stream);
    FBN_VT mv = {0}, av = {0}, bv = {0}, cv = {0};
    mv += m;
    av += kdy;
    bv += kx;
    cv += kc;
    for (;;) {
        for (; i < head; i++) {
            float g = FBN_NAME(fbn_gate1)(FBN_XI(dy[i]), ys, i);
            dx[i] = FBN_U16_TO(__builtin_fmaf(kdy, g, __builtin_fmaf(kx, FBN_XI(x[i]) - m, kc)));
            if (dz)
                dz[i] = FBN_U16_TO(g);
        }
        if (head == n)
            return;
#ifdef FBN_U16_LD16
        for (; i + 16 <= n; i += 16) {
            FBN_VT g0, g1, a0, a1;
            FBN_U16_LD16(dy + i, g0, g1);
            FBN_GATE16(g0, g1, ys, i, FBN_U16_LD16);
            FBN_U16_LD16(x + i, a0, a1);
            FBN_U16_ST16(dx + i, _mm256_fmadd_ps(av, g0, _mm256_fmadd_ps(bv, a0 - mv, cv)),
                         _mm256_fmadd_ps(av, g1, _mm256_fmadd_ps(bv, a1 - mv, cv)), stream);
            if (dz)
                FBN_U16_ST16(dz + i, g0, g1, 0);
        }
#endif
        for (; i + 8 <= n; i += 8) {
            FBN_VT g = FBN_NAME(fbn_gate)(FBN_LDI(dy + i), ys, i);
            FBN_U16_ST8(dx + i, _mm256_fmadd_ps(av, g, _mm256_fmadd_ps(bv, FBN_LDI(x + i) - mv, cv)),
                        stream);
            if (dz)
                FBN_U16_ST8(dz + i, g, 0);
        }
        head = n;   /* the scalar tail */
    }
}

/* Rows forms: constants tiled to period P (see fbn_rows_affine above; their 16
 * wrapped-around values let a 16-value step read m + c .. m + c + 15, c < P). */
FBN_FN __attribute__((always_inline)) void FBN_NAME(fbn_rows_affine_u16_k)(const uint16_t *x, uint16_t *y, Py_ssize_t n,
                                          Py_ssize_t c0, Py_ssize_t P, const float *m,
                                          const float *s, const float *b, const uint16_t *z,
                                          int relu, int stream)
{
    Py_ssize_t i = 0, c = c0, head = FBN_U16_HEAD(y, n, stream);
    for (;;) {
        for (; i < head; i++) {
            y[i] = FBN_U16_TO(FBN_NAME(fbn_epi1)(__builtin_fmaf(FBN_XI(x[i]) - m[c], s[c], b[c]),
                                                 z, i, relu));
            if (++c == P)
                c = 0;
        }
        if (head == n)
            return;
#ifdef FBN_U16_LD16_ORD
        for (; i + 16 <= n; i += 16) {
            FBN_VT a0, a1;
            FBN_U16_LD16_ORD(x + i, a0, a1);
            a0 = _mm256_fmadd_ps(a0 - FBN_LD(m + c), FBN_LD(s + c), FBN_LD(b + c));
            a1 = _mm256_fmadd_ps(a1 - FBN_LD(m + c + 8), FBN_LD(s + c + 8), FBN_LD(b + c + 8));
            FBN_EPI16(a0, a1, z, i, relu, FBN_U16_LD16_ORD);
            FBN_U16_ST16_ORD(y + i, a0, a1, stream);
            c += 16;
            if (c >= P)
                c -= P;
        }
#endif
        for (; i + 8 <= n; i += 8) {
            FBN_U16_ST8(y + i, FBN_NAME(fbn_epi)(_mm256_fmadd_ps(FBN_LDI(x + i) - FBN_LD(m + c),
                                                                 FBN_LD(s + c), FBN_LD(b + c)),
                                                 z, i, relu),
                        stream);
            c += 8;
            if (c >= P)
                c -= P;
        }
        head = n;   /* the scalar tail */
    }
}

FBN_FN __attribute__((always_inline)) void FBN_NAME(fbn_rows_elemt_u16_k)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                         Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                         const float *m, const float *kdy, const float *kx,
                                         const float *kc, const uint16_t *ys, uint16_t *dz,
                                         int stream)
{
    Py_ssize_t i = 0, c = c0, head = FBN_U16_HEAD(dx, n, stream);
    for (;;) {
        for (; i < head; i++) {
            float g = FBN_NAME(fbn_gate1)(FBN_XI(dy[i]), ys, i);
            dx[i] = FBN_U16_TO(__builtin_fmaf(kdy[c], g,
                                              __builtin_fmaf(kx[c], FBN_XI(x[i]) - m[c], kc[c])));
            if (dz)
                dz[i] = FBN_U16_TO(g);
            if (++c == P)
                c = 0;
        }
        if (head == n)
            return;
#ifdef FBN_U16_LD16_ORD
        for (; i + 16 <= n; i += 16) {
            FBN_VT g0, g1, a0, a1;
            FBN_U16_LD16_ORD(dy + i, g0, g1);
            FBN_GATE16(g0, g1, ys, i, FBN_U16_LD16_ORD);
            FBN_U16_LD16_ORD(x + i, a0, a1);
            FBN_U16_ST16_ORD(dx + i,
                             _mm256_fmadd_ps(FBN_LD(kdy + c), g0,
                                             _mm256_fmadd_ps(FBN_LD(kx + c), a0 - FBN_LD(m + c),
                                                             FBN_LD(kc + c))),
                             _mm256_fmadd_ps(FBN_LD(kdy + c + 8), g1,
                                             _mm256_fmadd_ps(FBN_LD(kx + c + 8),
                                                             a1 - FBN_LD(m + c + 8),
                                                             FBN_LD(kc + c + 8))),
                             stream);
            if (dz)
                FBN_U16_ST16_ORD(dz + i, g0, g1, 0);
            c += 16;
            if (c >= P)
                c -= P;
        }
#endif
        for (; i + 8 <= n; i += 8) {
            FBN_VT g = FBN_NAME(fbn_gate)(FBN_LDI(dy + i), ys, i);
            FBN_U16_ST8(dx + i, _mm256_fmadd_ps(FBN_LD(kdy + c), g,
                                                _mm256_fmadd_ps(FBN_LD(kx + c),
                                                                FBN_LDI(x + i) - FBN_LD(m + c),
                                                                FBN_LD(kc + c))),
                        stream);
            if (dz)
                FBN_U16_ST8(dz + i, g, 0);
            c += 8;
            if (c >= P)
                c -= P;
        }
        head = n;   /* the scalar tail */
    }
}
#undef FBN_EPI16
#undef FBN_GATE16

/* The entry points: the loops above inlined with their epilogue arguments, or with
 * the constants NULL / 0 when there is no epilogue, so that the plain kernels run
 * loops with no trace of it (gcc does not unswitch these loops by itself). */
#define FBN_SPLIT(plain, loop, plain_args, args)                            \
    do {                                                                    \
        if (plain)                                                          \
            loop plain_args;                                                \
        else                                                                \
            loop args;                                                      \
    } while (0)

FBN_FN void FBN_NAME(fbn_affine_u16)(const uint16_t *x, uint16_t *y, Py_ssize_t n, float m,
                                     float s, float b, const uint16_t *z, int relu, int stream)
{
    FBN_SPLIT(!z && !relu, FBN_NAME(fbn_affine_u16_k), (x, y, n, m, s, b, NULL, 0, stream),
              (x, y, n, m, s, b, z, relu, stream));
}

FBN_FN void FBN_NAME(fbn_elemt_u16)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                    Py_ssize_t n, float m, float kdy, float kx, float kc,
                                    const uint16_t *ys, uint16_t *dz, int stream)
{
    FBN_SPLIT(!ys && !dz, FBN_NAME(fbn_elemt_u16_k),
              (dy, x, dx, n, m, kdy, kx, kc, NULL, NULL, stream),
              (dy, x, dx, n, m, kdy, kx, kc, ys, dz, stream));
}

FBN_FN void FBN_NAME(fbn_rows_affine_u16)(const uint16_t *x, uint16_t *y, Py_ssize_t n,
                                          Py_ssize_t c0, Py_ssize_t P, const float *m,
                                          const float *s, const float *b, const uint16_t *z,
                                          int relu, int stream)
{
    FBN_SPLIT(!z && !relu, FBN_NAME(fbn_rows_affine_u16_k),
              (x, y, n, c0, P, m, s, b, NULL, 0, stream),
              (x, y, n, c0, P, m, s, b, z, relu, stream));
}

FBN_FN void FBN_NAME(fbn_rows_elemt_u16)(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                         Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                         const float *m, const float *kdy, const float *kx,
                                         const float *kc, const uint16_t *ys, uint16_t *dz,
                                         int stream)
{
    FBN_SPLIT(!ys && !dz, FBN_NAME(fbn_rows_elemt_u16_k),
              (dy, x, dx, n, c0, P, m, kdy, kx, kc, NULL, NULL, stream),
              (dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, dz, stream));
}
#undef FBN_SPLIT
#endif /* FBN_U16_IN */

#undef FBN_IN_T
#undef FBN_LDI
#undef FBN_XI
#undef FBN_STEP_BYTES
#if FBN_VEXT
#undef FBN_VM
#undef FBN_ST
#undef FBN_ST_NT
#undef FBN_VT
#undef FBN_LD
#undef FBN_W
#undef FBN_NV
#endif
