// CPU packing kernels (pack_cpu.cpp): the same contract as the CUDA launchers in
// pack_kernels.h (layout, clamping), parallel over the CPU with at::parallel_for.
#pragma once

#include <cstdint>

namespace mpo_fast {
namespace cpu {

void seq_index(const void* lengths, bool lengths_is_int64, int64_t S, int64_t T, int64_t total,
               int32_t* cu, int64_t* positions);

void pack(const void* padded, void* packed, const int32_t* cu, int64_t S, int64_t T,
          int64_t total, int64_t row_bytes);

void unpack(const void* packed, void* padded, const int32_t* cu, int64_t S, int64_t T,
            int64_t total, int64_t row_bytes);

void shift_targets(const void* tokens, bool tokens_is_int64, const bool* completion_mask,
                   const int32_t* cu, int64_t S, int64_t N, int64_t ignore_index,
                   int64_t* targets);

}  // namespace cpu
}  // namespace mpo_fast
