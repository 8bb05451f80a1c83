// CUDA kernels of the advantage estimators and masked statistics: gae, discounted_returns,
// group_advantages, masked_mean, masked_whiten. Semantics: rlhf_fast/ops/reference.py.
//
// gae / discounted_returns: one launch, one block per row, the row processed in tiles from
// right to left. The backward recurrence over the unmasked tokens
//     a_t = (r_t - v_t) + γ·V_next + γλ·a_next,   V_next <- v_t
// is an affine map of the state (a, V) carried from the right; a masked token is the identity.
// Each thread composes the maps of its ITEMS consecutive tokens, a block-wide suffix scan of
// those compositions gives every thread its incoming state, and a second sweep writes the
// outputs. So B = 1, T = 131072 runs on 1024 threads instead of one, and large B fills the
// GPU with one block per row. discounted_returns is the same kernel without values and λ = 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common.cuh"

namespace rlhf_fast {
namespace cuda {
namespace {

// a' = K + A·a + G·V,  V' = Vc + E·V
template <typename acc_t>
struct Affine {
  acc_t K, A, G, Vc, E;
};

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> identity() {
  return {acc_t(0), acc_t(1), acc_t(0), acc_t(0), acc_t(1)};
}

// f ∘ g: g (the chunk further right) is applied first
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose(const Affine<acc_t>& f, const Affine<acc_t>& g) {
  return {f.K + f.A * g.K + f.G * g.Vc, f.A * g.A, f.A * g.G + f.G * g.E, f.Vc + f.E * g.Vc, f.E * g.E};
}

template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> shfl_down(const Affine<acc_t>& x, int o) {
  return {__shfl_down_sync(kFull, x.K, o), __shfl_down_sync(kFull, x.A, o), __shfl_down_sync(kFull, x.G, o),
          __shfl_down_sync(kFull, x.Vc, o), __shfl_down_sync(kFull, x.E, o)};
}

constexpr int kScanThreads = 1024;

template <typename acc_t>
struct ScanItems {
  // 1024 threads x ITEMS tokens per tile fit the 48 KB default shared memory limit
  static constexpr int value = sizeof(acc_t) == 8 ? 2 : 4;
};

// Dynamic shared memory of one tile: rewards (and values) in acc_t, then the mask. Sized by
// the launch's block, so the 64-thread blocks of short rows take 2.3 KB instead of a
// 1024-thread tile's 37 KB, and many of them fit on an SM.
template <typename acc_t, bool HAS_VALUES>
size_t scan_smem_bytes(int threads) {
  const size_t tile = static_cast<size_t>(threads) * ScanItems<acc_t>::value;
  return tile * sizeof(acc_t) * (HAS_VALUES ? 2 : 1) + tile * sizeof(bool);
}

// One block per row. HAS_VALUES = false is discounted_returns (values 0, λ = 1).
template <typename scalar_t, typename acc_t, bool HAS_VALUES>
__global__ void __launch_bounds__(kScanThreads) gae_scan_kernel(const scalar_t* __restrict__ rewards,
                                                                 const scalar_t* __restrict__ values,
                                                                 const bool* __restrict__ mask, acc_t* __restrict__ adv,
                                                                 acc_t* __restrict__ ret, int64_t T, acc_t gamma,
                                                                 acc_t c /* γλ */) {
  constexpr int ITEMS = ScanItems<acc_t>::value;
  extern __shared__ __align__(16) unsigned char scan_smem[];  // scan_smem_bytes(blockDim.x)
  const int tile = blockDim.x * ITEMS;
  acc_t* s_r = reinterpret_cast<acc_t*>(scan_smem);
  acc_t* s_v = s_r + (HAS_VALUES ? tile : 0);  // aliases s_r without values: never touched then
  bool* s_m = reinterpret_cast<bool*>(s_r + (HAS_VALUES ? 2 : 1) * tile);
  __shared__ acc_t s_a[32], s_V[32];  // state entering each warp from the right
  __shared__ Affine<acc_t> s_warp[32];

  // blockDim.x is a multiple of 32 (scan_threads): whole warps, full shuffle masks
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t row = blockIdx.x;
  const scalar_t* r_row = rewards + row * T;
  const scalar_t* v_row = HAS_VALUES ? values + row * T : nullptr;
  const bool* m_row = mask + row * T;
  acc_t* adv_row = adv + row * T;
  acc_t* ret_row = HAS_VALUES ? ret + row * T : nullptr;

  acc_t carry_a = 0, carry_V = 0;  // (thread 0) state after the row's last token: a = 0, V = 0
  for (int64_t start = ((T - 1) / tile) * tile; start >= 0; start -= tile) {
    // coalesced load of the tile; the padding past T is masked (identity)
    for (int k = 0; k < ITEMS; ++k) {
      const int j = k * blockDim.x + tid;
      const int64_t t = start + j;
      const bool in = t < T;
      s_m[j] = in && m_row[t];
      s_r[j] = in ? static_cast<acc_t>(r_row[t]) : acc_t(0);
      if (HAS_VALUES) s_v[j] = in ? static_cast<acc_t>(v_row[t]) : acc_t(0);
    }
    __syncthreads();
    // this thread's tokens [tid*ITEMS, (tid+1)*ITEMS): compose their maps right to left
    Affine<acc_t> x = identity<acc_t>();
#pragma unroll
    for (int i = ITEMS - 1; i >= 0; --i) {
      const int j = tid * ITEMS + i;
      if (!s_m[j]) continue;
      const acc_t v = HAS_VALUES ? s_v[j] : acc_t(0);
      const Affine<acc_t> tok{s_r[j] - v, c, gamma, v, acc_t(0)};
      x = compose(tok, x);
    }
    // inclusive suffix scan within the warp: x_j <- X_j ∘ ... ∘ X_31
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const Affine<acc_t> y = shfl_down(x, o);
      if (lane + o < 32) x = compose(x, y);
    }
    if (lane == 0) s_warp[warp] = x;
    __syncthreads();
    if (tid == 0) {
      acc_t a = carry_a, V = carry_V;
      for (int w = nwarps - 1; w >= 0; --w) {
        s_a[w] = a;  // entering warp w from the right
        s_V[w] = V;
        const Affine<acc_t>& f = s_warp[w];
        const acc_t na = f.K + f.A * a + f.G * V;
        V = f.Vc + f.E * V;
        a = na;
      }
      carry_a = a;  // state at the tile's first token: the next tile's carry (thread 0 only)
      carry_V = V;
    }
    __syncthreads();
    // incoming state of this thread = (suffix of the next lane)(state entering the warp)
    const Affine<acc_t> nxt = shfl_down(x, 1);
    acc_t a = s_a[warp], V = s_V[warp];
    if (lane < 31) {
      const acc_t na = nxt.K + nxt.A * a + nxt.G * V;
      V = nxt.Vc + nxt.E * V;
      a = na;
    }
    // second sweep: outputs in place of the inputs in shared memory
#pragma unroll
    for (int i = ITEMS - 1; i >= 0; --i) {
      const int j = tid * ITEMS + i;
      if (!s_m[j]) {
        s_r[j] = 0;
        if (HAS_VALUES) s_v[j] = 0;
        continue;
      }
      const acc_t v = HAS_VALUES ? s_v[j] : acc_t(0);
      a = s_r[j] - v + gamma * V + c * a;
      V = v;
      s_r[j] = a;
      if (HAS_VALUES) s_v[j] = a + v;
    }
    __syncthreads();
    for (int k = 0; k < ITEMS; ++k) {
      const int j = k * blockDim.x + tid;
      const int64_t t = start + j;
      if (t < T) {
        adv_row[t] = s_r[j];
        if (HAS_VALUES) ret_row[t] = s_v[j];
      }
    }
    __syncthreads();  // the next tile overwrites the shared tile
  }
}

at::ScalarType out_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor bool_mask(const at::Tensor& mask) {
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

// Threads per block: just enough for one tile to cover a row of up to 1024·ITEMS tokens
// (whole warps, at least 2), else the largest block. Padding threads would only load and
// scan identities, and a smaller block also shortens the serial per-warp carry of the scan and
// lets more rows share an SM: (16, 1024) in fp32 takes 256 threads, not 1024.
template <typename acc_t>
int scan_threads(int64_t T) {
  constexpr int64_t items = ScanItems<acc_t>::value;
  const int64_t need = (T + items - 1) / items;
  const int64_t warps = (need + 31) / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 2) * 32, kScanThreads));
}

