// Token permute / unpermute for MoE: operator schemas and the C++ CPU implementation.
//
// The schemas below are the contract shared by every backend: this file registers the CPU kernels, and
// csrc/permute_cuda.cu (built as megamoe._C_cuda where torch has CUDA) registers CUDA kernels for the same ops.
// The plain-torch reference lives in megamoe/ops/permute.py and is what the tests compare against.
//
// Vocabulary (see megamoe/ops/permute.py):
//   indices  [T, k] int64   expert of each (token, slot) pair
//   row_map  [T, k] int64   row of each pair in the permuted (expert-major) buffer, -1 if dropped by capacity
//   permuted [N, H]         rows ordered by expert, then token index, then slot; each expert's block padded with
//                           zero rows up to a multiple of pad_multiple
//
// Ops (namespace megamoe):
//   row_map(indices, num_experts, capacity, pad_multiple) -> (row_map, kept [E], padded [E], offsets [E+1], totals [3])
//       capacity < 0 means "no capacity". totals = (N, number of kept pairs, number of out-of-range expert ids), one
//       small tensor so that a GPU caller needs a single device-to-host copy to learn the output size and to check
//       the input (a CUDA kernel cannot raise; the CPU kernel raises directly and reports 0).
//   permute_rows(src [T,H], row_map, weights?, num_rows, zero_fill) -> [N, H]
//       dst[row_map[t,j]] = (weights[t,j] *) src[t]; rows no pair maps to (padding) are zero. zero_fill tells a
//       backend that such rows exist (the CPU kernel finds them itself).
//   combine_rows(rows [N,H], row_map, weights?) -> [T, H]
//       out[t] = sum_j (weights[t,j] *) rows[row_map[t,j]] over kept slots, accumulated in fp32 (fp64 for double).
//       With weights = None this is also the backward of permute_rows.
//   unpermute_backward(grad_out [T,H], permuted [N,H], row_map, weights) -> (grad_permuted [N,H], grad_weights [T,k])
//       grad_permuted[row_map[t,j]] = weights[t,j] * grad_out[t] (zero on rows no pair maps to),
//       grad_weights[t,j] = <permuted[row_map[t,j]], grad_out[t]> (0 for dropped slots), fp32 accumulation.
//
// Every kernel is parallel over tokens: a token owns the rows its slots map to, so no two threads write the same
// row and the result is deterministic (no atomics, no dependence on the thread count).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace megamoe {

