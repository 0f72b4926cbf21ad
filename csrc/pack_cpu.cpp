// CPU packing kernels. pack/unpack are memcpy/memset over contiguous runs of rows, split into
// equal byte ranges across threads (so one long sequence does not leave the others idle); the
// fallback in mpo_fast/packing.py does the same work with index_select / index_copy_.
#include "pack_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace mpo_fast {
namespace cpu {
namespace {

// Rows per parallel task: about 512 KiB of data, at least one row. at::parallel_for stays on
// the calling thread below one grain, so small batches never pay for waking the thread pool
// (which costs milliseconds on a machine whose other cores are busy).
int64_t grain_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, row_bytes));
}

// Tokens per parallel task for the per-token index work (positions, targets).
constexpr int64_t kTokenGrain = int64_t{1} << 16;

int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

int64_t seq_start(const int32_t* cu, int64_t s, int64_t total) {
  return clamp(cu[s], 0, total);
}

int64_t seq_len(const int32_t* cu, int64_t s, int64_t T, int64_t total) {
  const int64_t len = clamp(static_cast<int64_t>(cu[s + 1]) - cu[s], 0, T);
  return std::min(len, total - seq_start(cu, s, total));
}

template <typename L>
void cu_seqlens(const L* lengths, int64_t S, int64_t T, int32_t* cu) {
  int64_t acc = 0;
  cu[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    acc += clamp(static_cast<int64_t>(lengths[s]), 0, T);
    cu[s + 1] = static_cast<int32_t>(acc);
  }
}

// cu is validated by the binding on the CPU (non-decreasing, cu[S] = N): token n is the last of
// its sequence iff n + 1 is one of cu[1..S]. Each range of tokens walks the boundaries from the
// first one above its start.
template <typename Tok>
void shift_targets_impl(const Tok* tokens, const bool* mask, const int32_t* cu, int64_t S,
                        int64_t N, int64_t ignore_index, int64_t* targets) {
  at::parallel_for(0, N, kTokenGrain, [&](int64_t n0, int64_t n1) {
    const int32_t* next_end = std::upper_bound(cu + 1, cu + S + 1, static_cast<int32_t>(n0));
    for (int64_t n = n0; n < n1; ++n) {
      while (next_end < cu + S && *next_end <= n) ++next_end;  // first boundary above n
      const bool last = next_end == cu + S + 1 || *next_end == n + 1;
      targets[n] = (!last && mask[n + 1]) ? static_cast<int64_t>(tokens[n + 1]) : ignore_index;
    }
  });
}

}  // namespace

void seq_index(const void* lengths, bool lengths_is_int64, int64_t S, int64_t T, int64_t total,
               int32_t* cu, int64_t* positions) {
  if (lengths_is_int64) {
    cu_seqlens(static_cast<const int64_t*>(lengths), S, T, cu);
  } else {
    cu_seqlens(static_cast<const int32_t*>(lengths), S, T, cu);
  }
  // Parallel over sequences only when there are enough tokens to pay for the threads.
  const int64_t grain = total > kTokenGrain ? 1 : S + 1;
  at::parallel_for(0, S, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t start = seq_start(cu, s, total);
      const int64_t len = seq_len(cu, s, T, total);
      for (int64_t i = 0; i < len; ++i) positions[start + i] = i;
    }
  });
}

void pack(const void* padded, void* packed, const int32_t* cu, int64_t S, int64_t T,
          int64_t total, int64_t row_bytes) {
  if (S == 0 || T == 0 || total == 0 || row_bytes == 0) return;
  const char* src = static_cast<const char*>(padded);
  char* dst = static_cast<char*>(packed);
  // Split the packed rows [0, total) evenly; each range starts in the sequence found by binary
  // search over cu and walks forward, one memcpy per (range, sequence) overlap.
  at::parallel_for(0, total, grain_rows(row_bytes), [&](int64_t r0, int64_t r1) {
    int64_t s = std::upper_bound(cu + 1, cu + S + 1, static_cast<int32_t>(r0)) - (cu + 1);
    for (int64_t r = r0; r < r1 && s < S; ++s) {
      const int64_t start = seq_start(cu, s, total);
      const int64_t end = std::min(start + seq_len(cu, s, T, total), r1);
      if (end <= r) continue;
      const int64_t from = std::max(r, start);
      std::memcpy(dst + from * row_bytes, src + (s * T + (from - start)) * row_bytes,
                  static_cast<size_t>((end - from) * row_bytes));
      r = end;
    }
  });
}

void unpack(const void* packed, void* padded, const int32_t* cu, int64_t S, int64_t T,
            int64_t total, int64_t row_bytes) {
  if (S == 0 || T == 0 || row_bytes == 0) return;
  const char* src = static_cast<const char*>(packed);
  char* dst = static_cast<char*>(padded);
  // Split the padded rows [0, S*T) evenly: every row is written once, copied or zeroed.
  at::parallel_for(0, S * T, grain_rows(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {
      const int64_t s = r / T;
      const int64_t t = r - s * T;
      const int64_t row_end = std::min(r1, (s + 1) * T);
      const int64_t len = seq_len(cu, s, T, total);
      const int64_t copy_end = std::min(row_end, s * T + len);
      if (r < copy_end) {
        std::memcpy(dst + r * row_bytes, src + (seq_start(cu, s, total) + t) * row_bytes,
                    static_cast<size_t>((copy_end - r) * row_bytes));
      }
      const int64_t zero_from = std::max(r, copy_end);
      if (zero_from < row_end) {
        std::memset(dst + zero_from * row_bytes, 0,
                    static_cast<size_t>((row_end - zero_from) * row_bytes));
      }
      r = row_end;
    }
  });
}

void shift_targets(const void* tokens, bool tokens_is_int64, const bool* completion_mask,
                   const int32_t* cu, int64_t S, int64_t N, int64_t ignore_index,
                   int64_t* targets) {
  if (tokens_is_int64) {
    shift_targets_impl(static_cast<const int64_t*>(tokens), completion_mask, cu, S, N,
                       ignore_index, targets);
  } else {
    shift_targets_impl(static_cast<const int32_t*>(tokens), completion_mask, cu, S, N,
                       ignore_index, targets);
  }
}

}  // namespace cpu
}  // namespace mpo_fast
