// Token permute / unpermute: CUDA implementation of the ops declared in csrc/permute.cpp (built as
// megamoe._C_cuda where torch has CUDA; CI compiles it with nvcc for sm_80 and sm_90 even without a GPU).
//
// Index build (row_map), two kernels and no sort:
//   expert_rank_kernel   one block per expert scans the flattened [T*k] expert ids in tiles of 2048 (8 per thread,
//                        one cub::BlockScan per tile) and writes, for each pair routed to it, its position among
//                        that expert's pairs in (token, slot) order, plus the expert's count. The ids (8 bytes per
//                        pair) stay in L2, so E blocks re-reading them costs little next to the row copies.
//   finalize_kernel      every block scans the E counts (clamped to capacity, rounded up to pad_multiple) into
//                        offsets in shared memory and maps each pair to offsets[e] + position (or -1 if dropped);
//                        block 0 also writes kept/padded/offsets/totals.
// Row kernels (one block per token; 16-byte vector loads/stores when H allows; fp32 accumulation):
//   permute_rows_kernel  reads the token's row once and writes it to its k destination rows (optionally scaled)
//   combine_rows_kernel  out[t] = sum_j w[t,j] * rows[row_map[t,j]]
//   unpermute_bwd_kernel grad_permuted[row] = w * grad_out[t] and grad_w = <row, grad_out[t]> (block reduction)
// A token owns its destination rows, so no atomics are needed and results are deterministic.
//
// Header note: the CPU torch wheel ships no generated cuda_cmake_macros.h (compile with
// -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE there) and ATen/cuda/CUDAContext.h needs cuBLAS/cuSPARSE headers, so only
// c10/cuda headers are used.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace megamoe {
namespace {

constexpr int kRankThreads = 256;
constexpr int kRankItems = 8;
constexpr int kRankTile = kRankThreads * kRankItems;
constexpr int kFinThreads = 256;
constexpr int64_t kMaxExperts = 2048;  // offsets live in shared memory: 2 * 8 bytes per expert (32 KB, under 48 KB)

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__global__ void expert_rank_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t E, int64_t* __restrict__ pos,
                                   int64_t* __restrict__ count, int64_t* __restrict__ invalid) {
  using Scan = cub::BlockScan<int, kRankThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t e = blockIdx.x;
  int64_t running = 0;
  int bad = 0;
  for (int64_t base = 0; base < n; base += kRankTile) {
    const int64_t start = base + static_cast<int64_t>(threadIdx.x) * kRankItems;
    int64_t v[kRankItems];
    int local = 0;
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      const int64_t p = start + i;
      v[i] = p < n ? idx[p] : -1;
      local += (v[i] == e);
      if (e == 0 && p < n && (v[i] < 0 || v[i] >= E)) ++bad;
    }
    int prefix = 0, total = 0;
    Scan(tmp).ExclusiveSum(local, prefix, total);
    __syncthreads();  // tmp is reused by the next tile
    int r = 0;
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      if (v[i] == e) {
        pos[start + i] = running + prefix + r;
        ++r;
      }
    }
    running += total;
  }
  if (threadIdx.x == 0) count[e] = running;
  if (bad) atomicAdd(reinterpret_cast<unsigned long long*>(invalid), static_cast<unsigned long long>(bad));
}

