// CUDA kernels of fastbn: the math on the canonical (O, C, I) view, nothing else.
//
// Loaded by fastbn/_backends/cupy_gpu.py with cupy.RawModule (NVRTC); no host code.
// Data arrays are C-contiguous (O, C, I) of T (float16 as __half, bfloat16 as
// __nv_bfloat16, float32, float64); per-channel vectors are (C,) of Acc, the
// statistics dtype: float for __half, __nv_bfloat16 and float, double for double.
// Every loaded value is converted to Acc (exactly), every result is computed in
// Acc and rounded once (to nearest even) on store.
//
// Two families, as in the CPU backends:
//  * planes (I > 1): channel c is O runs of I contiguous values, C*I apart.
//    Reductions: a block per (channel, slice); blockIdx.x = c, and the channel's
//    (o, i) range is split over gridDim.y slices of o and gridDim.z slices of i
//    (so a huge channel, or few channels, still fill the device). Elementwise:
//    blockIdx.x/threadIdx.y walk the O*C runs, blockIdx.y/threadIdx.x walk i.
//  * rows (I == 1, NHWC or NC): the array is (O, C). threadIdx.x runs along C
//    (a warp reads consecutive channels of one row: coalesced), blocks along O.
// When a reduction is split over several blocks per channel, each block writes
// its partial result to a workspace, and the last block to finish (counted with
// an atomic ticket per channel or channel group) merges the partials and writes
// the output: one launch, no second pass, no host round trip.
//
// Statistics are Welford/Chan: every thread keeps (count, mean, M2) and merges
// in chunks of kUnroll values (chunk mean and M2 two-pass in registers, then
// Chan's formula), threads merge with warp shuffles and shared memory, blocks
// through the workspace. All means are taken relative to a per-channel shift
// (the channel's first value), so float32 accumulation keeps its precision on
// data whose mean is large compared with its spread.
//
// Index type idx_t: int when the array's byte extent is below 2^31 (the loader
// checks), long long otherwise. Loop counters may run past the end by at most
// kUnroll grid strides (< 2^28 with the loader's grids) before the loop test
// stops them, which the 32-bit rule leaves room for (arrays of < 2^30 elements).
//
// Which dtypes are instantiated is chosen by the loader, one module per dtype:
// -DFASTBN_FLOAT16=0/1, -DFASTBN_BFLOAT16=0/1, -DFASTBN_FLOAT32=0/1,
// -DFASTBN_FLOAT64=0/1 (all four by default). Kernel names carry every
// parameter: bn_<kernel>_<dtype>_<i32|i64>.

#ifndef FASTBN_FLOAT16
#define FASTBN_FLOAT16 1
#endif
#ifndef FASTBN_BFLOAT16
#define FASTBN_BFLOAT16 1
#endif
#ifndef FASTBN_FLOAT32
#define FASTBN_FLOAT32 1
#endif
#ifndef FASTBN_FLOAT64
#define FASTBN_FLOAT64 1
#endif

// cuda_bf16.h first: it includes the cuda_fp16.h of its own directory, so the two
// headers come from one CUDA release even where NVRTC's search path holds an
// older bundled cuda_fp16.h (CuPy ships one for CUDA 11 and 12.0-12.1).
#if FASTBN_BFLOAT16
#include <cuda_bf16.h>
#endif
#if FASTBN_FLOAT16
#include <cuda_fp16.h>
#endif

namespace fastbn {

constexpr int kMaxThreads = 512;   // threads per block, at most (the loader's launches)
constexpr int kUnroll = 4;         // values loaded per thread before any is used: loads in flight
constexpr unsigned kFullMask = 0xffffffffu;

// --- storage <-> arithmetic ---------------------------------------------------------

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
#if FASTBN_FLOAT16
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
#endif
#if FASTBN_BFLOAT16
// bfloat16 -> float is exact (the upper half of a float); float -> bfloat16 rounds
// to nearest even (finite values past the largest bfloat16 become inf, NaN stays NaN)
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
}
#endif

// --- Welford / Chan ------------------------------------------------------------------

