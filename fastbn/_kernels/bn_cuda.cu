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
//    Reductions: a 1-D block (a multiple of 32 threads) per (channel, slice);
//    blockIdx.x = c, and the channel's O*I values, taken as one flat range of
//    (o, i) positions, i fastest, are dealt out over the gridDim.y slices and
//    their threads with a grid-stride loop: every thread has work whatever I is
//    (no block sized to a power of two of I), and a warp reads consecutive values.
//  * rows (I == 1, NHWC or NC): the array is (O, C). Reductions: block (bx, by),
//    threadIdx.x along C (a warp reads consecutive channels of one row:
//    coalesced), threadIdx.y and gridDim.y along O; the channels are split into
//    gridDim.x groups of equal width bx <= 32 (C = 33: two groups of 17, not a
//    group of 32 and one of 1).
//  * elementwise kernels of both families walk the whole array as one flat range
//    with a 1-D grid-stride loop, tracking each position's channel incrementally
//    (no division in the loop).
// When a reduction is split over several blocks per channel, each block writes
// its partial result to a workspace, and the last block to finish (counted with
// an atomic ticket per channel or channel group) merges the partials and writes
// the output: one launch, no second pass, no host round trip.
//
// Vector access: every kernel takes `vec`; when it is nonzero (the loader checks
// that every data pointer is aligned to a vector, and that I, or C for rows, is
// a multiple of the vector width V) values are loaded and stored V at a time:
// float4 for float32, double2 for float64, 8-byte loads of four 16-bit values
// for float16/bfloat16 (VecWidth below). A vector never straddles two runs
// (planes) and holds V consecutive channels (rows). With vec == 0 the same walks
// run one value at a time (the scalar path: misaligned views, odd extents).
// Read-only inputs are `const T* __restrict__` and loaded with __ldg (the
// non-coherent read-only path, LDG.E.CONSTANT / ld.global.nc).
// An output may be an input itself (normalize in place: y is x, or z): every
// value is read, then written, by one thread, and no value is read after it is
// written, so the read-only path never sees a value this kernel changed.
//
// Statistics are Welford/Chan: every thread keeps (count, mean, M2) and merges
// in chunks of kUnroll loads (chunk mean and M2 two-pass in registers, then
// Chan's formula), threads merge with warp shuffles and shared memory, blocks
// through the workspace. All means are taken relative to a per-channel shift
// (the channel's first value), so float32 accumulation keeps its precision on
// data whose mean is large compared with its spread.
//
// Epilogues (the optional kernels of the backend protocol): normalize with an
// optional residual z and an optional relu, y = act((x - mean)*scale + shift [+ z]),
// relu(v) = 0 where v < 0 else v (a comparison: NaN stays NaN); and the backward
// kernels with the relu mask taken from the saved output, g = dy where y > 0 else
// 0 (and dz = g when dz is given). z, dz and y (of the backward kernels) may be
// null pointers: no residual, no dz, no relu mask. The plain kernels are the
// epilogue kernels with null pointers and relu = 0.
//
// Index type idx_t: int when the array's element count is below the loader's
// limit (2^31 minus kUnroll grid strides, see index_type in cupy_gpu.py), long
// long otherwise. Loop counters may run past the end by at most kUnroll grid
// strides (+ kUnroll) before the loop test stops them, which that limit leaves
// room for; element offsets are formed only for positions inside the array.
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
constexpr int kUnroll = 4;         // loads per thread before any is used: loads in flight
constexpr unsigned kFullMask = 0xffffffffu;

// Helpers free of device state are host functions too, so that a host program can
// check them (tests/test_cuda_emulation.py compiles one with nvcc; no GPU needed).
#define FASTBN_HD __host__ __device__ __forceinline__

// Values per vector access (VECTOR_WIDTH in cupy_gpu.py): 16 bytes of float32 or
// float64, 8 bytes of 16-bit data.
template <typename T>
struct VecWidth {
    static constexpr int value = 4;
};
template <>
struct VecWidth<double> {
    static constexpr int value = 2;
};