void check_rows(const char* op, int64_t B) {
  // one block per row on gridDim.x
  TORCH_CHECK_VALUE(B < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows, got ", B);
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK_VALUE(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
                    "gae: rewards, values and mask must be [B, T] of one shape");
  const c10::DeviceGuard guard(rewards.device());
  const auto dt = at::promote_types(rewards.scalar_type(), values.scalar_type());
  auto r = rewards.to(dt).contiguous();
  auto v = values.to(dt).contiguous();
  auto m = bool_mask(mask);
  const int64_t B = r.size(0), T = r.size(1);
  auto adv = at::empty({B, T}, r.options().dtype(out_dtype(dt)));
  auto ret = at::empty_like(adv);
  if (B == 0 || T == 0) return {adv, ret};
  check_rows("gae", B);
  const cudaStream_t stream = current_stream(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "gae_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int threads = scan_threads<acc_t>(T);
    gae_scan_kernel<scalar_t, acc_t, true>
        <<<static_cast<unsigned int>(B), threads, scan_smem_bytes<acc_t, true>(threads), stream>>>(
        r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(), adv.data_ptr<acc_t>(),
        ret.data_ptr<acc_t>(), T, static_cast<acc_t>(gamma), static_cast<acc_t>(gamma * lam));
  });
  check_launch("gae");
  return {adv, ret};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  TORCH_CHECK_VALUE(rewards.dim() == 2 && mask.sizes() == rewards.sizes(),
                    "discounted_returns: rewards and mask must be [B, T] of one shape");
  const c10::DeviceGuard guard(rewards.device());
  auto r = rewards.contiguous();
  auto m = bool_mask(mask);
  const int64_t B = r.size(0), T = r.size(1);
  auto out = at::empty({B, T}, r.options().dtype(out_dtype(r.scalar_type())));
  if (B == 0 || T == 0) return out;
  check_rows("discounted_returns", B);
  const cudaStream_t stream = current_stream(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "discounted_returns_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int threads = scan_threads<acc_t>(T);
    // G_t = r_t + γ·G_next: the GAE map with V = 0 and γλ = γ
    gae_scan_kernel<scalar_t, acc_t, false>
        <<<static_cast<unsigned int>(B), threads, scan_smem_bytes<acc_t, false>(threads), stream>>>(
        r.data_ptr<scalar_t>(), nullptr, m.data_ptr<bool>(), out.data_ptr<acc_t>(), nullptr, T,
        static_cast<acc_t>(0), static_cast<acc_t>(gamma));
  });
  check_launch("discounted_returns");
  return out;
}