template <typename Acc>
struct Moments {
    long long n;  // values merged; 64-bit: a channel may hold more than 2^31 values
    Acc mean;     // relative to the channel's shift
    Acc m2;       // sum of squared deviations from mean
};

// Chan et al.: merge two disjoint sets. Either (or both) may be empty.
template <typename Acc>
__device__ __forceinline__ Moments<Acc> merge(const Moments<Acc>& a, const Moments<Acc>& b) {
    const long long n = a.n + b.n;
    if (n == 0) {
        return a;
    }
    const Acc delta = b.mean - a.mean;
    const Acc wb = static_cast<Acc>(b.n) / static_cast<Acc>(n);  // b's share of the merged set
    Moments<Acc> r;
    r.n = n;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.n) * wb;
    return r;
}

// Merge a chunk of up to kUnroll values (valid ones flagged by ok) into s:
// the chunk's mean and M2 two-pass from registers, then one Chan merge.
template <typename Acc>
__device__ __forceinline__ void merge_chunk(Moments<Acc>& s, const Acc (&v)[kUnroll],
                                            const bool (&ok)[kUnroll]) {
    int nb = 0;
    Acc sum = Acc(0);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
        if (ok[k]) {
            sum += v[k];
            ++nb;
        }
    }
    if (nb == 0) {
        return;
    }
    // dividing by kUnroll (a power of two) is multiplying by its exact inverse
    const Acc mb = (nb == kUnroll) ? sum * (Acc(1) / Acc(kUnroll)) : sum / static_cast<Acc>(nb);
    Acc m2b = Acc(0);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
        if (ok[k]) {
            const Acc d = v[k] - mb;
            m2b += d * d;
        }
    }
    Moments<Acc> b;
    b.n = nb;
    b.mean = mb;
    b.m2 = m2b;
    s = merge(s, b);
}

template <typename Acc>
__device__ __forceinline__ Moments<Acc> warp_merge(Moments<Acc> s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Moments<Acc> o;
        o.n = __shfl_xor_sync(kFullMask, s.n, offset);
        o.mean = __shfl_xor_sync(kFullMask, s.mean, offset);
        o.m2 = __shfl_xor_sync(kFullMask, s.m2, offset);
        s = merge(s, o);
    }
    return s;
}

// Merge over the whole block (whose size is a multiple of 32); every thread gets
// the result of lane 0 of warp 0.
template <typename Acc>
__device__ Moments<Acc> block_merge(Moments<Acc> s) {
    __shared__ long long sh_n[32];
    __shared__ Acc sh_mean[32];
    __shared__ Acc sh_m2[32];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = (blockDim.x * blockDim.y) >> 5;
    s = warp_merge(s);
    if (lane == 0) {
        sh_n[warp] = s.n;
        sh_mean[warp] = s.mean;
        sh_m2[warp] = s.m2;
    }
    __syncthreads();
    if (warp == 0) {
        Moments<Acc> t = {0, Acc(0), Acc(0)};
        if (lane < nwarps) {
            t.n = sh_n[lane];
            t.mean = sh_mean[lane];
            t.m2 = sh_m2[lane];
        }
        t = warp_merge(t);
        if (lane == 0) {
            sh_n[0] = t.n;
            sh_mean[0] = t.mean;
            sh_m2[0] = t.m2;
        }
    }
    __syncthreads();
    Moments<Acc> r;
    r.n = sh_n[0];
    r.mean = sh_mean[0];
    r.m2 = sh_m2[0];
    __syncthreads();  // the slots may be reused by the next call
    return r;
}