// --- storage <-> arithmetic ---------------------------------------------------------
//
// loadv(p, v): V consecutive values at p (aligned to V values when V > 1) into v,
// through the read-only path; storev(p, v): V values rounded to T, one store.
// store(p, v): one value of a per-channel output.

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ void loadv(const float* p, float (&v)[1]) { v[0] = __ldg(p); }
__device__ __forceinline__ void loadv(const float* p, float (&v)[4]) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
}
__device__ __forceinline__ void storev(float* p, const float (&v)[1]) { *p = v[0]; }
__device__ __forceinline__ void storev(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void loadv(const double* p, double (&v)[1]) { v[0] = __ldg(p); }
__device__ __forceinline__ void loadv(const double* p, double (&v)[2]) {
    const double2 q = __ldg(reinterpret_cast<const double2*>(p));
    v[0] = q.x;
    v[1] = q.y;
}
__device__ __forceinline__ void storev(double* p, const double (&v)[1]) { *p = v[0]; }
__device__ __forceinline__ void storev(double* p, const double (&v)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}

// 16-bit data moves as its bit patterns (unsigned short; four in a uint2)
template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned int u);
template <typename T>
__device__ __forceinline__ unsigned int float_to_bits(float v);
#if FASTBN_FLOAT16
template <>
__device__ __forceinline__ float bits_to_float<__half>(unsigned int u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
}
template <>
__device__ __forceinline__ unsigned int float_to_bits<__half>(float v) {
    return __half_as_ushort(__float2half_rn(v));
}
#endif
#if FASTBN_BFLOAT16
// bfloat16 -> float is exact (the upper half of a float); float -> bfloat16 rounds
// to nearest even (finite values past the largest bfloat16 become inf, NaN stays NaN)
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned int u) {
    return __uint_as_float((u & 0xffffu) << 16);
}
template <>
__device__ __forceinline__ unsigned int float_to_bits<__nv_bfloat16>(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
#endif

template <typename T>
__device__ __forceinline__ void loadv16(const T* p, float (&v)[1]) {
    v[0] = bits_to_float<T>(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
template <typename T>
__device__ __forceinline__ void loadv16(const T* p, float (&v)[4]) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    v[0] = bits_to_float<T>(q.x);
    v[1] = bits_to_float<T>(q.x >> 16);
    v[2] = bits_to_float<T>(q.y);
    v[3] = bits_to_float<T>(q.y >> 16);
}
template <typename T>
__device__ __forceinline__ void storev16(T* p, const float (&v)[1]) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(float_to_bits<T>(v[0]));
}
template <typename T>
__device__ __forceinline__ void storev16(T* p, const float (&v)[4]) {
    uint2 q;
    q.x = float_to_bits<T>(v[0]) | (float_to_bits<T>(v[1]) << 16);
    q.y = float_to_bits<T>(v[2]) | (float_to_bits<T>(v[3]) << 16);
    *reinterpret_cast<uint2*>(p) = q;
}
#if FASTBN_FLOAT16
template <int V>
__device__ __forceinline__ void loadv(const __half* p, float (&v)[V]) { loadv16(p, v); }
template <int V>
__device__ __forceinline__ void storev(__half* p, const float (&v)[V]) { storev16(p, v); }
#endif
#if FASTBN_BFLOAT16
template <int V>
__device__ __forceinline__ void loadv(const __nv_bfloat16* p, float (&v)[V]) { loadv16(p, v); }
template <int V>
__device__ __forceinline__ void storev(__nv_bfloat16* p, const float (&v)[V]) {
    storev16(p, v);
}
#endif

// one value at p, through the read-only path
template <typename T, typename Acc>
__device__ __forceinline__ Acc load1(const T* p) {
    Acc v[1];
    loadv(p, v);
    return v[0];
}

// relu(v) = 0 where v < 0, else v: a comparison, so NaN stays NaN (fmax would drop it)
template <typename Acc>
FASTBN_HD Acc relu(Acc v) {
    return v < Acc(0) ? Acc(0) : v;
}

// the relu gradient from the saved output: dy where y > 0, else 0 (NaN y: 0)
template <typename Acc>
FASTBN_HD Acc relu_mask(Acc dy, Acc y) {
    return y > Acc(0) ? dy : Acc(0);
}

// --- Welford / Chan ------------------------------------------------------------------

template <typename Acc>
struct Moments {
    long long n;  // values merged; 64-bit: a channel may hold more than 2^31 values
    Acc mean;     // relative to the channel's shift
    Acc m2;       // sum of squared deviations from mean
};

// Chan et al.: merge two disjoint sets. Either (or both) may be empty: then the
// other side is the result as it is (no delta*delta*0 term, which is NaN when
// delta*delta overflows to inf).
template <typename Acc>
FASTBN_HD Moments<Acc> merge(const Moments<Acc>& a, const Moments<Acc>& b) {
    if (b.n == 0) {
        return a;
    }
    if (a.n == 0) {
        return b;
    }
    const long long n = a.n + b.n;
    const Acc delta = b.mean - a.mean;
    const Acc wb = static_cast<Acc>(b.n) / static_cast<Acc>(n);  // b's share of the merged set
    Moments<Acc> r;
    r.n = n;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.n) * wb;
    return r;
}