__global__ void finalize_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ pos,
                                const int64_t* __restrict__ count, int64_t n, int64_t E, int64_t capacity,
                                int64_t pad, int64_t* __restrict__ row_map, int64_t* __restrict__ kept,
                                int64_t* __restrict__ padded, int64_t* __restrict__ offsets,
                                int64_t* __restrict__ totals) {
  using Scan = cub::BlockScan<int64_t, kFinThreads>;
  __shared__ typename Scan::TempStorage tmp;
  extern __shared__ int64_t smem[];
  int64_t* s_off = smem;          // [E]
  int64_t* s_kept = smem + E;     // [E]
  int64_t running = 0, running_kept = 0;
  for (int64_t b = 0; b < E; b += kFinThreads) {
    const int64_t e = b + threadIdx.x;
    const int64_t c = e < E ? count[e] : 0;
    const int64_t k = capacity < 0 ? c : (c < capacity ? c : capacity);
    const int64_t p = (k + pad - 1) / pad * pad;
    int64_t excl = 0, agg = 0, kexcl = 0, kagg = 0;
    Scan(tmp).ExclusiveSum(p, excl, agg);
    __syncthreads();
    Scan(tmp).ExclusiveSum(k, kexcl, kagg);
    __syncthreads();
    if (e < E) {
      s_off[e] = running + excl;
      s_kept[e] = k;
      if (blockIdx.x == 0) {
        kept[e] = k;
        padded[e] = p;
        offsets[e] = running + excl;
      }
    }
    running += agg;
    running_kept += kagg;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    offsets[E] = running;
    totals[0] = running;
    totals[1] = running_kept;
  }
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx[i];
    if (e < 0 || e >= E) {
      row_map[i] = -1;  // reported through totals[2]; the caller raises
      continue;
    }
    const int64_t p = pos[i];
    row_map[i] = p < s_kept[e] ? s_off[e] + p : -1;
  }
}

template <typename scalar_t, int VEC, bool WEIGHTED>
__global__ void permute_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ row_map,
                                    const acc_t<scalar_t>* __restrict__ w, scalar_t* __restrict__ dst, int64_t k,
                                    int64_t H) {
  using P = Pack<scalar_t, VEC>;
  using acc = acc_t<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t HV = H / VEC;
  const P* s = reinterpret_cast<const P*>(src + t * H);
  for (int64_t h = threadIdx.x; h < HV; h += blockDim.x) {
    const P v = s[h];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_map[t * k + j];
      if (r < 0) continue;
      P o = v;
      if (WEIGHTED) {
        const acc wt = w[t * k + j];
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(wt * static_cast<acc>(v.v[i]));
      }
      reinterpret_cast<P*>(dst + r * H)[h] = o;
    }
  }
}

template <typename scalar_t, int VEC, bool WEIGHTED>
__global__ void combine_rows_kernel(const scalar_t* __restrict__ rows, const int64_t* __restrict__ row_map,
                                    const acc_t<scalar_t>* __restrict__ w, scalar_t* __restrict__ out, int64_t k,
                                    int64_t H) {
  using P = Pack<scalar_t, VEC>;
  using acc = acc_t<scalar_t>;
  const int64_t t = blockIdx.x;
  const int64_t HV = H / VEC;
  for (int64_t h = threadIdx.x; h < HV; h += blockDim.x) {
    acc a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_map[t * k + j];
      if (r < 0) continue;
      const acc wt = WEIGHTED ? w[t * k + j] : acc(1);
      const P v = reinterpret_cast<const P*>(rows + r * H)[h];
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += wt * static_cast<acc>(v.v[i]);
    }
    P o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(a[i]);
    reinterpret_cast<P*>(out + t * H)[h] = o;
  }
}

template <typename scalar_t, int VEC, int THREADS>
__global__ void unpermute_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ perm,
                                     const int64_t* __restrict__ row_map, const acc_t<scalar_t>* __restrict__ w,
                                     scalar_t* __restrict__ grad_perm, acc_t<scalar_t>* __restrict__ grad_w,
                                     int64_t k, int64_t H) {
  using P = Pack<scalar_t, VEC>;
  using acc = acc_t<scalar_t>;
  using Reduce = cub::BlockReduce<acc, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t t = blockIdx.x;
  const int64_t HV = H / VEC;
  const P* g = reinterpret_cast<const P*>(grad + t * H);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t r = row_map[t * k + j];  // same for the whole block: uniform branch
    if (r < 0) {
      if (threadIdx.x == 0) grad_w[t * k + j] = acc(0);
      continue;
    }
    const acc wt = w[t * k + j];
    const P* s = reinterpret_cast<const P*>(perm + r * H);
    P* d = reinterpret_cast<P*>(grad_perm + r * H);
    acc dot = 0;
    for (int64_t h = threadIdx.x; h < HV; h += THREADS) {
      const P gv = g[h];
      const P sv = s[h];
      P o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc gi = static_cast<acc>(gv.v[i]);
        o.v[i] = static_cast<scalar_t>(wt * gi);
        dot += static_cast<acc>(sv.v[i]) * gi;
      }
      d[h] = o;
    }
    const acc total = Reduce(tmp).Sum(dot);
    if (threadIdx.x == 0) grad_w[t * k + j] = total;
    __syncthreads();  // tmp is reused for the next slot
  }
}