TORCH_LIBRARY(megamoe, m) {
  m.def("row_map(Tensor indices, int num_experts, int capacity, int pad_multiple) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("permute_rows(Tensor src, Tensor row_map, Tensor? weights, int num_rows, bool zero_fill) -> Tensor");
  m.def("combine_rows(Tensor rows, Tensor row_map, Tensor? weights) -> Tensor");
  m.def("unpermute_backward(Tensor grad_out, Tensor permuted, Tensor row_map, Tensor weights) -> (Tensor, Tensor)");
}

namespace {

// fp32 accumulation for the 16-bit types and float, fp64 for double.
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Rows per parallel task: enough work per task to amortise the scheduling (H elements per row).
int64_t grain_for(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

void check_row_map(const at::Tensor& row_map, int64_t T, const char* op) {
  TORCH_CHECK_VALUE(row_map.dim() == 2 && row_map.size(0) == T, op, ": row_map must be [T, k] with T = ", T,
              ", got shape ", row_map.sizes());
  TORCH_CHECK_VALUE(row_map.scalar_type() == at::kLong, op, ": row_map must be int64, got ", row_map.scalar_type());
}

void check_weights(const c10::optional<at::Tensor>& weights, const at::Tensor& row_map, const char* op) {
  if (!weights.has_value()) return;
  TORCH_CHECK_VALUE(weights->sizes() == row_map.sizes(), op, ": weights must have the shape of row_map ",
              row_map.sizes(), ", got ", weights->sizes());
  TORCH_CHECK_VALUE(weights->is_floating_point(), op, ": weights must be floating point, got ", weights->scalar_type());
}

// Marks the rows some kept pair maps to; checks every row index is in [-1, N).
std::vector<char> referenced_rows(const int64_t* rm, int64_t n, int64_t N, const char* op) {
  std::vector<char> used(static_cast<size_t>(N), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rm[i];
    TORCH_CHECK_VALUE(r >= -1 && r < N, op, ": row_map entry ", r, " out of range [-1, ", N, ")");
    if (r >= 0) used[r] = 1;
  }
  return used;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_map_cpu(
    const at::Tensor& indices, int64_t num_experts, int64_t capacity, int64_t pad_multiple) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "row_map: indices must be [T, k], got shape ", indices.sizes());
  TORCH_CHECK_VALUE(!indices.is_floating_point() && !indices.is_complex(), "row_map: indices must be integer, got ",
              indices.scalar_type());
  TORCH_CHECK_VALUE(num_experts > 0, "row_map: num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(pad_multiple >= 1, "row_map: pad_multiple must be >= 1, got ", pad_multiple);
  const auto idx = indices.to(at::kLong).contiguous();
  const int64_t n = idx.numel(), E = num_experts;
  const int64_t* ip = idx.data_ptr<int64_t>();
  auto opts = idx.options();
  auto kept = at::zeros({E}, opts), padded = at::empty({E}, opts), offsets = at::empty({E + 1}, opts);
  auto totals = at::zeros({3}, opts);
  auto row_map = at::empty(idx.sizes(), opts);
  int64_t *kp = kept.data_ptr<int64_t>(), *pp = padded.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
  int64_t* rp = row_map.data_ptr<int64_t>();
  // counting sort: histogram, clamp/pad, exclusive scan, then one stable pass (token, slot order)
  std::vector<int64_t> count(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = ip[i];
    TORCH_CHECK_VALUE(e >= 0 && e < E, "row_map: expert index ", e, " out of range [0, ", E, ")");
    ++count[e];
  }
  int64_t total = 0, total_kept = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t k = capacity < 0 ? count[e] : std::min(count[e], capacity);
    const int64_t p = (k + pad_multiple - 1) / pad_multiple * pad_multiple;
    kp[e] = k;
    pp[e] = p;
    op[e] = total;
    total += p;
    total_kept += k;
  }
  op[E] = total;
  std::vector<int64_t> cursor(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = ip[i];
    const int64_t pos = cursor[e]++;
    rp[i] = pos < kp[e] ? op[e] + pos : -1;
  }
  totals.data_ptr<int64_t>()[0] = total;
  totals.data_ptr<int64_t>()[1] = total_kept;
  return {row_map, kept, padded, offsets, totals};
}

at::Tensor permute_rows_cpu(const at::Tensor& src_in, const at::Tensor& row_map_in,
                            const c10::optional<at::Tensor>& weights_in, int64_t num_rows, bool /*zero_fill*/) {
  TORCH_CHECK_VALUE(src_in.dim() == 2, "permute_rows: src must be [T, H], got shape ", src_in.sizes());
  check_row_map(row_map_in, src_in.size(0), "permute_rows");
  check_weights(weights_in, row_map_in, "permute_rows");
  TORCH_CHECK_VALUE(num_rows >= 0, "permute_rows: num_rows must be >= 0, got ", num_rows);
  const auto src = src_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t T = src.size(0), H = src.size(1), k = row_map.size(1);
  auto out = at::empty({num_rows, H}, src.options());
  if (num_rows == 0) return out;
  const int64_t* rm = row_map.data_ptr<int64_t>();
  // inverse map: the (token, slot) pair each output row comes from, -1 for padding. Walking the output in row order
  // (rather than scattering from each token) gives each thread one contiguous range of the output to write, which
  // matters on CPU, where first-touch page faults of the fresh output dominate.
  std::vector<int64_t> inv(static_cast<size_t>(num_rows), -1);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t r = rm[i];
    TORCH_CHECK_VALUE(r >= -1 && r < num_rows, "permute_rows: row_map entry ", r, " out of range [-1, ", num_rows,
                      ")");
    TORCH_CHECK_VALUE(r < 0 || inv[r] < 0, "permute_rows: row ", r, " is the target of two (token, slot) pairs");
    if (r >= 0) inv[r] = i;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "permute_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor w;
    if (weights_in.has_value()) w = weights_in->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const acc* wp = w.defined() ? w.data_ptr<acc>() : nullptr;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = out.data_ptr<scalar_t>();
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(scalar_t));
    at::parallel_for(0, num_rows, grain_for(H), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* d = dp + r * H;
        const int64_t i = inv[r];
        if (i < 0) {
          std::memset(d, 0, row_bytes);
          continue;
        }
        const scalar_t* s = sp + (i / k) * H;
        if (wp == nullptr) {
          std::memcpy(d, s, row_bytes);
        } else {
          const acc wt = wp[i];
          for (int64_t h = 0; h < H; ++h) d[h] = static_cast<scalar_t>(wt * static_cast<acc>(s[h]));
        }
      }
    });
  });
  return out;
}