// Merge a chunk of up to N values (valid ones flagged by ok) into s: the chunk's
// mean and M2 two-pass from registers, then one Chan merge.
template <typename Acc, int N>
FASTBN_HD void merge_chunk(Moments<Acc>& s, const Acc (&v)[N],
                                            const bool (&ok)[N]) {
    int nb = 0;
    Acc sum = Acc(0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
        if (ok[k]) {
            sum += v[k];
            ++nb;
        }
    }
    if (nb == 0) {
        return;
    }
    // dividing by N (a power of two) is multiplying by its exact inverse
    const Acc mb = (nb == N) ? sum * (Acc(1) / Acc(N)) : sum / static_cast<Acc>(nb);
    Acc m2b = Acc(0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
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


// --- walks ------------------------------------------------------------------------------

// A thread's walk over the vectors of one planes channel: O runs of Iv vectors, as
// one flat range of positions (o, i), i fastest, starting at `first` and stepping
// by `step` (< Iv or not): no division in the loop.
template <typename idx_t>
struct PlaneWalk {
    idx_t o, i, step_o, step_i, Iv;
    FASTBN_HD PlaneWalk(idx_t Iv_, idx_t first, idx_t step)
        : o(first / Iv_), i(first % Iv_), step_o(step / Iv_), step_i(step % Iv_), Iv(Iv_) {}
    FASTBN_HD void advance() {
        i += step_i;
        o += step_o;
        if (i >= Iv) {
            i -= Iv;
            ++o;
        }
    }
    // element offset of the current vector (V values) in channel c of C
    template <int V>
    FASTBN_HD idx_t offset(idx_t C, idx_t c) const {
        return ((o * C + c) * Iv + i) * V;
    }
};

// A thread's walk over the nv vectors of the whole array, grid-stride: vector ev is
// position i of run r = ev / G, and its channel group is cr = r % Cr. Planes: G = I/V
// vectors per run, Cr = C channels (the vector's values share channel cr). Rows:
// G = 1, Cr = C/V groups of V consecutive channels (value j has channel cr*V + j).
template <typename idx_t>
struct FlatWalk {
    idx_t ev, step, i, G, step_i, cr, Cr, step_c;
    FASTBN_HD FlatWalk(idx_t G_, idx_t Cr_, idx_t first, idx_t step_)
        : ev(first), step(step_), i(first % G_), G(G_), step_i(step_ % G_),
          cr((first / G_) % Cr_), Cr(Cr_), step_c((step_ / G_) % Cr_) {}
    FASTBN_HD void advance() {
        ev += step;
        i += step_i;
        cr += step_c;
        if (i >= G) {
            i -= G;
            ++cr;
        }
        if (cr >= Cr) {  // cr <= 2*Cr - 1 here
            cr -= Cr;
        }
    }
    // the channel of the current vector's first value (the others: + j for ROWS)
    template <int V, bool ROWS>
    FASTBN_HD idx_t channel() const {
        return ROWS ? cr * V : cr;
    }
};

// the flat walk of this thread of a 1-D grid of 1-D blocks
template <typename idx_t>
__device__ __forceinline__ FlatWalk<idx_t> grid_walk(idx_t G, idx_t Cr) {
    return FlatWalk<idx_t>(G, Cr, static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                           static_cast<idx_t>(gridDim.x) * blockDim.x);
}

// --- kernels: statistics ---------------------------------------------------------------

// Planes: grid (C, slices), 1-D blocks of a multiple of 32 threads. With one slice
// per channel the block writes mean/m2 directly; otherwise partials go to
// part_*[c*slices + slice] and the last block of channel c merges them.
template <typename T, typename Acc, typename idx_t, int V>
__device__ void stats_planes(const T* __restrict__ x, idx_t O, idx_t C, idx_t I,
                             Acc* __restrict__ mean_out, Acc* __restrict__ m2_out,
                             long long* __restrict__ part_n, Acc* __restrict__ part_mean,
                             Acc* __restrict__ part_m2, unsigned int* tickets) {
    const idx_t c = blockIdx.x;
    const idx_t Iv = I / V;
    const Acc shift = load1<T, Acc>(x + c * I);  // the channel's first value (o = 0, i = 0)
    PlaneWalk<idx_t> w(Iv, static_cast<idx_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                       static_cast<idx_t>(gridDim.y) * blockDim.x);
    Moments<Acc> s = {0, Acc(0), Acc(0)};
    while (w.o < O) {
        Acc v[kUnroll * V];
        bool ok[kUnroll * V];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const bool in = w.o < O;
            Acc u[V];
            if (in) {
                loadv(x + w.template offset<V>(C, c), u);
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                v[k * V + j] = in ? u[j] - shift : Acc(0);
                ok[k * V + j] = in;
            }
            w.advance();
        }
        merge_chunk(s, v, ok);
    }
    s = block_merge(s);
    const unsigned int slices = gridDim.y;
    const bool leader = threadIdx.x == 0;
    if (slices == 1) {
        if (leader) {
            mean_out[c] = shift + s.mean;
            m2_out[c] = s.m2;
        }
        return;
    }
    if (leader) {
        const long long p = static_cast<long long>(c) * slices + blockIdx.y;
        part_n[p] = s.n;
        part_mean[p] = s.mean;
        part_m2[p] = s.m2;
        __threadfence();
    }
    if (!last_block_arrived(tickets + c, slices)) {
        return;
    }
    Moments<Acc> t = {0, Acc(0), Acc(0)};
    for (unsigned int q = threadIdx.x; q < slices; q += blockDim.x) {
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

// Rows: grid (channel groups, slices), block (bx, by), by a power of two; thread
// column cv holds the V channels cv*V .. cv*V + V-1. Partials of slice s go to
// part_*[s*C + c]; the last block of column group blockIdx.x merges.
template <typename T, typename Acc, typename idx_t, int V>
__device__ void stats_rows(const T* __restrict__ x, idx_t O, idx_t C,
                           Acc* __restrict__ mean_out, Acc* __restrict__ m2_out,
                           long long* __restrict__ part_n, Acc* __restrict__ part_mean,
                           Acc* __restrict__ part_m2, unsigned int* tickets) {
    const idx_t Cv = C / V;
    const idx_t cv = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool active = cv < Cv;
    Acc shift[V];  // the channels' first values (row 0)
#pragma unroll
    for (int j = 0; j < V; ++j) {
        shift[j] = Acc(0);
    }
    if (active) {
        loadv(x + cv * V, shift);
    }
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    if (!active) {
        o = O;
    }
    Moments<Acc> s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        s[j] = {0, Acc(0), Acc(0)};
    }
    for (; o < O; o += kUnroll * o_step) {
        Acc v[V][kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
            ok[k] = ok_o < O;
            Acc u[V];
            if (ok[k]) {
                loadv(x + (ok_o * Cv + cv) * V, u);
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                v[j][k] = ok[k] ? u[j] - shift[j] : Acc(0);
            }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
            merge_chunk(s[j], v[j], ok);
        }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        s[j] = column_merge(s[j]);
    }
    const bool writer = threadIdx.y == 0 && active;
    if (gridDim.y == 1) {
        if (writer) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                mean_out[cv * V + j] = shift[j] + s[j].mean;
                m2_out[cv * V + j] = s[j].m2;
            }
        }
        return;
    }
    if (writer) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const long long p = static_cast<long long>(blockIdx.y) * C + cv * V + j;
            part_n[p] = s[j].n;
            part_mean[p] = s[j].mean;
            part_m2[p] = s[j].m2;
        }
        __threadfence();
    }
    if (!last_block_arrived(tickets + blockIdx.x, gridDim.y)) {
        return;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        Moments<Acc> t = {0, Acc(0), Acc(0)};
        if (active) {
            for (unsigned int q = threadIdx.y; q < gridDim.y; q += blockDim.y) {
                const long long p = static_cast<long long>(q) * C + cv * V + j;
                Moments<Acc> b;
                b.n = __ldcg(part_n + p);
                b.mean = __ldcg(part_mean + p);
                b.m2 = __ldcg(part_m2 + p);
                t = merge(t, b);
            }
        }
        t = column_merge(t);
        if (writer) {
            mean_out[cv * V + j] = shift[j] + t.mean;
            m2_out[cv * V + j] = t.m2;
        }
    }
}

