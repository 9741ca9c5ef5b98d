// KV int8 quantize / dequantize for the cloud side of the handoff (CUDA C++, compiled to PTX).
//
// The rule is the NumPy reference's (edgeserve/kernels/kvpack.py): one symmetric float32 scale per
// (token, head) row, scale = max|row| / 127, q = round-half-to-even(row / scale) clipped to +-127,
// a zero row gives scale 0 and q 0. One block of 32 * k threads per row; the row's max is a warp
// shuffle reduction, then one shared-memory step across warps. The quotient is float32, so q may
// differ from the reference's by one at a near-tie (|x/s - n - 1/2| < 2^-24 * 127), as in Triton.
//
// Layout: x [rows, head_dim] (rows = tokens * heads, contiguous), q the same, scales [rows].

#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float row_absmax(const __half* x, int head_dim) {
    __shared__ float warp_part[32];
    float m = 0.0f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) m = fmaxf(m, fabsf(__half2float(x[i])));
    m = warp_max(m);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_part[warp] = m;
    __syncthreads();
    m = (threadIdx.x < (blockDim.x + 31) / 32) ? warp_part[lane] : 0.0f;
    if (warp == 0) m = warp_max(m);
    if (threadIdx.x == 0) warp_part[0] = m;
    __syncthreads();
    return warp_part[0];
}

extern "C" __global__ void kv_quantize_f16(const __half* __restrict__ x, int8_t* __restrict__ q,
                                           float* __restrict__ scales, int head_dim) {
    const long row = blockIdx.x;
    const __half* xr = x + row * head_dim;
    const float scale = row_absmax(xr, head_dim) / 127.0f;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float r = 0.0f;
        if (scale > 0.0f) r = fminf(fmaxf(rintf(__half2float(xr[i]) / scale), -127.0f), 127.0f);  // rintf: ties to even
        q[row * head_dim + i] = (int8_t)r;
    }
    if (threadIdx.x == 0) scales[row] = scale;
}

extern "C" __global__ void kv_dequantize_f16(const int8_t* __restrict__ q, const float* __restrict__ scales,
                                             __half* __restrict__ out, int head_dim) {
    const long row = blockIdx.x;
    const float scale = scales[row];
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x)
        out[row * head_dim + i] = __float2half_rn((float)q[row * head_dim + i] * scale);
}