// 16-byte vectors when H is a multiple of the vector width and every row pointer is aligned, else scalars.
template <typename scalar_t>
bool use_vectors(int64_t H, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / static_cast<int>(sizeof(scalar_t));
  bool ok = H % vec == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok;
}

int threads_for(int64_t HV) {
  int64_t t = (HV + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, t)));
}

#define MEGAMOE_VEC_SWITCH(FULL, ...)                                        \
  if (FULL) {                                                                \
    constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));             \
    __VA_ARGS__;                                                             \
  } else {                                                                   \
    constexpr int VEC = 1;                                                   \
    __VA_ARGS__;                                                             \
  }

void check_cuda(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", what, " must be a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_map_cuda(
    const at::Tensor& indices, int64_t num_experts, int64_t capacity, int64_t pad_multiple) {
  check_cuda(indices, "indices", "row_map");
  TORCH_CHECK_VALUE(indices.dim() == 2, "row_map: indices must be [T, k], got shape ", indices.sizes());
  TORCH_CHECK_VALUE(num_experts > 0 && num_experts <= kMaxExperts, "row_map: num_experts must be in [1, ",
                    kMaxExperts, "] on CUDA, got ", num_experts);
  TORCH_CHECK_VALUE(pad_multiple >= 1, "row_map: pad_multiple must be >= 1, got ", pad_multiple);
  c10::cuda::CUDAGuard guard(indices.device());
  const auto idx = indices.to(at::kLong).contiguous();
  const int64_t n = idx.numel(), E = num_experts;
  auto opts = idx.options();
  auto pos = at::empty({n}, opts);
  auto count = at::empty({E}, opts);
  auto kept = at::empty({E}, opts), padded = at::empty({E}, opts), offsets = at::empty({E + 1}, opts);
  auto totals = at::zeros({3}, opts);  // num_rows, num_kept, number of out-of-range expert ids
  auto row_map = at::empty(idx.sizes(), opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  expert_rank_kernel<<<static_cast<unsigned>(E), kRankThreads, 0, stream>>>(
      idx.data_ptr<int64_t>(), n, E, pos.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
      totals.data_ptr<int64_t>() + 2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kFinThreads - 1) / kFinThreads, 1024));
  finalize_kernel<<<static_cast<unsigned>(blocks), kFinThreads, 2 * E * sizeof(int64_t), stream>>>(
      idx.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), count.data_ptr<int64_t>(), n, E, capacity, pad_multiple,
      row_map.data_ptr<int64_t>(), kept.data_ptr<int64_t>(), padded.data_ptr<int64_t>(),
      offsets.data_ptr<int64_t>(), totals.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_map, kept, padded, offsets, totals};
}