// --- kernels: backward reductions ------------------------------------------------------

// sum(g) and sum(g * (x - mean)) per channel, one read of dy and x (and y): g = dy,
// or, with y given (the relu epilogue), dy where y > 0 else 0. Same grids and
// last-block merge as stats_planes / stats_rows.
template <typename T, typename Acc, typename idx_t, int V>
__device__ void backward_reduce_planes(const T* __restrict__ dy, const T* __restrict__ y,
                                       const T* __restrict__ x, const Acc* __restrict__ mean,
                                       idx_t O, idx_t C, idx_t I,
                                       Acc* __restrict__ sum_dy_out,
                                       Acc* __restrict__ sum_dy_xmu_out,
                                       Acc* __restrict__ part_dy, Acc* __restrict__ part_dy_xmu,
                                       unsigned int* tickets) {
    const idx_t c = blockIdx.x;
    const idx_t Iv = I / V;
    const Acc m = __ldg(mean + c);
    const bool masked = y != nullptr;
    PlaneWalk<idx_t> w(Iv, static_cast<idx_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                       static_cast<idx_t>(gridDim.y) * blockDim.x);
    Sums<Acc> s = {Acc(0), Acc(0)};
    while (w.o < O) {
        Acc g[kUnroll][V];
        Acc v[kUnroll][V];
        Acc ys[kUnroll][V];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                g[k][j] = v[k][j] = Acc(0);
                ys[k][j] = Acc(1);
            }
            if (w.o < O) {
                const idx_t p = w.template offset<V>(C, c);
                loadv(dy + p, g[k]);
                loadv(x + p, v[k]);
                if (masked) {
                    loadv(y + p, ys[k]);
                }
            }
            w.advance();
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const Acc gk = relu_mask(g[k][j], ys[k][j]);  // ys is 1 where no mask
                s.dy += gk;
                s.dy_xmu = fma(gk, v[k][j] - m, s.dy_xmu);
            }
        }
    }
    s = block_sum(s);
    const unsigned int slices = gridDim.y;
    const bool leader = threadIdx.x == 0;
    if (slices == 1) {
        if (leader) {
            sum_dy_out[c] = s.dy;
            sum_dy_xmu_out[c] = s.dy_xmu;
        }
        return;
    }
    if (leader) {
        const long long p = static_cast<long long>(c) * slices + blockIdx.y;
        part_dy[p] = s.dy;
        part_dy_xmu[p] = s.dy_xmu;
        __threadfence();
    }
    if (!last_block_arrived(tickets + c, slices)) {
        return;
    }
    Sums<Acc> t = {Acc(0), Acc(0)};
    for (unsigned int q = threadIdx.x; q < slices; q += blockDim.x) {
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

template <typename T, typename Acc, typename idx_t, int V>
__device__ void backward_reduce_rows(const T* __restrict__ dy, const T* __restrict__ y,
                                     const T* __restrict__ x, const Acc* __restrict__ mean,
                                     idx_t O, idx_t C, Acc* __restrict__ sum_dy_out,
                                     Acc* __restrict__ sum_dy_xmu_out,
                                     Acc* __restrict__ part_dy, Acc* __restrict__ part_dy_xmu,
                                     unsigned int* tickets) {
    const idx_t Cv = C / V;
    const idx_t cv = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool active = cv < Cv;
    const bool masked = y != nullptr;
    Acc m[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        m[j] = active ? __ldg(mean + cv * V + j) : Acc(0);
    }
    const idx_t o_step = static_cast<idx_t>(gridDim.y) * blockDim.y;
    idx_t o = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    if (!active) {
        o = O;
    }
    Sums<Acc> s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        s[j] = {Acc(0), Acc(0)};
    }
    for (; o < O; o += kUnroll * o_step) {
        Acc g[kUnroll][V];
        Acc v[kUnroll][V];
        Acc ys[kUnroll][V];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const idx_t ok_o = o + k * o_step;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                g[k][j] = Acc(0);
                v[k][j] = m[j];
                ys[k][j] = Acc(1);
            }
            if (ok_o < O) {
                const idx_t p = (ok_o * Cv + cv) * V;
                loadv(dy + p, g[k]);
                loadv(x + p, v[k]);
                if (masked) {
                    loadv(y + p, ys[k]);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const Acc gk = relu_mask(g[k][j], ys[k][j]);  // ys is 1 where no mask
                s[j].dy += gk;
                s[j].dy_xmu = fma(gk, v[k][j] - m[j], s[j].dy_xmu);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        s[j] = column_sum(s[j]);
    }
    const bool writer = threadIdx.y == 0 && active;
    if (gridDim.y == 1) {
        if (writer) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sum_dy_out[cv * V + j] = s[j].dy;
                sum_dy_xmu_out[cv * V + j] = s[j].dy_xmu;
            }
        }
        return;
    }
    if (writer) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const long long p = static_cast<long long>(blockIdx.y) * C + cv * V + j;
            part_dy[p] = s[j].dy;
            part_dy_xmu[p] = s[j].dy_xmu;
        }
        __threadfence();
    }
    if (!last_block_arrived(tickets + blockIdx.x, gridDim.y)) {
        return;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
        Sums<Acc> t = {Acc(0), Acc(0)};
        if (active) {
            for (unsigned int q = threadIdx.y; q < gridDim.y; q += blockDim.y) {
                const long long p = static_cast<long long>(q) * C + cv * V + j;
                t.dy += __ldcg(part_dy + p);
                t.dy_xmu += __ldcg(part_dy_xmu + p);
            }
        }
        t = column_sum(t);
        if (writer) {
            sum_dy_out[cv * V + j] = t.dy;
            sum_dy_xmu_out[cv * V + j] = t.dy_xmu;
        }
    }
}

