// CUDA kernels for sequence packing. No torch header: raw pointers and a cudaStream_t, so that
// `nvcc -c -std=c++17 pack_kernels.cu` compile-checks anywhere. See pack_kernels.h for the layout.
//
// pack/unpack are memory-bound copies. Every sequence is contiguous in both layouts (padded
// rows s*T .. s*T+len, packed rows cu[s] .. cu[s+1]), so each is a batch of S variable-size
// memcpys: grid.y walks the sequences, grid.x the 16/8/4/2/1-byte words of one sequence, and
// each thread moves ILP words with all loads issued before the stores.
#include <cuda_runtime.h>

#include <cstdint>

#include "pack_kernels.h"

namespace mpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxChunks = 1 << 16;

__device__ __forceinline__ int64_t seq_start(const int32_t* cu, int64_t s, int64_t total) {
  const int64_t start = cu[s];
  return start < 0 ? 0 : (start > total ? total : start);
}

// Tokens of sequence s, clamped to [0, T] and to the rows left before `total`.
__device__ __forceinline__ int64_t seq_len(const int32_t* cu, int64_t s, int64_t T,
                                           int64_t total) {
  const int64_t start = seq_start(cu, s, total);
  int64_t len = static_cast<int64_t>(cu[s + 1]) - static_cast<int64_t>(cu[s]);
  len = len < 0 ? 0 : (len > T ? T : len);
  return len > total - start ? total - start : len;
}

template <typename V>
__global__ void pack_kernel(const V* __restrict__ padded, V* __restrict__ packed,
                            const int32_t* __restrict__ cu, int64_t S, int64_t T, int64_t total,
                            int64_t row_words) {
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t n = seq_len(cu, s, T, total) * row_words;
    const V* src = padded + s * T * row_words;
    V* dst = packed + seq_start(cu, s, total) * row_words;
    const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kIlp;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kIlp + threadIdx.x;
         base < n; base += step) {
      V r[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = base + k * kThreads;
        if (i < n) r[k] = src[i];
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = base + k * kThreads;
        if (i < n) dst[i] = r[k];
      }
    }
  }
}

template <typename V>
__global__ void unpack_kernel(const V* __restrict__ packed, V* __restrict__ padded,
                              const int32_t* __restrict__ cu, int64_t S, int64_t T,
                              int64_t total, int64_t row_words) {
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t n = T * row_words;
    const int64_t n_copy = seq_len(cu, s, T, total) * row_words;
    const V* src = packed + seq_start(cu, s, total) * row_words;
    V* dst = padded + s * T * row_words;
    const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kIlp;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kIlp + threadIdx.x;
         base < n; base += step) {
      V r[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = base + k * kThreads;
        r[k] = (i < n_copy) ? src[i] : V{};
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = base + k * kThreads;
        if (i < n) dst[i] = r[k];
      }
    }
  }
}

// One block scans all S lengths (S is the number of sequences in a micro-batch: small).
template <typename L>
__global__ void cu_seqlens_kernel(const L* __restrict__ lengths, int64_t S, int64_t T,
                                  int32_t* __restrict__ cu) {
  __shared__ int64_t warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  if (threadIdx.x == 0) cu[0] = 0;
  int64_t carry = 0;
  for (int64_t base = 0; base < S; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    int64_t v = 0;
    if (i < S) {
      v = static_cast<int64_t>(lengths[i]);
      v = v < 0 ? 0 : (v > T ? T : v);
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += y;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      int64_t w = lane < n_warps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      if (lane < n_warps) warp_sums[lane] = w;
    }
    __syncthreads();
    if (warp > 0) v += warp_sums[warp - 1];
    if (i < S) cu[i + 1] = static_cast<int32_t>(carry + v);
    carry += warp_sums[n_warps - 1];
    __syncthreads();
  }
}

__global__ void positions_kernel(const int32_t* __restrict__ cu, int64_t S, int64_t T,
                                 int64_t total, int64_t* __restrict__ positions) {
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t len = seq_len(cu, s, T, total);
    int64_t* dst = positions + seq_start(cu, s, total);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      dst[i] = i;
    }
  }
}

