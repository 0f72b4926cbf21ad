// Torch bindings of the packing extension `mpo_fast._C`.
//
// Ops (namespace mpo_fast, dispatched by device; Meta kernels make them traceable by
// torch.compile / FakeTensor; autograd for pack/unpack is registered in mpo_fast/packing.py):
//   seq_index(lengths, T, total)              -> (cu_seqlens int32 [S+1], position_ids int64 [total])
//   pack(padded [S,T,*], cu_seqlens, total)   -> [total, *]
//   unpack(values [N,*], cu_seqlens, T)       -> [S, T, *], zeros in the padding
//   pack_into / unpack_into                    the same, writing into a caller's buffer
//   shift_targets(tokens, cu_seqlens, completion_mask, ignore_index) -> int64 [N]
// Python functions (pybind11): plan(pair_tokens, max_tokens), has_cuda().
//
// Argument errors raise ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE). On the
// CPU cu_seqlens is fully validated (O(S), no device sync); on CUDA it is not (that would need a
// sync) and the kernels clamp instead, so bad offsets give wrong values but stay in bounds.
#include <torch/extension.h>

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "pack_cpu.h"
#include "planner.h"

#ifdef MPO_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "pack_kernels.h"
#endif

namespace mpo_fast {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

#ifdef MPO_FAST_WITH_CUDA
void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mpo_fast.", what, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}
#endif

[[noreturn]] void no_kernel(const char* what, const at::Tensor& t) {
  TORCH_CHECK(false, "mpo_fast.", what, ": no kernel for device ", t.device(),
              " (the extension was built without CUDA); use the torch fallback");
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name, const char* what) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "mpo_fast.", what, ": ", b_name, " is on ",
                    b.device(), " but ", a_name, " is on ", a.device());
}

// cu_seqlens: int32 [S+1]. On the CPU also its values: cu[0] = 0, steps in [0, T], cu[S] = N.
// T < 0 skips the step bound, N < 0 skips the total check.
at::Tensor checked_cu(const at::Tensor& cu, const at::Tensor& other, const char* other_name,
                      const char* what, int64_t T, int64_t N) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "mpo_fast.", what,
                   ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "mpo_fast.", what,
                    ": cu_seqlens must be 1-D with S+1 >= 1 entries, got shape ", cu.sizes());
  check_same_device(other, other_name, cu, "cu_seqlens", what);
  at::Tensor c = cu.contiguous();
  if (c.is_cpu()) {
    const int32_t* p = c.const_data_ptr<int32_t>();
    const int64_t S = c.size(0) - 1;
    TORCH_CHECK_VALUE(p[0] == 0, "mpo_fast.", what, ": cu_seqlens[0] must be 0, got ", p[0]);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t len = static_cast<int64_t>(p[s + 1]) - p[s];
      TORCH_CHECK_VALUE(len >= 0 && (T < 0 || len <= T), "mpo_fast.", what,
                        ": cu_seqlens must step by 0..T=", T, ", but sequence ", s, " has ",
                        len, " tokens");
    }
    TORCH_CHECK_VALUE(N < 0 || p[S] == N, "mpo_fast.", what, ": cu_seqlens[-1] = ", p[S],
                      " but there are ", N, " packed tokens");
  }
  return c;
}

int64_t row_bytes_of(const at::Tensor& t, int64_t lead_dims) {
  int64_t row = t.element_size();
  for (int64_t d = lead_dims; d < t.dim(); ++d) row *= t.size(d);
  return row;
}

// ---------------------------------------------------------------- seq_index
std::tuple<at::Tensor, at::Tensor> seq_index(const at::Tensor& lengths, int64_t T,
                                             int64_t total) {
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong,
                   "mpo_fast.seq_index: lengths must be int32 or int64, got ",
                   lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1, "mpo_fast.seq_index: lengths must be 1-D, got shape ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(T >= 0 && total >= 0 && total <= kInt32Max,
                    "mpo_fast.seq_index: need T >= 0 and 0 <= total < 2^31, got T=", T,
                    ", total=", total);
  const at::Tensor len = lengths.contiguous();
  const int64_t S = len.size(0);
  const bool is64 = len.scalar_type() == at::kLong;
  at::Tensor cu = at::empty({S + 1}, len.options().dtype(at::kInt));
  at::Tensor pos = at::empty({total}, len.options().dtype(at::kLong));
  if (len.is_cpu()) {
    cpu::seq_index(len.const_data_ptr(), is64, S, T, total, cu.mutable_data_ptr<int32_t>(),
                   pos.mutable_data_ptr<int64_t>());
    TORCH_CHECK_VALUE(cu.const_data_ptr<int32_t>()[S] == total,
                      "mpo_fast.seq_index: total=", total, " but the lengths (clamped to [0, ",
                      T, "]) sum to ", cu.const_data_ptr<int32_t>()[S]);
    return {cu, pos};
  }