at::Tensor combine_rows_cpu(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                            const c10::optional<at::Tensor>& weights_in) {
  TORCH_CHECK_VALUE(rows_in.dim() == 2, "combine_rows: rows must be [N, H], got shape ", rows_in.sizes());
  TORCH_CHECK_VALUE(row_map_in.dim() == 2, "combine_rows: row_map must be [T, k], got shape ", row_map_in.sizes());
  check_row_map(row_map_in, row_map_in.size(0), "combine_rows");
  check_weights(weights_in, row_map_in, "combine_rows");
  const auto rows = rows_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t N = rows.size(0), H = rows.size(1), T = row_map.size(0), k = row_map.size(1);
  auto out = at::empty({T, H}, rows.options());
  if (T == 0 || H == 0) return out;
  const int64_t* rm = row_map.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK_VALUE(rm[i] >= -1 && rm[i] < N, "combine_rows: row_map entry ", rm[i], " out of range [-1, ", N, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "combine_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor w;
    if (weights_in.has_value()) w = weights_in->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    const acc* wp = w.defined() ? w.data_ptr<acc>() : nullptr;
    const scalar_t* sp = rows.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_for(H * k), [&](int64_t b, int64_t e) {
      std::vector<acc> buf(H);
      for (int64_t t = b; t < e; ++t) {
        std::fill(buf.begin(), buf.end(), acc(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = rm[t * k + j];
          if (r < 0) continue;
          const acc wt = wp ? static_cast<acc>(wp[t * k + j]) : acc(1);
          const scalar_t* s = sp + r * H;
          for (int64_t h = 0; h < H; ++h) buf[h] += wt * static_cast<acc>(s[h]);
        }
        scalar_t* d = op + t * H;
        for (int64_t h = 0; h < H; ++h) d[h] = static_cast<scalar_t>(buf[h]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_in, const at::Tensor& perm_in,
                                                          const at::Tensor& row_map_in, const at::Tensor& weights_in) {
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && perm_in.dim() == 2 && grad_in.size(1) == perm_in.size(1),
              "unpermute_backward: grad_out [T, H] and permuted [N, H] must agree on H, got ", grad_in.sizes(),
              " and ", perm_in.sizes());
  check_row_map(row_map_in, grad_in.size(0), "unpermute_backward");
  check_weights(weights_in, row_map_in, "unpermute_backward");
  const auto g = grad_in.to(perm_in.scalar_type()).contiguous();
  const auto perm = perm_in.contiguous();
  const auto row_map = row_map_in.contiguous();
  const int64_t N = perm.size(0), H = perm.size(1), T = row_map.size(0), k = row_map.size(1);
  auto grad_perm = at::empty({N, H}, perm.options());
  const auto acc_type = perm.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto w = weights_in.to(acc_type).contiguous();
  auto grad_w = at::zeros({T, k}, w.options());
  const int64_t* rm = row_map.data_ptr<int64_t>();
  const auto used = referenced_rows(rm, T * k, N, "unpermute_backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, perm.scalar_type(), "unpermute_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* wp = w.data_ptr<acc>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* pp = perm.data_ptr<scalar_t>();
    scalar_t* dp = grad_perm.data_ptr<scalar_t>();
    acc* gwp = grad_w.data_ptr<acc>();
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(scalar_t));
    at::parallel_for(0, N, grain_for(H), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        if (!used[r]) std::memset(dp + r * H, 0, row_bytes);
    });
    at::parallel_for(0, T, grain_for(H * k), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gt = gp + t * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = rm[t * k + j];
          if (r < 0) continue;
          const acc wt = wp[t * k + j];
          const scalar_t* s = pp + r * H;
          scalar_t* d = dp + r * H;
          acc dot = 0;
          for (int64_t h = 0; h < H; ++h) {
            const acc gv = static_cast<acc>(gt[h]);
            d[h] = static_cast<scalar_t>(wt * gv);
            dot += static_cast<acc>(s[h]) * gv;
          }
          gwp[t * k + j] = dot;
        }
      }
    });
  });
  return {grad_perm, grad_w.to(weights_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(megamoe, CPU, m) {
  m.impl("row_map", &row_map_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("combine_rows", &combine_rows_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace megamoe