// Merge over threadIdx.y for each threadIdx.x (blockDim.y a power of two);
// the result is valid in the threads with threadIdx.y == 0.
template <typename Acc>
__device__ Moments<Acc> column_merge(Moments<Acc> s) {
    __shared__ long long sh_n[kMaxThreads];
    __shared__ Acc sh_mean[kMaxThreads];
    __shared__ Acc sh_m2[kMaxThreads];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x;
    sh_n[tid] = s.n;
    sh_mean[tid] = s.mean;
    sh_m2[tid] = s.m2;
    __syncthreads();
    for (unsigned h = blockDim.y >> 1; h > 0; h >>= 1) {
        if (threadIdx.y < h) {
            const int u = tid + h * blockDim.x;
            Moments<Acc> o;
            o.n = sh_n[u];
            o.mean = sh_mean[u];
            o.m2 = sh_m2[u];
            s = merge(s, o);
            sh_n[tid] = s.n;
            sh_mean[tid] = s.mean;
            sh_m2[tid] = s.m2;
        }
        __syncthreads();
    }
    return s;
}

// --- plain sums (backward) ----------------------------------------------------------

template <typename Acc>
struct Sums {
    Acc dy;      // sum(dy)
    Acc dy_xmu;  // sum(dy * (x - mean))
};

template <typename Acc>
__device__ __forceinline__ Sums<Acc> warp_sum(Sums<Acc> s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        s.dy += __shfl_xor_sync(kFullMask, s.dy, offset);
        s.dy_xmu += __shfl_xor_sync(kFullMask, s.dy_xmu, offset);
    }
    return s;
}

template <typename Acc>
__device__ Sums<Acc> block_sum(Sums<Acc> s) {
    __shared__ Acc sh_dy[32];
    __shared__ Acc sh_dy_xmu[32];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int nwarps = (blockDim.x * blockDim.y) >> 5;
    s = warp_sum(s);
    if (lane == 0) {
        sh_dy[warp] = s.dy;
        sh_dy_xmu[warp] = s.dy_xmu;
    }
    __syncthreads();
    if (warp == 0) {
        Sums<Acc> t = {Acc(0), Acc(0)};
        if (lane < nwarps) {
            t.dy = sh_dy[lane];
            t.dy_xmu = sh_dy_xmu[lane];
        }
        t = warp_sum(t);
        if (lane == 0) {
            sh_dy[0] = t.dy;
            sh_dy_xmu[0] = t.dy_xmu;
        }
    }
    __syncthreads();
    Sums<Acc> r;
    r.dy = sh_dy[0];
    r.dy_xmu = sh_dy_xmu[0];
    __syncthreads();
    return r;
}

template <typename Acc>
__device__ Sums<Acc> column_sum(Sums<Acc> s) {
    __shared__ Acc sh_dy[kMaxThreads];
    __shared__ Acc sh_dy_xmu[kMaxThreads];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x;
    sh_dy[tid] = s.dy;
    sh_dy_xmu[tid] = s.dy_xmu;
    __syncthreads();
    for (unsigned h = blockDim.y >> 1; h > 0; h >>= 1) {
        if (threadIdx.y < h) {
            const int u = tid + h * blockDim.x;
            s.dy += sh_dy[u];
            s.dy_xmu += sh_dy_xmu[u];
            sh_dy[tid] = s.dy;
            sh_dy_xmu[tid] = s.dy_xmu;
        }
        __syncthreads();
    }
    return s;
}

// --- the last block of a split reduction ----------------------------------------------

// Called by every thread of the block after its partial result is written and
// fenced by the writing threads: takes a ticket on counter *ticket (zeroed by
// the loader) and returns, in every thread, whether this block was the last of
// `blocks` to arrive. The last block then sees every other block's partials.
__device__ __forceinline__ bool last_block_arrived(unsigned int* ticket, unsigned int blocks) {
    __shared__ bool is_last;
    __syncthreads();  // all partial writes of this block (each fenced by its writer) are done
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == blocks - 1;
    }
    __syncthreads();
    if (is_last) {
        __threadfence();  // order the partial reads below after the ticket
    }
    return is_last;
}

// --- kernels: statistics ---------------------------------------------------------------