// --- kernels: elementwise ---------------------------------------------------------------
//
// One flat walk (FlatWalk) over the nv = n/V vectors of the array, for both families
// (ROWS: the V values of a vector are V consecutive channels; planes: one channel).
// Each thread loads its kUnroll vectors before it stores any.

// y = act((x - mean) * scale + shift [+ z]); z may be null, relu is 0 or 1.
template <typename T, typename Acc, typename idx_t, int V, bool ROWS>
__device__ void normalize_walk(const T* __restrict__ x, const T* __restrict__ z,
                               const Acc* __restrict__ mean, const Acc* __restrict__ scale,
                               const Acc* __restrict__ shift, int relu_on, T* __restrict__ y,
                               idx_t n, idx_t C, idx_t I) {
    const idx_t nv = n / V;
    const bool residual = z != nullptr;
    FlatWalk<idx_t> w = grid_walk<idx_t>(ROWS ? idx_t(1) : I / V, ROWS ? C / V : C);
    while (w.ev < nv) {
        idx_t pos[kUnroll];
        idx_t ch[kUnroll];
        Acc v[kUnroll][V];
        Acc r[kUnroll][V];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            pos[k] = w.ev < nv ? w.ev * V : idx_t(-1);
            ch[k] = w.template channel<V, ROWS>();
#pragma unroll
            for (int j = 0; j < V; ++j) {
                v[k][j] = r[k][j] = Acc(0);
            }
            if (pos[k] >= 0) {
                loadv(x + pos[k], v[k]);
                if (residual) {
                    loadv(z + pos[k], r[k]);
                }
            }
            w.advance();
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            if (pos[k] >= 0) {
                Acc out[V];
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    const idx_t c = ROWS ? ch[k] + j : ch[k];
                    Acc o = fma(v[k][j] - __ldg(mean + c), __ldg(scale + c), __ldg(shift + c));
                    if (residual) {
                        o += r[k][j];
                    }
                    out[j] = relu_on ? relu(o) : o;
                }
                storev(y + pos[k], out);
            }
        }
    }
}

