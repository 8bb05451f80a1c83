// Shared helpers of the CUDA kernels: the current stream, launch checks, warp/block
// reductions and scans, and a counter-based Philox4x32-10 generator.
//
// Only raw CUDA and device-generic c10 headers are used: the c10/cuda and ATen/cuda headers
// need cuda_cmake_macros.h / cusparse.h, which the CPU torch wheel and a bare nvcc lack, and
// `make check-cuda` must compile these files there. The current stream comes through the
// device-generic DeviceGuardImplInterface, which torch's CUDA build registers.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_fast {
namespace cuda {

inline cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(s.native_handle());
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `buf` holds >= 32 T in shared memory.
template <typename T>
__device__ T block_sum(T v, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? buf[lane] : T(0);
  return warp_sum(r);
}

// Block-wide exclusive prefix sum in thread order; `total` gets the block sum.
template <typename T>
__device__ T block_exclusive_scan(T v, T* buf, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) buf[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? buf[lane] : T(0);
    T winc = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T n = __shfl_up_sync(kFull, winc, o);
      if (lane >= o) winc += n;
    }
    buf[lane] = winc - w;  // exclusive prefix over warps
    if (lane == 31) buf[32] = winc;
  }
  __syncthreads();
  *total = buf[32];
  return buf[warp] + inc - v;
}

// ---------------------------------------------------------------- Philox4x32-10
// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the same
// generator as curand's Philox4_32_10, written out because curand is not always installed.
struct Philox {
  uint4 ctr;
  uint2 key;
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += W0;
    k.y += W1;
  }
  return c;
}

// A uniform in the open interval (0, 1) from 24 random bits: never 0 or 1, so -log(-log(u))
// is finite.
__device__ __forceinline__ float uniform_open(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

}  // namespace cuda
}  // namespace rlhf_fast
