/* Run-time dispatch wrappers for one element type FBN_T: FBN_D(name) calls
 * the AVX2+FMA instantiation FBN_AVX(name) when fbn_avx2 is set, else the
 * baseline FBN_BASE(name). Included by _bn_simd.h once per type. */
#if FBN_AVX2_DISPATCH
#define FBN_CALL(name, args) (fbn_avx2 ? FBN_AVX(name) args : FBN_BASE(name) args)
#else
#define FBN_CALL(name, args) (FBN_BASE(name) args)
#endif

static inline double FBN_D(fbn_sum)(const FBN_T *x, Py_ssize_t n, const FBN_T *pf)
{
    return FBN_CALL(fbn_sum, (x, n, pf));
}

static inline void FBN_D(fbn_shifted_sums)(const FBN_T *x, Py_ssize_t n, FBN_T k, double *s1,
                                           double *s2, const FBN_T *pf)
{
    FBN_CALL(fbn_shifted_sums, (x, n, k, s1, s2, pf));
}

/* The epilogue arguments (z, relu; ys, dz) are NULL / 0 when absent: see
 * "epilogues" in _bn_simd_t.h. */
static inline void FBN_D(fbn_dot_xmu)(const FBN_T *dy, const FBN_T *x, Py_ssize_t n, FBN_T m,
                                      double *sdy, double *sdyxmu, Py_ssize_t pf,
                                      const FBN_T *ys)
{
    FBN_CALL(fbn_dot_xmu, (dy, x, n, m, sdy, sdyxmu, pf, ys));
}

static inline void FBN_D(fbn_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n, FBN_T m, FBN_T s,
                                     FBN_T b, const FBN_T *z, int relu)
{
    FBN_CALL(fbn_affine, (x, y, n, m, s, b, z, relu));
}

static inline void FBN_D(fbn_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n, FBN_T m,
                                         FBN_T s, FBN_T b, const FBN_T *z, int relu, int stream)
{
    FBN_CALL(fbn_affine_out, (x, y, n, m, s, b, z, relu, stream));
}

static inline void FBN_D(fbn_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx, Py_ssize_t n,
                                    FBN_T m, FBN_T kdy, FBN_T kx, FBN_T kc, const FBN_T *ys,
                                    FBN_T *dz)
{
    FBN_CALL(fbn_elemt, (dy, x, dx, n, m, kdy, kx, kc, ys, dz));
}

static inline void FBN_D(fbn_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                        Py_ssize_t n, FBN_T m, FBN_T kdy, FBN_T kx, FBN_T kc,
                                        const FBN_T *ys, FBN_T *dz, int stream)
{
    FBN_CALL(fbn_elemt_out, (dy, x, dx, n, m, kdy, kx, kc, ys, dz, stream));
}

static inline void FBN_D(fbn_rows_stats_wide)(const FBN_T *x, Py_ssize_t ld, Py_ssize_t R,
                                              Py_ssize_t w, double n_old, FBN_T *k,
                                              double *anchor, double *off, double *m2,
                                              Py_ssize_t pfd, const FBN_T *pf_end)
{
    FBN_CALL(fbn_rows_stats_wide, (x, ld, R, w, n_old, k, anchor, off, m2, pfd, pf_end));
}

static inline void FBN_D(fbn_rows_dot_wide)(const FBN_T *dy, const FBN_T *x, Py_ssize_t ld,
                                            Py_ssize_t R, Py_ssize_t w, const FBN_T *m,
                                            double *sdy, double *sdyxmu, Py_ssize_t pfd,
                                            const FBN_T *pf_end, const FBN_T *ys)
{
    FBN_CALL(fbn_rows_dot_wide, (dy, x, ld, R, w, m, sdy, sdyxmu, pfd, pf_end, ys));
}

static inline void FBN_D(fbn_rows_affine)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                          Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                          const FBN_T *s, const FBN_T *b, const FBN_T *z,
                                          int relu)
{
    FBN_CALL(fbn_rows_affine, (x, y, n, c0, P, m, s, b, z, relu));
}

static inline void FBN_D(fbn_rows_affine_out)(const FBN_T *x, FBN_T *y, Py_ssize_t n,
                                              Py_ssize_t c0, Py_ssize_t P, const FBN_T *m,
                                              const FBN_T *s, const FBN_T *b, const FBN_T *z,
                                              int relu, int stream)
{
    FBN_CALL(fbn_rows_affine_out, (x, y, n, c0, P, m, s, b, z, relu, stream));
}

static inline void FBN_D(fbn_rows_elemt)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                         Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                         const FBN_T *m, const FBN_T *kdy, const FBN_T *kx,
                                         const FBN_T *kc, const FBN_T *ys, FBN_T *dz)
{
    FBN_CALL(fbn_rows_elemt, (dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, dz));
}

static inline void FBN_D(fbn_rows_elemt_out)(const FBN_T *dy, const FBN_T *x, FBN_T *dx,
                                             Py_ssize_t n, Py_ssize_t c0, Py_ssize_t P,
                                             const FBN_T *m, const FBN_T *kdy,
                                             const FBN_T *kx, const FBN_T *kc, const FBN_T *ys,
                                             FBN_T *dz, int stream)
{
    FBN_CALL(fbn_rows_elemt_out, (dy, x, dx, n, c0, P, m, kdy, kx, kc, ys, dz, stream));
}

#undef FBN_CALL