// Planes: grid (C, slices_o, slices_i), block (bx, by) with bx*by a multiple of 32.
// With one slice per channel the block writes mean/m2 directly; otherwise partials
// go to part_*[c*slices + slice] and the last block of channel c merges them.
template <typename T, typename Acc, typename idx_t>
__device__ void stats_planes(const T* __restrict__ x, idx_t O, idx_t C, idx_t I,
                             Acc* __restrict__ mean_out, Acc* __restrict__ m2_out,
                             long long* part_n, Acc* part_mean, Acc* part_m2,
                             unsigned int* tickets) {
    const idx_t c = blockIdx.x;
    const Acc shift = to_acc(x[c * I]);  // the channel's first value (o = 0, i = 0)
    const idx_t i_first = static_cast<idx_t>(blockIdx.z) * blockDim.x + threadIdx.x;
    const idx_t i_step = static_cast<idx_t>(gridDim.z) * blockDim.x;
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    idx_t i = i_first;
    if (i_first >= I) {
        o = O;  // no column for this thread: it only joins the merges
    }
    Moments<Acc> s = {0, Acc(0), Acc(0)};
    while (o < O) {
        // walk this thread's (o, i) positions, i fastest, kUnroll at a time
        Acc v[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            ok[k] = o < O;
            v[k] = ok[k] ? to_acc(x[(o * C + c) * I + i]) - shift : Acc(0);
            i += i_step;
            if (i >= I) {
                i = i_first;
                o += o_step;
            }
        }
        merge_chunk(s, v, ok);
    }
    s = block_merge(s);
    const unsigned int slices = gridDim.y * gridDim.z;
    const bool leader = threadIdx.x == 0 && threadIdx.y == 0;
    if (slices == 1) {
        if (leader) {
            mean_out[c] = shift + s.mean;
            m2_out[c] = s.m2;
        }
        return;
    }
    if (leader) {
        const long long p =
            static_cast<long long>(c) * slices + blockIdx.y * gridDim.z + blockIdx.z;
        part_n[p] = s.n;
        part_mean[p] = s.mean;
        part_m2[p] = s.m2;
        __threadfence();
    }
    if (!last_block_arrived(tickets + c, slices)) {
        return;
    }
    Moments<Acc> t = {0, Acc(0), Acc(0)};
    const unsigned int nthreads = blockDim.x * blockDim.y;
    for (unsigned int q = threadIdx.x + threadIdx.y * blockDim.x; q < slices; q += nthreads) {
        const long long p = static_cast<long long>(c) * slices + q;
        Moments<Acc> b;
        b.n = __ldcg(part_n + p);  // L2, not a possibly stale L1 line
        b.mean = __ldcg(part_mean + p);
        b.m2 = __ldcg(part_m2 + p);
        t = merge(t, b);
    }
    t = block_merge(t);
    if (leader) {
        mean_out[c] = shift + t.mean;
        m2_out[c] = t.m2;
    }
}

// Rows: grid (ceil(C/bx), slices), block (bx, by), by a power of two. Partials of
// slice s go to part_*[s*C + c]; the last block of column group blockIdx.x merges.
template <typename T, typename Acc, typename idx_t>
__device__ void stats_rows(const T* __restrict__ x, idx_t O, idx_t C,
                           Acc* __restrict__ mean_out, Acc* __restrict__ m2_out,
                           long long* part_n, Acc* part_mean, Acc* part_m2,
                           unsigned int* tickets) {
    const idx_t c = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool active = c < C;
    const Acc shift = active ? to_acc(x[c]) : Acc(0);  // the channel's first value (row 0)
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    if (!active) {
        o = O;
    }
    Moments<Acc> s = {0, Acc(0), Acc(0)};
    for (; o < O; o += kUnroll * o_step) {
        Acc v[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            ok[k] = ok_o < O;
            v[k] = ok[k] ? to_acc(x[ok_o * C + c]) - shift : Acc(0);
        }
        merge_chunk(s, v, ok);
    }
    s = column_merge(s);
    const bool writer = threadIdx.y == 0 && active;
    if (gridDim.y == 1) {
        if (writer) {
            mean_out[c] = shift + s.mean;
            m2_out[c] = s.m2;
        }
        return;
    }
    if (writer) {
        const long long p = static_cast<long long>(blockIdx.y) * C + c;
        part_n[p] = s.n;
        part_mean[p] = s.mean;
        part_m2[p] = s.m2;
        __threadfence();
    }
    if (!last_block_arrived(tickets + blockIdx.x, gridDim.y)) {
        return;
    }
    Moments<Acc> t = {0, Acc(0), Acc(0)};
    if (active) {
        for (unsigned int q = threadIdx.y; q < gridDim.y; q += blockDim.y) {
            const long long p = static_cast<long long>(q) * C + c;
            Moments<Acc> b;
            b.n = __ldcg(part_n + p);
            b.mean = __ldcg(part_mean + p);
            b.m2 = __ldcg(part_m2 + p);
            t = merge(t, b);
        }
    }
    t = column_merge(t);
    if (writer) {
        mean_out[c] = shift + t.mean;
        m2_out[c] = t.m2;
    }
}