// g = dy, or with y given dy where y > 0 else 0; dx = k_dy*g + k_x*(x - mean) + k_c;
// dz = g where dz is given.
template <typename T, typename Acc, typename idx_t, int V, bool ROWS>
__device__ void backward_elemt_walk(const T* __restrict__ dy, const T* __restrict__ y,
                                    const T* __restrict__ x, const Acc* __restrict__ mean,
                                    const Acc* __restrict__ k_dy, const Acc* __restrict__ k_x,
                                    const Acc* __restrict__ k_c, T* __restrict__ dz,
                                    T* __restrict__ dx, idx_t n, idx_t C, idx_t I) {
    const idx_t nv = n / V;
    const bool masked = y != nullptr;
    FlatWalk<idx_t> w = grid_walk<idx_t>(ROWS ? idx_t(1) : I / V, ROWS ? C / V : C);
    while (w.ev < nv) {
        idx_t pos[kUnroll];
        idx_t ch[kUnroll];
        Acc g[kUnroll][V];
        Acc v[kUnroll][V];
        Acc ys[kUnroll][V];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            pos[k] = w.ev < nv ? w.ev * V : idx_t(-1);
            ch[k] = w.template channel<V, ROWS>();
#pragma unroll
            for (int j = 0; j < V; ++j) {
                g[k][j] = v[k][j] = Acc(0);
                ys[k][j] = Acc(1);
            }
            if (pos[k] >= 0) {
                loadv(dy + pos[k], g[k]);
                loadv(x + pos[k], v[k]);
                if (masked) {
                    loadv(y + pos[k], ys[k]);
                }
            }
            w.advance();
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            if (pos[k] >= 0) {
                Acc out[V];
                Acc gm[V];
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    const idx_t c = ROWS ? ch[k] + j : ch[k];
                    gm[j] = relu_mask(g[k][j], ys[k][j]);  // ys is 1 where no mask
                    out[j] = fma(__ldg(k_dy + c), gm[j],
                                 fma(__ldg(k_x + c), v[k][j] - __ldg(mean + c), __ldg(k_c + c)));
                }
                storev(dx + pos[k], out);
                if (dz != nullptr) {
                    storev(dz + pos[k], gm);
                }
            }
        }
    }
}