#ifdef MPO_FAST_WITH_CUDA
  if (len.is_cuda()) {
    const c10::cuda::CUDAGuard guard(len.device());
    check_launch(cuda::launch_seq_index(len.const_data_ptr(), is64, S, T, total,
                                        cu.mutable_data_ptr<int32_t>(),
                                        pos.mutable_data_ptr<int64_t>(),
                                        c10::cuda::getCurrentCUDAStream()),
                 "seq_index");
    return {cu, pos};
  }
#endif
  no_kernel("seq_index", len);
}

std::tuple<at::Tensor, at::Tensor> seq_index_meta(const at::Tensor& lengths, c10::SymInt T,
                                                  c10::SymInt total) {
  (void)T;
  return {at::empty_symint({lengths.sym_size(0) + 1}, lengths.options().dtype(at::kInt)),
          at::empty_symint({std::move(total)}, lengths.options().dtype(at::kLong))};
}

// ---------------------------------------------------------------- pack / unpack
void run_pack(const at::Tensor& padded, const at::Tensor& cu, at::Tensor& out, int64_t total) {
  const int64_t S = padded.size(0);
  const int64_t T = padded.size(1);
  const int64_t row = row_bytes_of(padded, 2);
  if (padded.is_cpu()) {
    cpu::pack(padded.const_data_ptr(), out.mutable_data_ptr(), cu.const_data_ptr<int32_t>(), S,
              T, total, row);
    return;
  }
#ifdef MPO_FAST_WITH_CUDA
  if (padded.is_cuda()) {
    const c10::cuda::CUDAGuard guard(padded.device());
    check_launch(cuda::launch_pack(padded.const_data_ptr(), out.mutable_data_ptr(),
                                   cu.const_data_ptr<int32_t>(), S, T, total, row,
                                   c10::cuda::getCurrentCUDAStream()),
                 "pack");
    return;
  }
#endif
  no_kernel("pack", padded);
}

void run_unpack(const at::Tensor& values, const at::Tensor& cu, at::Tensor& out) {
  const int64_t S = out.size(0);
  const int64_t T = out.size(1);
  const int64_t row = row_bytes_of(out, 2);
  const int64_t total = values.size(0);
  if (values.is_cpu()) {
    cpu::unpack(values.const_data_ptr(), out.mutable_data_ptr(), cu.const_data_ptr<int32_t>(),
                S, T, total, row);
    return;
  }
#ifdef MPO_FAST_WITH_CUDA
  if (values.is_cuda()) {
    const c10::cuda::CUDAGuard guard(values.device());
    check_launch(cuda::launch_unpack(values.const_data_ptr(), out.mutable_data_ptr(),
                                     cu.const_data_ptr<int32_t>(), S, T, total, row,
                                     c10::cuda::getCurrentCUDAStream()),
                 "unpack");
    return;
  }
#endif
  no_kernel("unpack", values);
}

void check_padded(const at::Tensor& padded, const char* what) {
  TORCH_CHECK_VALUE(padded.dim() >= 2, "mpo_fast.", what,
                    ": padded must be [S, T, ...] (at least 2-D), got shape ", padded.sizes());
}

at::Tensor pack(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total) {
  check_padded(padded, "pack");
  TORCH_CHECK_VALUE(total >= 0 && total <= kInt32Max,
                    "mpo_fast.pack: total must be in [0, 2^31), got ", total);
  const at::Tensor cu = checked_cu(cu_seqlens, padded, "padded", "pack", padded.size(1), total);
  TORCH_CHECK_VALUE(cu.size(0) == padded.size(0) + 1, "mpo_fast.pack: cu_seqlens has ",
                    cu.size(0), " entries but padded has S=", padded.size(0), " sequences");
  const at::Tensor x = padded.contiguous();
  std::vector<int64_t> sizes{total};
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  at::Tensor out = at::empty(sizes, x.options());
  run_pack(x, cu, out, total);
  return out;
}

at::Tensor pack_meta(const at::Tensor& padded, const at::Tensor& cu_seqlens, c10::SymInt total) {
  (void)cu_seqlens;
  check_padded(padded, "pack");
  std::vector<c10::SymInt> sizes{std::move(total)};
  for (int64_t d = 2; d < padded.dim(); ++d) sizes.push_back(padded.sym_size(d));
  return at::empty_symint(sizes, padded.options());
}