// --- kernels: backward reductions ------------------------------------------------------

// sum(dy) and sum(dy * (x - mean)) per channel, one read of dy and x; same grids
// and last-block merge as stats_planes / stats_rows.
template <typename T, typename Acc, typename idx_t>
__device__ void backward_reduce_planes(const T* __restrict__ dy, const T* __restrict__ x,
                                       const Acc* __restrict__ mean, idx_t O, idx_t C, idx_t I,
                                       Acc* __restrict__ sum_dy_out,
                                       Acc* __restrict__ sum_dy_xmu_out,
                                       Acc* part_dy, Acc* part_dy_xmu, unsigned int* tickets) {
    const idx_t c = blockIdx.x;
    const Acc m = mean[c];
    const idx_t i_first = static_cast<idx_t>(blockIdx.z) * blockDim.x + threadIdx.x;
    const idx_t i_step = static_cast<idx_t>(gridDim.z) * blockDim.x;
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    idx_t i = i_first;
    if (i_first >= I) {
        o = O;
    }
    Sums<Acc> s = {Acc(0), Acc(0)};
    while (o < O) {
        Acc g[kUnroll];
        Acc v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const bool ok = o < O;
            const idx_t p = ok ? (o * C + c) * I + i : idx_t(0);  // no index past the end
            g[k] = ok ? to_acc(dy[p]) : Acc(0);
            v[k] = ok ? to_acc(x[p]) - m : Acc(0);
            i += i_step;
            if (i >= I) {
                i = i_first;
                o += o_step;
            }
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            s.dy += g[k];
            s.dy_xmu = fma(g[k], v[k], s.dy_xmu);
        }
    }
    s = block_sum(s);
    const unsigned int slices = gridDim.y * gridDim.z;
    const bool leader = threadIdx.x == 0 && threadIdx.y == 0;
    if (slices == 1) {
        if (leader) {
            sum_dy_out[c] = s.dy;
            sum_dy_xmu_out[c] = s.dy_xmu;
        }
        return;
    }
    if (leader) {
        const long long p =
            static_cast<long long>(c) * slices + blockIdx.y * gridDim.z + blockIdx.z;
        part_dy[p] = s.dy;
        part_dy_xmu[p] = s.dy_xmu;
        __threadfence();
    }
    if (!last_block_arrived(tickets + c, slices)) {
        return;
    }
    Sums<Acc> t = {Acc(0), Acc(0)};
    const unsigned int nthreads = blockDim.x * blockDim.y;
    for (unsigned int q = threadIdx.x + threadIdx.y * blockDim.x; q < slices; q += nthreads) {
        const long long p = static_cast<long long>(c) * slices + q;
        t.dy += __ldcg(part_dy + p);
        t.dy_xmu += __ldcg(part_dy_xmu + p);
    }
    t = block_sum(t);
    if (leader) {
        sum_dy_out[c] = t.dy;
        sum_dy_xmu_out[c] = t.dy_xmu;
    }
}

