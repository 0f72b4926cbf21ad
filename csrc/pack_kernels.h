// Launchers for the CUDA packing kernels (pack_kernels.cu).
//
// Plain C++ interface: raw pointers, sizes and a cudaStream_t. No torch header is included
// here or in pack_kernels.cu, so `nvcc -c pack_kernels.cu` compile-checks on any machine.
// Each launcher returns the cudaError_t of its launch (cudaSuccess when there was nothing to do).
//
// Layout shared by every kernel (S sequences, padded length T, N packed tokens):
//   padded  [S, T, row]   sequence s, token t at byte offset (s*T + t) * row_bytes
//   packed  [N, row]      sequence s occupies rows [cu[s], cu[s+1])
//   cu      int32 [S+1]   cumulative lengths, cu[0] = 0, cu[S] = N
// Robustness: the kernels clamp every sequence to [0, T] tokens and never read or write past
// N packed rows, so malformed cu_seqlens give wrong values, never an illegal memory access.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mpo_fast {
namespace cuda {

// cu[0] = 0, cu[s+1] = cu[s] + clamp(lengths[s], 0, T); positions[cu[s] + i] = i for i < len.
// `lengths` is int32 (lengths_is_int64 = false) or int64. Writes to positions stop at `total`.
cudaError_t launch_seq_index(const void* lengths, bool lengths_is_int64, int64_t S, int64_t T,
                             int64_t total, int32_t* cu, int64_t* positions, cudaStream_t stream);

// packed[cu[s] + t] = padded[s, t] for t < len(s): row_bytes bytes per token.
cudaError_t launch_pack(const void* padded, void* packed, const int32_t* cu, int64_t S, int64_t T,
                        int64_t total, int64_t row_bytes, cudaStream_t stream);

// padded[s, t] = packed[cu[s] + t] for t < len(s), zero bytes for len(s) <= t < T.
cudaError_t launch_unpack(const void* packed, void* padded, const int32_t* cu, int64_t S,
                          int64_t T, int64_t total, int64_t row_bytes, cudaStream_t stream);

// targets[n] = tokens[n + 1] if n + 1 is in the same sequence as n and completion_mask[n + 1],
// else ignore_index. `tokens` is int32 or int64; targets is int64 [N].
cudaError_t launch_shift_targets(const void* tokens, bool tokens_is_int64,
                                 const bool* completion_mask, const int32_t* cu, int64_t S,
                                 int64_t N, int64_t ignore_index, int64_t* targets,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace mpo_fast