// ---------------------------------------------------------------- group advantages
// One warp per group (segmented reduction); two passes over the group for the std, in fp64.

enum GroupKind { kGrpo = 0, kRloo = 1, kDrGrpo = 2 };

template <typename scalar_t, typename acc_t>
__global__ void group_adv_kernel(const scalar_t* __restrict__ s, acc_t* __restrict__ out, int64_t n_groups,
                                 int64_t gs, int kind, bool normalize_std, double eps) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (g >= n_groups) return;  // whole warps exit together
  const scalar_t* x = s + g * gs;
  acc_t* y = out + g * gs;
  double sum = 0.0;
  for (int64_t i = lane; i < gs; i += 32) sum += static_cast<double>(x[i]);
  sum = warp_sum(sum);
  const double mean = sum / static_cast<double>(gs);
  if (kind == kRloo) {
    for (int64_t i = lane; i < gs; i += 32) {
      const double xi = static_cast<double>(x[i]);
      y[i] = static_cast<acc_t>(xi - (sum - xi) / static_cast<double>(gs - 1));
    }
    return;
  }
  if (kind == kDrGrpo || !normalize_std) {
    for (int64_t i = lane; i < gs; i += 32) y[i] = static_cast<acc_t>(static_cast<double>(x[i]) - mean);
    return;
  }
  if (gs == 1) {  // the reference: a group of one answer has no spread, advantage 0
    if (lane == 0) y[0] = acc_t(0);
    return;
  }
  double sq = 0.0;
  for (int64_t i = lane; i < gs; i += 32) {
    const double d = static_cast<double>(x[i]) - mean;
    sq += d * d;
  }
  sq = warp_sum(sq);
  const double inv = 1.0 / (sqrt(sq / static_cast<double>(gs - 1)) + eps);
  for (int64_t i = lane; i < gs; i += 32) y[i] = static_cast<acc_t>((static_cast<double>(x[i]) - mean) * inv);
}