// n is the last token of its sequence iff n + 1 is some cu[k], k >= 1 (binary search).
template <typename Tok>
__global__ void shift_targets_kernel(const Tok* __restrict__ tokens,
                                     const bool* __restrict__ mask,
                                     const int32_t* __restrict__ cu, int64_t S, int64_t N,
                                     int64_t ignore_index, int64_t* __restrict__ targets) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t next = n + 1;
    int64_t out = ignore_index;
    if (next < N) {
      int64_t lo = 1, hi = S + 1;  // first k in [1, S] with cu[k] >= next, else S + 1
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (static_cast<int64_t>(cu[mid]) < next) lo = mid + 1; else hi = mid;
      }
      const bool boundary = lo <= S && static_cast<int64_t>(cu[lo]) == next;
      if (!boundary && mask[next]) out = static_cast<int64_t>(tokens[next]);
    }
    targets[n] = out;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline dim3 seq_grid(int64_t words_per_seq, int64_t S, int64_t words_per_block) {
  int64_t chunks = ceil_div(words_per_seq, words_per_block);
  chunks = chunks < 1 ? 1 : (chunks > kMaxChunks ? kMaxChunks : chunks);
  const int64_t ys = S > kMaxGridY ? kMaxGridY : S;
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(ys), 1);
}

// Widest word (16, 8, 4, 2 or 1 bytes) that divides the row size and both base addresses.
inline int word_bytes(const void* a, const void* b, int64_t row_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                        static_cast<uint64_t>(row_bytes);
  for (int w = 16; w > 1; w >>= 1) {
    if (bits % w == 0) return w;
  }
  return 1;
}

template <typename V, bool kPack>
cudaError_t launch_copy(const void* src, void* dst, const int32_t* cu, int64_t S, int64_t T,
                        int64_t total, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(V));
  const dim3 grid = seq_grid(T * row_words, S, static_cast<int64_t>(kThreads) * kIlp);
  if (kPack) {
    pack_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<const V*>(src),
                                                  static_cast<V*>(dst), cu, S, T, total,
                                                  row_words);
  } else {
    unpack_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<const V*>(src),
                                                    static_cast<V*>(dst), cu, S, T, total,
                                                    row_words);
  }
  return cudaGetLastError();
}

template <bool kPack>
cudaError_t dispatch_copy(const void* src, void* dst, const int32_t* cu, int64_t S, int64_t T,
                          int64_t total, int64_t row_bytes, cudaStream_t stream) {
  switch (word_bytes(src, dst, row_bytes)) {
    case 16: return launch_copy<uint4, kPack>(src, dst, cu, S, T, total, row_bytes, stream);
    case 8: return launch_copy<uint2, kPack>(src, dst, cu, S, T, total, row_bytes, stream);
    case 4: return launch_copy<uint32_t, kPack>(src, dst, cu, S, T, total, row_bytes, stream);
    case 2: return launch_copy<uint16_t, kPack>(src, dst, cu, S, T, total, row_bytes, stream);
    default: return launch_copy<uint8_t, kPack>(src, dst, cu, S, T, total, row_bytes, stream);
  }
}

}  // namespace

cudaError_t launch_seq_index(const void* lengths, bool lengths_is_int64, int64_t S, int64_t T,
                             int64_t total, int32_t* cu, int64_t* positions,
                             cudaStream_t stream) {
  if (lengths_is_int64) {
    cu_seqlens_kernel<int64_t><<<1, 1024, 0, stream>>>(static_cast<const int64_t*>(lengths), S,
                                                       T, cu);
  } else {
    cu_seqlens_kernel<int32_t><<<1, 1024, 0, stream>>>(static_cast<const int32_t*>(lengths), S,
                                                       T, cu);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || S == 0 || total == 0 || T == 0) return err;
  positions_kernel<<<seq_grid(T, S, kThreads), kThreads, 0, stream>>>(cu, S, T, total, positions);
  return cudaGetLastError();
}

cudaError_t launch_pack(const void* padded, void* packed, const int32_t* cu, int64_t S, int64_t T,
                        int64_t total, int64_t row_bytes, cudaStream_t stream) {
  if (S == 0 || T == 0 || total == 0 || row_bytes == 0) return cudaSuccess;
  return dispatch_copy<true>(padded, packed, cu, S, T, total, row_bytes, stream);
}

cudaError_t launch_unpack(const void* packed, void* padded, const int32_t* cu, int64_t S,
                          int64_t T, int64_t total, int64_t row_bytes, cudaStream_t stream) {
  if (S == 0 || T == 0 || row_bytes == 0) return cudaSuccess;
  return dispatch_copy<false>(packed, padded, cu, S, T, total, row_bytes, stream);
}

cudaError_t launch_shift_targets(const void* tokens, bool tokens_is_int64,
                                 const bool* completion_mask, const int32_t* cu, int64_t S,
                                 int64_t N, int64_t ignore_index, int64_t* targets,
                                 cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  int64_t blocks = ceil_div(N, kThreads);
  blocks = blocks > 65535 ? 65535 : blocks;
  if (tokens_is_int64) {
    shift_targets_kernel<int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(tokens), completion_mask, cu, S, N, ignore_index, targets);
  } else {
    shift_targets_kernel<int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(tokens), completion_mask, cu, S, N, ignore_index, targets);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mpo_fast