// The vector path or the scalar one, chosen at run time (vec), as a compile-time
// width for f: f(IntC<V>()).
template <int V>
struct IntC {
    static constexpr int value = V;
};

template <typename T, typename F>
__device__ __forceinline__ void with_vec(int vec, F f) {
    if (vec) {
        f(IntC<VecWidth<T>::value>());
    } else {
        f(IntC<1>());
    }
}

}  // namespace fastbn

// --- extern "C" entry points: bn_<kernel>_<dtype>_<index> ------------------------------
//
// One wrapper per (kernel, dtype, index type); the loader launches them by name.
// The last argument, vec, picks the vector path (see the top of this file). The
// plain kernels are the epilogue ones without z, relu, y or dz.

#define FASTBN_ENTRY_POINTS(DTYPE, T, ACC, INDEX, IDX)                                       \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_stats_planes_##DTYPE##_##INDEX(const T* __restrict__ x, IDX O, IDX C, IDX I,          \
            ACC* mean, ACC* m2, long long* part_n, ACC* part_mean, ACC* part_m2,             \
            unsigned int* tickets, int vec) {                                                \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::stats_planes<T, ACC, IDX, decltype(w)::value>(x, O, C, I, mean,          \
                m2, part_n, part_mean, part_m2, tickets);                                    \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_stats_rows_##DTYPE##_##INDEX(const T* __restrict__ x, IDX O, IDX C, ACC* mean,        \
            ACC* m2, long long* part_n, ACC* part_mean, ACC* part_m2,                        \
            unsigned int* tickets, int vec) {                                                \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::stats_rows<T, ACC, IDX, decltype(w)::value>(x, O, C, mean, m2,           \
                part_n, part_mean, part_m2, tickets);                                        \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_planes_##DTYPE##_##INDEX(const T* __restrict__ dy,                    \
            const T* __restrict__ x, const ACC* mean, IDX O, IDX C, IDX I, ACC* sum_dy,      \
            ACC* sum_dy_xmu, ACC* part_dy, ACC* part_dy_xmu, unsigned int* tickets,          \
            int vec) {                                                                       \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_reduce_planes<T, ACC, IDX, decltype(w)::value>(dy,              \
                nullptr, x, mean, O, C, I, sum_dy, sum_dy_xmu, part_dy, part_dy_xmu,         \
                tickets);                                                                    \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_relu_planes_##DTYPE##_##INDEX(const T* __restrict__ dy,               \
            const T* __restrict__ y, const T* __restrict__ x, const ACC* mean, IDX O,        \
            IDX C, IDX I, ACC* sum_dy, ACC* sum_dy_xmu, ACC* part_dy, ACC* part_dy_xmu,      \
            unsigned int* tickets, int vec) {                                                \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_reduce_planes<T, ACC, IDX, decltype(w)::value>(dy, y, x,        \
                mean, O, C, I, sum_dy, sum_dy_xmu, part_dy, part_dy_xmu, tickets);           \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_rows_##DTYPE##_##INDEX(const T* __restrict__ dy,                      \
            const T* __restrict__ x, const ACC* mean, IDX O, IDX C, ACC* sum_dy,             \
            ACC* sum_dy_xmu, ACC* part_dy, ACC* part_dy_xmu, unsigned int* tickets,          \
            int vec) {                                                                       \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_reduce_rows<T, ACC, IDX, decltype(w)::value>(dy,                \
                nullptr, x, mean, O, C, sum_dy, sum_dy_xmu, part_dy, part_dy_xmu,            \
                tickets);                                                                    \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_reduce_relu_rows_##DTYPE##_##INDEX(const T* __restrict__ dy,                 \
            const T* __restrict__ y, const T* __restrict__ x, const ACC* mean, IDX O,        \
            IDX C, ACC* sum_dy, ACC* sum_dy_xmu, ACC* part_dy, ACC* part_dy_xmu,             \
            unsigned int* tickets, int vec) {                                                \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_reduce_rows<T, ACC, IDX, decltype(w)::value>(dy, y, x,          \
                mean, O, C, sum_dy, sum_dy_xmu, part_dy, part_dy_xmu, tickets);              \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_planes_##DTYPE##_##INDEX(const T* __restrict__ x, const ACC* mean,          \
            const ACC* scale, const ACC* shift, T* y, IDX n, IDX C, IDX I, int vec) {        \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::normalize_walk<T, ACC, IDX, decltype(w)::value, false>(x,                \
                nullptr, mean, scale, shift, 0, y, n, C, I);                                 \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_epilogue_planes_##DTYPE##_##INDEX(const T* __restrict__ x,                  \
            const T* __restrict__ z, const ACC* mean, const ACC* scale, const ACC* shift,    \
            int relu, T* y, IDX n, IDX C, IDX I, int vec) {                                  \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::normalize_walk<T, ACC, IDX, decltype(w)::value, false>(x, z,             \
                mean, scale, shift, relu, y, n, C, I);                                       \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_planes_##DTYPE##_##INDEX(const T* __restrict__ dy,                     \
            const T* __restrict__ x, const ACC* mean, const ACC* k_dy, const ACC* k_x,       \
            const ACC* k_c, T* dx, IDX n, IDX C, IDX I, int vec) {                           \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_elemt_walk<T, ACC, IDX, decltype(w)::value, false>(dy,          \
                nullptr, x, mean, k_dy, k_x, k_c, nullptr, dx, n, C, I);                     \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_relu_planes_##DTYPE##_##INDEX(const T* __restrict__ dy,                \
            const T* __restrict__ y, const T* __restrict__ x, const ACC* mean,               \
            const ACC* k_dy, const ACC* k_x, const ACC* k_c, T* dz, T* dx, IDX n, IDX C,     \
            IDX I, int vec) {                                                                \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_elemt_walk<T, ACC, IDX, decltype(w)::value, false>(dy,          \
                y, x, mean, k_dy, k_x, k_c, dz, dx, n, C, I);                                \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_rows_##DTYPE##_##INDEX(const T* __restrict__ x, const ACC* mean,            \
            const ACC* scale, const ACC* shift, T* y, IDX n, IDX C, int vec) {               \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::normalize_walk<T, ACC, IDX, decltype(w)::value, true>(x, nullptr,        \
                mean, scale, shift, 0, y, n, C, static_cast<IDX>(1));                        \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_normalize_epilogue_rows_##DTYPE##_##INDEX(const T* __restrict__ x,                    \
            const T* __restrict__ z, const ACC* mean, const ACC* scale, const ACC* shift,    \
            int relu, T* y, IDX n, IDX C, int vec) {                                         \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::normalize_walk<T, ACC, IDX, decltype(w)::value, true>(x, z, mean,        \
                scale, shift, relu, y, n, C, static_cast<IDX>(1));                           \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_rows_##DTYPE##_##INDEX(const T* __restrict__ dy,                       \
            const T* __restrict__ x, const ACC* mean, const ACC* k_dy, const ACC* k_x,       \
            const ACC* k_c, T* dx, IDX n, IDX C, int vec) {                                  \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_elemt_walk<T, ACC, IDX, decltype(w)::value, true>(dy,           \
                nullptr, x, mean, k_dy, k_x, k_c, nullptr, dx, n, C,                         \
                static_cast<IDX>(1));                                                        \
        });                                                                                  \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fastbn::kMaxThreads)                        \
    bn_backward_elemt_relu_rows_##DTYPE##_##INDEX(const T* __restrict__ dy,                  \
            const T* __restrict__ y, const T* __restrict__ x, const ACC* mean,               \
            const ACC* k_dy, const ACC* k_x, const ACC* k_c, T* dz, T* dx, IDX n, IDX C,     \
            int vec) {                                                                       \
        fastbn::with_vec<T>(vec, [&](auto w) {                                               \
            fastbn::backward_elemt_walk<T, ACC, IDX, decltype(w)::value, true>(dy, y,        \
                x, mean, k_dy, k_x, k_c, dz, dx, n, C, static_cast<IDX>(1));                 \
        });                                                                                  \
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