at::Tensor group_advantages_cuda(const at::Tensor& scores, int64_t group_size, c10::string_view kind_sv,
                                 bool normalize_std, double eps) {
  const std::string kind_s(kind_sv);
  int kind;
  if (kind_s == "grpo") kind = kGrpo;
  else if (kind_s == "rloo") kind = kRloo;
  else if (kind_s == "dr_grpo") kind = kDrGrpo;
  else TORCH_CHECK_VALUE(false, "group_advantages: kind must be one of grpo, rloo, dr_grpo, got '", kind_s, "'");
  TORCH_CHECK_VALUE(scores.dim() == 1, "group_advantages: scores must be [B]");
  TORCH_CHECK_VALUE(group_size >= 1 && scores.size(0) % group_size == 0,
                    "group_advantages: group_size must be >= 1 and divide B");
  TORCH_CHECK_VALUE(kind != kRloo || group_size >= 2, "group_advantages: group_size must be >= 2 for rloo");
  const c10::DeviceGuard guard(scores.device());
  auto s = scores.contiguous();
  auto out = at::empty({s.size(0)}, s.options().dtype(out_dtype(s.scalar_type())));
  const int64_t n_groups = s.size(0) / group_size;
  if (n_groups == 0) return out;
  constexpr int kThreads = 256;  // a multiple of 32: every warp is whole and exits whole
  const int64_t blocks = ceil_div(n_groups * 32, kThreads);
  TORCH_CHECK_VALUE(blocks < (int64_t(1) << 31), "group_advantages: too many groups (", n_groups, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "group_advantages_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    group_adv_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, current_stream(s)>>>(
        s.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), n_groups, group_size, kind, normalize_std, eps);
  });
  check_launch("group_advantages");
  return out;
}

// ---------------------------------------------------------------- masked mean / whiten
// Deterministic two-level reductions (per-block partials, then one block), fp64 accumulation,
// and the statistics stay on the device: no host sync anywhere.

constexpr int kRedThreads = 256;
constexpr int kMaxRedBlocks = 1024;

// partial[b] = (Σ x·m, Σ m) over block b's grid-stride share, or Σ (x - mean)²·m with a mean.
template <typename scalar_t>
__global__ void masked_partial_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ m, int64_t n,
                                      const double* __restrict__ stats /* null: first pass */,
                                      double* __restrict__ partial) {
  __shared__ double buf[33];
  double a = 0.0, b = 0.0;
  const double mean = stats ? stats[0] / fmax(stats[1], 1.0) : 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!m[i]) continue;
    const double xi = static_cast<double>(x[i]);
    if (stats) {
      a += (xi - mean) * (xi - mean);
    } else {
      a += xi;
      b += 1.0;
    }
  }
  a = block_sum(a, buf);
  b = block_sum(b, buf);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = a;
    partial[2 * blockIdx.x + 1] = b;
  }
}

// stats[off + 0, off + 1] = Σ of the partials, in a fixed order
__global__ void reduce_partials_kernel(const double* __restrict__ partial, int nblocks, double* __restrict__ stats,
                                       int off) {
  __shared__ double buf[33];
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < nblocks; i += blockDim.x) {
    a += partial[2 * i];
    b += partial[2 * i + 1];
  }
  a = block_sum(a, buf);
  b = block_sum(b, buf);
  if (threadIdx.x == 0) {
    stats[off] = a;
    stats[off + 1] = b;
  }
}

template <typename acc_t>
__global__ void mean_finalize_kernel(const double* __restrict__ stats, acc_t* __restrict__ out) {
  out[0] = static_cast<acc_t>(stats[0] / fmax(stats[1], 1.0));
}

