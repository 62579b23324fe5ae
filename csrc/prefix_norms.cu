// Prefix L2 norms: out[r, out_col[j]] = ||x[r, :dims[j]]|| for sorted nesting dims.
//
// Compiled at run time by NVRTC (mrl_kernels/cuda/loader.py) and ahead of time by nvcc in the tests;
// tests/csrc/prefix_norms_host.cu includes this file to run the __host__ __device__ parts on the CPU.
//
// No #includes on purpose: NVRTC has no host headers, and it finds cuda_fp16.h / cuda_bf16.h only
// when a CUDA toolkit include directory is on its path, which a pip-installed CuPy does not promise.
// Half and bfloat16 therefore arrive as raw 16-bit patterns and are widened here by hand.

namespace mrl {

__host__ __device__ inline float bits_to_float(unsigned int u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
#endif
}

__host__ __device__ inline float half_bits_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int exp = (h >> 10) & 0x1fu;
    const unsigned int man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in fp32
        const float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));        // rebias 15 -> 127
#endif
}

// bfloat16 is the top half of an fp32, so widening is a shift on host and device alike.
__host__ __device__ inline float bf16_bits_to_float(unsigned short b) {
    return bits_to_float((unsigned int)b << 16);
}

// Element loaders: the storage type the kernel reads and how it becomes fp32.
struct F32 {
    typedef float T;
    __host__ __device__ static float load(float v) { return v; }
};
struct F16 {
    typedef unsigned short T;
    __host__ __device__ static float load(unsigned short v) { return half_bits_to_float(v); }
};
struct BF16 {
    typedef unsigned short T;
    __host__ __device__ static float load(unsigned short v) { return bf16_bits_to_float(v); }
};

// One lane's share of the sum of squares of row[lo:hi] when `lanes` lanes split the segment:
// columns lo + lane, lo + lane + lanes, ...  Starting at lo (not at a multiple of lanes) keeps
// each step's loads contiguous across the warp however the nesting dims are aligned.
template <class L>
__host__ __device__ inline float lane_sumsq(const typename L::T* row, int lo, int hi, int lane,
                                            int lanes) {
    float acc = 0.f;
    for (int c = lo + lane; c < hi; c += lanes) {
        const float v = L::load(row[c]);
        acc += v * v;
    }
    return acc;
}

// Serial model of one warp's row: the same lane split and per-segment fp32 accumulation as the
// kernel, with the warp reduction replaced by a loop. The host harness checks it against a
// float64 reference; the kernel differs only in the order the 32 lane partials are added.
template <class L>
__host__ __device__ inline void row_prefix_norms(const typename L::T* row, const int* dims,
                                                 const int* out_col, int n_dims, int lanes,
                                                 float* out_row) {
    float total = 0.f;
    int lo = 0;
    for (int j = 0; j < n_dims; ++j) {
        const int hi = dims[j];
        float seg = 0.f;
        for (int lane = 0; lane < lanes; ++lane) seg += lane_sumsq<L>(row, lo, hi, lane, lanes);
        total += seg;
        out_row[out_col[j]] = sqrtf(total);
        lo = hi;
    }
}

// One warp per row. dims: n_dims ascending ints in 1..D; out_col[j]: the output column of dims[j]
// (the caller's order); out: [n_rows, n_dims] fp32, contiguous.
template <class L>
__device__ inline void prefix_norms_warp(const typename L::T* __restrict__ x, long long n_rows,
                                         long long row_stride, const int* __restrict__ dims,
                                         const int* __restrict__ out_col, int n_dims,
                                         float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;  // whole warps leave together, so the shuffles below stay full
    // 64-bit offsets: row * row_stride passes 2^31 at about 1M rows of 2048 dims, a modest index.
    const typename L::T* xr = x + row * row_stride;
    float* outr = out + row * n_dims;
    float total = 0.f;
    int lo = 0;
    for (int j = 0; j < n_dims; ++j) {
        const int hi = __ldg(dims + j);
        float s = lane_sumsq<L>(xr, lo, hi, lane, 32);
        // xor butterfly: every lane ends with the same (bitwise) segment sum.
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        total += s;
        if (lane == 0) outr[__ldg(out_col + j)] = sqrtf(total);
        lo = hi;
    }
}

}  // namespace mrl

#define MRL_PREFIX_NORMS_ENTRY(NAME, LOADER)                                                      \
    extern "C" __global__ void NAME(const LOADER::T* __restrict__ x, long long n_rows,            \
                                    long long row_stride, const int* __restrict__ dims,           \
                                    const int* __restrict__ out_col, int n_dims,                  \
                                    float* __restrict__ out) {                                    \
        mrl::prefix_norms_warp<LOADER>(x, n_rows, row_stride, dims, out_col, n_dims, out);        \
    }

MRL_PREFIX_NORMS_ENTRY(prefix_norms_f32, mrl::F32)
MRL_PREFIX_NORMS_ENTRY(prefix_norms_f16, mrl::F16)
MRL_PREFIX_NORMS_ENTRY(prefix_norms_bf16, mrl::BF16)

#undef MRL_PREFIX_NORMS_ENTRY