template <typename T, typename Acc, typename idx_t>
__device__ void backward_reduce_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                     const Acc* __restrict__ mean, idx_t O, idx_t C,
                                     Acc* __restrict__ sum_dy_out,
                                     Acc* __restrict__ sum_dy_xmu_out,
                                     Acc* part_dy, Acc* part_dy_xmu, unsigned int* tickets) {
    const idx_t c = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool active = c < C;
    const Acc m = active ? mean[c] : Acc(0);
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    if (!active) {
        o = O;
    }
    Sums<Acc> s = {Acc(0), Acc(0)};
    for (; o < O; o += kUnroll * o_step) {
        Acc g[kUnroll];
        Acc v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            const bool ok = ok_o < O;
            g[k] = ok ? to_acc(dy[ok_o * C + c]) : Acc(0);
            v[k] = ok ? to_acc(x[ok_o * C + c]) - m : Acc(0);
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            s.dy += g[k];
            s.dy_xmu = fma(g[k], v[k], s.dy_xmu);
        }
    }
    s = column_sum(s);
    const bool writer = threadIdx.y == 0 && active;
    if (gridDim.y == 1) {
        if (writer) {
            sum_dy_out[c] = s.dy;
            sum_dy_xmu_out[c] = s.dy_xmu;
        }
        return;
    }
    if (writer) {
        const long long p = static_cast<long long>(blockIdx.y) * C + c;
        part_dy[p] = s.dy;
        part_dy_xmu[p] = s.dy_xmu;
        __threadfence();
    }
    if (!last_block_arrived(tickets + blockIdx.x, gridDim.y)) {
        return;
    }
    Sums<Acc> t = {Acc(0), Acc(0)};
    if (active) {
        for (unsigned int q = threadIdx.y; q < gridDim.y; q += blockDim.y) {
            const long long p = static_cast<long long>(q) * C + c;
            t.dy += __ldcg(part_dy + p);
            t.dy_xmu += __ldcg(part_dy_xmu + p);
        }
    }
    t = column_sum(t);
    if (writer) {
        sum_dy_out[c] = t.dy;
        sum_dy_xmu_out[c] = t.dy_xmu;
    }
}

// --- kernels: elementwise ---------------------------------------------------------------
//
// y may be x itself (normalize in place): every value is read and written by one
// thread, which loads its kUnroll values before it stores any, so no __restrict__
// on the data pointers.

// Planes: R = O*C runs of I values; run r has channel r % C. Grid (runs, i slices),
// block (bx along i, by along runs). Each thread walks its (r, i) positions, i
// fastest, and reloads the channel's constants only when its run changes.
template <typename T, typename Acc, typename idx_t>
__device__ void normalize_planes(const T* x, const Acc* __restrict__ mean,
                                 const Acc* __restrict__ scale, const Acc* __restrict__ shift,
                                 T* y, idx_t R, idx_t C, idx_t I) {
    const idx_t i_first = static_cast<idx_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (i_first >= I) {
        return;
    }
    const idx_t i_step = static_cast<idx_t>(gridDim.y) * blockDim.x;
    const idx_t r_step = static_cast<idx_t>(gridDim.x) * blockDim.y;
    const idx_t c_step = r_step % C;
    idx_t r = static_cast<idx_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    idx_t i = i_first;
    idx_t c = r % C;
    Acc m = mean[c], a = scale[c], b = shift[c];
    while (r < R) {
        idx_t pos[kUnroll];
        Acc v[kUnroll], mk[kUnroll], ak[kUnroll], bk[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            ok[k] = r < R;
            pos[k] = ok[k] ? r * I + i : idx_t(0);
            v[k] = ok[k] ? to_acc(x[pos[k]]) : Acc(0);
            mk[k] = m;
            ak[k] = a;
            bk[k] = b;
            i += i_step;
            if (i >= I) {
                i = i_first;
                r += r_step;
                c += c_step;
                if (c >= C) {
                    c -= C;
                }
                m = mean[c];
                a = scale[c];
                b = shift[c];
            }
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            if (ok[k]) {
                store(y + pos[k], fma(v[k] - mk[k], ak[k], bk[k]));
            }
        }
    }
}