at::Tensor permute_rows_cuda(const at::Tensor& src_in, const at::Tensor& row_map_in,
                             const c10::optional<at::Tensor>& weights, int64_t num_rows, bool zero_fill) {
  check_cuda(src_in, "src", "permute_rows");
  TORCH_CHECK_VALUE(src_in.dim() == 2 && row_map_in.dim() == 2 && row_map_in.size(0) == src_in.size(0),
                    "permute_rows: src [T, H] and row_map [T, k] must agree on T, got ", src_in.sizes(), " and ",
                    row_map_in.sizes());
  c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t T = src.size(0), H = src.size(1), k = row_map.size(1);
  auto out = zero_fill ? at::zeros({num_rows, H}, src.options()) : at::empty({num_rows, H}, src.options());
  if (T == 0 || H == 0 || num_rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "permute_rows_cuda", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor w;
    if (weights.has_value()) w = weights->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const bool full = use_vectors<scalar_t>(H, {src.data_ptr(), out.data_ptr()});
    MEGAMOE_VEC_SWITCH(full, {
      {
        const int threads = threads_for(H / VEC);
        if (w.defined())
          permute_rows_kernel<scalar_t, VEC, true><<<static_cast<unsigned>(T), threads, 0, stream>>>(
              src.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), w.data_ptr<acc>(), out.data_ptr<scalar_t>(),
              k, H);
        else
          permute_rows_kernel<scalar_t, VEC, false><<<static_cast<unsigned>(T), threads, 0, stream>>>(
              src.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), nullptr, out.data_ptr<scalar_t>(), k, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

at::Tensor combine_rows_cuda(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                             const c10::optional<at::Tensor>& weights) {
  check_cuda(rows_in, "rows", "combine_rows");
  TORCH_CHECK_VALUE(rows_in.dim() == 2 && row_map_in.dim() == 2, "combine_rows: rows must be [N, H] and row_map "
                    "[T, k], got ", rows_in.sizes(), " and ", row_map_in.sizes());
  c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t H = rows.size(1), T = row_map.size(0), k = row_map.size(1);
  auto out = at::empty({T, H}, rows.options());
  if (T == 0 || H == 0) return out;
  if (rows.size(0) == 0 || k == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "combine_rows_cuda", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor w;
    if (weights.has_value()) w = weights->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const bool full = use_vectors<scalar_t>(H, {rows.data_ptr(), out.data_ptr()});
    MEGAMOE_VEC_SWITCH(full, {
      {
        const int threads = threads_for(H / VEC);
        if (w.defined())
          combine_rows_kernel<scalar_t, VEC, true><<<static_cast<unsigned>(T), threads, 0, stream>>>(
              rows.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), w.data_ptr<acc>(), out.data_ptr<scalar_t>(),
              k, H);
        else
          combine_rows_kernel<scalar_t, VEC, false><<<static_cast<unsigned>(T), threads, 0, stream>>>(
              rows.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), nullptr, out.data_ptr<scalar_t>(), k, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_in, const at::Tensor& perm_in,
                                                           const at::Tensor& row_map_in, const at::Tensor& weights) {
  check_cuda(perm_in, "permuted", "unpermute_backward");
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && perm_in.dim() == 2 && grad_in.size(1) == perm_in.size(1) &&
                    row_map_in.dim() == 2 && row_map_in.size(0) == grad_in.size(0),
                    "unpermute_backward: grad_out [T, H], permuted [N, H], row_map [T, k] disagree: ",
                    grad_in.sizes(), ", ", perm_in.sizes(), ", ", row_map_in.sizes());
  c10::cuda::CUDAGuard guard(perm_in.device());
  const auto g = grad_in.to(perm_in.scalar_type()).contiguous();
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t N = perm.size(0), H = perm.size(1), T = row_map.size(0), k = row_map.size(1);
  const auto acc_type = perm.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w = weights.to(acc_type).contiguous();
  // rows no pair maps to (padding) must read zero; which ones is not known here without a sync
  auto grad_perm = at::zeros({N, H}, perm.options());
  auto grad_w = at::zeros({T, k}, w.options());
  if (T == 0 || k == 0 || N == 0 || H == 0) return {grad_perm, grad_w.to(weights.scalar_type())};
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, perm.scalar_type(), "unpermute_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const bool full = use_vectors<scalar_t>(H, {g.data_ptr(), perm.data_ptr(), grad_perm.data_ptr()});
    MEGAMOE_VEC_SWITCH(full, {
      {
        unpermute_bwd_kernel<scalar_t, VEC, kThreads><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), perm.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), w.data_ptr<acc>(),
            grad_perm.data_ptr<scalar_t>(), grad_w.data_ptr<acc>(), k, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {grad_perm, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(megamoe, CUDA, m) {
  m.impl("row_map", &row_map_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
  m.impl("combine_rows", &combine_rows_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace megamoe