at::Tensor unpack(const at::Tensor& values, const at::Tensor& cu_seqlens, int64_t T) {
  TORCH_CHECK_VALUE(values.dim() >= 1, "mpo_fast.unpack: values must be [N, ...], got a 0-d "
                    "tensor");
  TORCH_CHECK_VALUE(T >= 0, "mpo_fast.unpack: T must be >= 0, got ", T);
  const at::Tensor cu = checked_cu(cu_seqlens, values, "values", "unpack", T, values.size(0));
  const at::Tensor v = values.contiguous();
  std::vector<int64_t> sizes{cu.size(0) - 1, T};
  for (int64_t d = 1; d < v.dim(); ++d) sizes.push_back(v.size(d));
  at::Tensor out = at::empty(sizes, v.options());
  run_unpack(v, cu, out);
  return out;
}

at::Tensor unpack_meta(const at::Tensor& values, const at::Tensor& cu_seqlens, c10::SymInt T) {
  std::vector<c10::SymInt> sizes{cu_seqlens.sym_size(0) - 1, std::move(T)};
  for (int64_t d = 1; d < values.dim(); ++d) sizes.push_back(values.sym_size(d));
  return at::empty_symint(sizes, values.options());
}

void check_out(const at::Tensor& out, at::IntArrayRef expected, const at::Tensor& src,
               const char* what) {
  TORCH_CHECK_VALUE(out.sizes() == expected, "mpo_fast.", what, ": out must have shape ",
                    expected, ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == src.scalar_type(), "mpo_fast.", what,
                   ": out must have dtype ", src.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == src.device(), "mpo_fast.", what, ": out is on ",
                    out.device(), " but the input is on ", src.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "mpo_fast.", what, ": out must be contiguous");
}

void pack_into(const at::Tensor& padded, const at::Tensor& cu_seqlens, at::Tensor out) {
  check_padded(padded, "pack_into");
  TORCH_CHECK_VALUE(out.dim() >= 1, "mpo_fast.pack_into: out must be [N, ...]");
  const int64_t total = out.size(0);
  const at::Tensor cu =
      checked_cu(cu_seqlens, padded, "padded", "pack_into", padded.size(1), total);
  TORCH_CHECK_VALUE(cu.size(0) == padded.size(0) + 1, "mpo_fast.pack_into: cu_seqlens has ",
                    cu.size(0), " entries but padded has S=", padded.size(0), " sequences");
  const at::Tensor x = padded.contiguous();
  std::vector<int64_t> sizes{total};
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  check_out(out, sizes, x, "pack_into");
  run_pack(x, cu, out, total);
}

void unpack_into(const at::Tensor& values, const at::Tensor& cu_seqlens, at::Tensor out) {
  TORCH_CHECK_VALUE(values.dim() >= 1 && out.dim() >= 2,
                    "mpo_fast.unpack_into: values must be [N, ...] and out [S, T, ...]");
  const int64_t T = out.size(1);
  const at::Tensor cu =
      checked_cu(cu_seqlens, values, "values", "unpack_into", T, values.size(0));
  const at::Tensor v = values.contiguous();
  std::vector<int64_t> sizes{cu.size(0) - 1, T};
  for (int64_t d = 1; d < v.dim(); ++d) sizes.push_back(v.size(d));
  check_out(out, sizes, v, "unpack_into");
  run_unpack(v, cu, out);
}

void into_meta(const at::Tensor&, const at::Tensor&, at::Tensor) {}

// ---------------------------------------------------------------- shift_targets
at::Tensor shift_targets(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                         const at::Tensor& completion_mask, int64_t ignore_index) {
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong,
                   "mpo_fast.shift_targets: tokens must be int32 or int64, got ",
                   tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 1, "mpo_fast.shift_targets: tokens must be 1-D [N], got ",
                    tokens.sizes());
  TORCH_CHECK_TYPE(completion_mask.scalar_type() == at::kBool,
                   "mpo_fast.shift_targets: completion_mask must be bool, got ",
                   completion_mask.scalar_type());
  TORCH_CHECK_VALUE(completion_mask.sizes() == tokens.sizes(),
                    "mpo_fast.shift_targets: completion_mask must have shape ", tokens.sizes(),
                    ", got ", completion_mask.sizes());
  check_same_device(tokens, "tokens", completion_mask, "completion_mask", "shift_targets");
  const int64_t N = tokens.size(0);
  const at::Tensor cu = checked_cu(cu_seqlens, tokens, "tokens", "shift_targets", -1, N);
  const at::Tensor tok = tokens.contiguous();
  const at::Tensor mask = completion_mask.contiguous();
  const int64_t S = cu.size(0) - 1;
  const bool is64 = tok.scalar_type() == at::kLong;
  at::Tensor out = at::empty({N}, tok.options().dtype(at::kLong));
  if (tok.is_cpu()) {
    cpu::shift_targets(tok.const_data_ptr(), is64, mask.const_data_ptr<bool>(),
                       cu.const_data_ptr<int32_t>(), S, N, ignore_index,
                       out.mutable_data_ptr<int64_t>());
    return out;
  }