// Rows: (O, C); grid (ceil(C/bx), row slices), block (bx along C, by along O).
template <typename T, typename Acc, typename idx_t>
__device__ void normalize_rows(const T* x, const Acc* __restrict__ mean,
                               const Acc* __restrict__ scale, const Acc* __restrict__ shift,
                               T* y, idx_t O, idx_t C) {
    const idx_t c = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) {
        return;
    }
    const Acc m = mean[c], a = scale[c], b = shift[c];
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    for (idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y; o < O;
         o += kUnroll * o_step) {
        Acc v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            v[k] = ok_o < O ? to_acc(x[ok_o * C + c]) : Acc(0);
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            if (ok_o < O) {
                store(y + ok_o * C + c, fma(v[k] - m, a, b));
            }
        }
    }
}

// dx = k_dy*dy + k_x*(x - mean) + k_c; same walks as normalize_planes / normalize_rows.
template <typename T, typename Acc, typename idx_t>
__device__ void backward_elemt_planes(const T* dy, const T* x, const Acc* __restrict__ mean,
                                      const Acc* __restrict__ k_dy, const Acc* __restrict__ k_x,
                                      const Acc* __restrict__ k_c, T* dx,
                                      idx_t R, idx_t C, idx_t I) {
    const idx_t i_first = static_cast<idx_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (i_first >= I) {
        return;
    }
    const idx_t i_step = static_cast<idx_t>(gridDim.y) * blockDim.x;
    const idx_t r_step = static_cast<idx_t>(gridDim.x) * blockDim.y;
    const idx_t c_step = r_step % C;
    idx_t r = static_cast<idx_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    idx_t i = i_first;
    idx_t c = r % C;
    Acc m = mean[c], kg = k_dy[c], kv = k_x[c], kc = k_c[c];
    while (r < R) {
        idx_t pos[kUnroll];
        Acc g[kUnroll], v[kUnroll], mk[kUnroll], gk[kUnroll], vk[kUnroll], ck[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            ok[k] = r < R;
            pos[k] = ok[k] ? r * I + i : idx_t(0);
            g[k] = ok[k] ? to_acc(dy[pos[k]]) : Acc(0);
            v[k] = ok[k] ? to_acc(x[pos[k]]) : Acc(0);
            mk[k] = m;
            gk[k] = kg;
            vk[k] = kv;
            ck[k] = kc;
            i += i_step;
            if (i >= I) {
                i = i_first;
                r += r_step;
                c += c_step;
                if (c >= C) {
                    c -= C;
                }
                m = mean[c];
                kg = k_dy[c];
                kv = k_x[c];
                kc = k_c[c];
            }
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            if (ok[k]) {
                store(dx + pos[k], fma(gk[k], g[k], fma(vk[k], v[k] - mk[k], ck[k])));
            }
        }
    }
}

template <typename T, typename Acc, typename idx_t>
__device__ void backward_elemt_rows(const T* dy, const T* x, const Acc* __restrict__ mean,
                                    const Acc* __restrict__ k_dy, const Acc* __restrict__ k_x,
                                    const Acc* __restrict__ k_c, T* dx, idx_t O, idx_t C) {
    const idx_t c = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) {
        return;
    }
    const Acc m = mean[c], kg = k_dy[c], kv = k_x[c], kc = k_c[c];
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    for (idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y; o < O;
         o += kUnroll * o_step) {
        Acc g[kUnroll], v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            const bool ok = ok_o < O;
            g[k] = ok ? to_acc(dy[ok_o * C + c]) : Acc(0);
            v[k] = ok ? to_acc(x[ok_o * C + c]) : Acc(0);
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            if (ok_o < O) {
                store(dx + ok_o * C + c, fma(kg, g[k], fma(kv, v[k] - m, kc)));
            }
        }
    }
}

}  // namespace fastbn

// --- extern "C" entry points: bn_<kernel>_<dtype>_<index> ------------------------------
//
// One wrapper per (kernel, dtype, index type); the loader launches them by name.