// out = (x - mean)·rsqrt(var + eps) (+ mean), 0 where masked; stats = [Σx, n, Σ(x-mean)², -]
template <typename scalar_t, typename acc_t>
__global__ void whiten_apply_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ m,
                                    const double* __restrict__ stats, acc_t* __restrict__ out, int64_t n,
                                    bool shift_mean, double eps) {
  const double cnt = stats[1];
  const double mean = stats[0] / fmax(cnt, 1.0);
  const double var = stats[2] / fmax(cnt - 1.0, 1.0);  // Bessel, as the reference
  const acc_t meanf = static_cast<acc_t>(mean);
  const acc_t scale = static_cast<acc_t>(1.0 / sqrt(var + eps));
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t y = (static_cast<acc_t>(x[i]) - meanf) * scale;
    if (!shift_mean) y += meanf;
    out[i] = m[i] ? y : acc_t(0);
  }
}

int red_blocks(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kRedThreads * 4), kMaxRedBlocks))); }

at::Tensor masked_mean_cuda(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(x.sizes() == mask.sizes(), "masked_mean: x and mask must have one shape");
  const c10::DeviceGuard guard(x.device());
  auto xc = x.contiguous();
  auto m = bool_mask(mask);
  const int64_t n = xc.numel();
  const int nb = red_blocks(n);
  auto work = at::empty({2 * nb + 2}, xc.options().dtype(at::kDouble));
  auto out = at::empty({}, xc.options().dtype(out_dtype(xc.scalar_type())));
  const cudaStream_t stream = current_stream(xc);
  double* partial = work.data_ptr<double>();
  double* stats = partial + 2 * nb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_mean_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    masked_partial_kernel<scalar_t><<<nb, kRedThreads, 0, stream>>>(xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), n,
                                                                     nullptr, partial);
    reduce_partials_kernel<<<1, kRedThreads, 0, stream>>>(partial, nb, stats, 0);
    mean_finalize_kernel<acc_t><<<1, 1, 0, stream>>>(stats, out.data_ptr<acc_t>());
  });
  check_launch("masked_mean");
  return out;
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps) {
  TORCH_CHECK_VALUE(x.sizes() == mask.sizes(), "masked_whiten: x and mask must have one shape");
  const c10::DeviceGuard guard(x.device());
  auto xc = x.contiguous();
  auto m = bool_mask(mask);
  const int64_t n = xc.numel();
  const int nb = red_blocks(n);
  auto work = at::empty({2 * nb + 4}, xc.options().dtype(at::kDouble));
  auto out = at::empty(xc.sizes(), xc.options().dtype(out_dtype(xc.scalar_type())));
  const cudaStream_t stream = current_stream(xc);
  double* partial = work.data_ptr<double>();
  double* stats = partial + 2 * nb;  // [Σx, n, Σ(x-mean)², unused]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_whiten_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    // two passes (mean, then squared deviations) rather than Welford: exact-enough in fp64
    // and each pass is one coalesced read
    masked_partial_kernel<scalar_t><<<nb, kRedThreads, 0, stream>>>(xp, m.data_ptr<bool>(), n, nullptr, partial);
    reduce_partials_kernel<<<1, kRedThreads, 0, stream>>>(partial, nb, stats, 0);
    masked_partial_kernel<scalar_t><<<nb, kRedThreads, 0, stream>>>(xp, m.data_ptr<bool>(), n, stats, partial);
    reduce_partials_kernel<<<1, kRedThreads, 0, stream>>>(partial, nb, stats, 2);
    if (n > 0) {
      const int64_t ab = std::min<int64_t>(ceil_div(n, kRedThreads), 65535);
      whiten_apply_kernel<scalar_t, acc_t><<<ab, kRedThreads, 0, stream>>>(xp, m.data_ptr<bool>(), stats,
                                                                            out.data_ptr<acc_t>(), n, shift_mean, eps);
    }
  });
  check_launch("masked_whiten");
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae", &cuda::gae_cuda);
  m.impl("discounted_returns", &cuda::discounted_returns_cuda);
  m.impl("group_advantages", &cuda::group_advantages_cuda);
  m.impl("masked_mean", &cuda::masked_mean_cuda);
  m.impl("masked_whiten", &cuda::masked_whiten_cuda);
}

}  // namespace rlhf_fast