#ifdef MPO_FAST_WITH_CUDA
  if (tok.is_cuda()) {
    const c10::cuda::CUDAGuard guard(tok.device());
    check_launch(cuda::launch_shift_targets(tok.const_data_ptr(), is64,
                                            mask.const_data_ptr<bool>(),
                                            cu.const_data_ptr<int32_t>(), S, N, ignore_index,
                                            out.mutable_data_ptr<int64_t>(),
                                            c10::cuda::getCurrentCUDAStream()),
                 "shift_targets");
    return out;
  }
#endif
  no_kernel("shift_targets", tok);
}

at::Tensor shift_targets_meta(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                              const at::Tensor& completion_mask, int64_t ignore_index) {
  (void)cu_seqlens;
  (void)completion_mask;
  (void)ignore_index;
  return at::empty_symint(tokens.sym_sizes(), tokens.options().dtype(at::kLong));
}

// ---------------------------------------------------------------- planner (pybind11)
std::vector<std::vector<int64_t>> plan(const at::Tensor& pair_tokens, int64_t max_tokens) {
  TORCH_CHECK_TYPE(pair_tokens.scalar_type() == at::kLong,
                   "mpo_fast.plan: pair_tokens must be int64, got ", pair_tokens.scalar_type());
  TORCH_CHECK_VALUE(pair_tokens.dim() == 1 && pair_tokens.is_cpu(),
                    "mpo_fast.plan: pair_tokens must be a 1-D CPU tensor");
  const at::Tensor sizes = pair_tokens.contiguous();
  pybind11::gil_scoped_release no_gil;
  return plan_pairs(sizes.const_data_ptr<int64_t>(), sizes.size(0), max_tokens);
}

}  // namespace
}  // namespace mpo_fast

TORCH_LIBRARY(mpo_fast, m) {
  m.def("seq_index(Tensor lengths, SymInt T, SymInt total) -> (Tensor, Tensor)");
  m.def("pack(Tensor padded, Tensor cu_seqlens, SymInt total) -> Tensor");
  m.def("unpack(Tensor values, Tensor cu_seqlens, SymInt T) -> Tensor");
  m.def("pack_into(Tensor padded, Tensor cu_seqlens, Tensor(a!) out) -> ()");
  m.def("unpack_into(Tensor values, Tensor cu_seqlens, Tensor(a!) out) -> ()");
  m.def("shift_targets(Tensor tokens, Tensor cu_seqlens, Tensor completion_mask, "
        "int ignore_index) -> Tensor");
}

#define MPO_FAST_REGISTER_KERNELS(m)                   \
  m.impl("seq_index", &mpo_fast::seq_index);           \
  m.impl("pack", &mpo_fast::pack);                     \
  m.impl("unpack", &mpo_fast::unpack);                 \
  m.impl("pack_into", &mpo_fast::pack_into);           \
  m.impl("unpack_into", &mpo_fast::unpack_into);       \
  m.impl("shift_targets", &mpo_fast::shift_targets);

TORCH_LIBRARY_IMPL(mpo_fast, CPU, m) { MPO_FAST_REGISTER_KERNELS(m) }

#ifdef MPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mpo_fast, CUDA, m) { MPO_FAST_REGISTER_KERNELS(m) }
#endif

TORCH_LIBRARY_IMPL(mpo_fast, Meta, m) {
  m.impl("seq_index", &mpo_fast::seq_index_meta);
  m.impl("pack", &mpo_fast::pack_meta);
  m.impl("unpack", &mpo_fast::unpack_meta);
  m.impl("pack_into", &mpo_fast::into_meta);
  m.impl("unpack_into", &mpo_fast::into_meta);
  m.impl("shift_targets", &mpo_fast::shift_targets_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mpo-fast sequence-packing extension (ops live in torch.ops.mpo_fast)";
  m.def("plan", &mpo_fast::plan, "best-fit-decreasing pair planner (see planner.h)");
  m.def("has_cuda", [] {
#ifdef MPO_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