#define FASTBN_ENTRY_POINTS(DTYPE, T, ACC, INDEX, IDX)                                       \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_stats_planes_##DTYPE##_##INDEX(const T* x, IDX O, IDX C, IDX I, ACC* mean, ACC* m2,   \
                                      long long* part_n, ACC* part_mean, ACC* part_m2,       \
                                      unsigned int* tickets) {                               \
        fastbn::stats_planes<T, ACC, IDX>(x, O, C, I, mean, m2, part_n, part_mean, part_m2,  \
                                          tickets);                                          \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_stats_rows_##DTYPE##_##INDEX(const T* x, IDX O, IDX C, ACC* mean, ACC* m2,            \
                                    long long* part_n, ACC* part_mean, ACC* part_m2,         \
                                    unsigned int* tickets) {                                 \
        fastbn::stats_rows<T, ACC, IDX>(x, O, C, mean, m2, part_n, part_mean, part_m2,       \
                                        tickets);                                            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_planes_##DTYPE##_##INDEX(const T* dy, const T* x, const ACC* mean,    \
                                                IDX O, IDX C, IDX I, ACC* sum_dy,            \
                                                ACC* sum_dy_xmu, ACC* part_dy,               \
                                                ACC* part_dy_xmu, unsigned int* tickets) {   \
        fastbn::backward_reduce_planes<T, ACC, IDX>(dy, x, mean, O, C, I, sum_dy,            \
                                                    sum_dy_xmu, part_dy, part_dy_xmu,        \
                                                    tickets);                                \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_rows_##DTYPE##_##INDEX(const T* dy, const T* x, const ACC* mean,      \
                                              IDX O, IDX C, ACC* sum_dy, ACC* sum_dy_xmu,    \
                                              ACC* part_dy, ACC* part_dy_xmu,                \
                                              unsigned int* tickets) {                       \
        fastbn::backward_reduce_rows<T, ACC, IDX>(dy, x, mean, O, C, sum_dy, sum_dy_xmu,     \
                                                  part_dy, part_dy_xmu, tickets);            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_planes_##DTYPE##_##INDEX(const T* x, const ACC* mean, const ACC* scale,     \
                                          const ACC* shift, T* y, IDX R, IDX C, IDX I) {     \
        fastbn::normalize_planes<T, ACC, IDX>(x, mean, scale, shift, y, R, C, I);            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_rows_##DTYPE##_##INDEX(const T* x, const ACC* mean, const ACC* scale,       \
                                        const ACC* shift, T* y, IDX O, IDX C) {              \
        fastbn::normalize_rows<T, ACC, IDX>(x, mean, scale, shift, y, O, C);                 \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_planes_##DTYPE##_##INDEX(const T* dy, const T* x, const ACC* mean,     \
                                               const ACC* k_dy, const ACC* k_x,              \
                                               const ACC* k_c, T* dx, IDX R, IDX C, IDX I) { \
        fastbn::backward_elemt_planes<T, ACC, IDX>(dy, x, mean, k_dy, k_x, k_c, dx, R, C, I); \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_rows_##DTYPE##_##INDEX(const T* dy, const T* x, const ACC* mean,       \
                                             const ACC* k_dy, const ACC* k_x,                \
                                             const ACC* k_c, T* dx, IDX O, IDX C) {          \
        fastbn::backward_elemt_rows<T, ACC, IDX>(dy, x, mean, k_dy, k_x, k_c, dx, O, C);     \
    }

#if FASTBN_FLOAT16
FASTBN_ENTRY_POINTS(float16, __half, float, i32, int)
FASTBN_ENTRY_POINTS(float16, __half, float, i64, long long)
#endif
#if FASTBN_BFLOAT16
FASTBN_ENTRY_POINTS(bfloat16, __nv_bfloat16, float, i32, int)
FASTBN_ENTRY_POINTS(bfloat16, __nv_bfloat16, float, i64, long long)
#endif
#if FASTBN_FLOAT32
FASTBN_ENTRY_POINTS(float32, float, float, i32, int)
FASTBN_ENTRY_POINTS(float32, float, float, i64, long long)
#endif
#if FASTBN_FLOAT64
FASTBN_ENTRY_POINTS(float64, double, double, i32, int)
FASTBN_ENTRY_POINTS(float64, double, double, i64, long long)
#endif
