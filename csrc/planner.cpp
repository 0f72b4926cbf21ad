// Best-fit-decreasing over pairs, O(P log P + P log B): the open bins live in an ordered set
// keyed by (remaining room, bin id), so "least room that still fits, earliest bin on ties" is
// one lower_bound.
#include "planner.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

namespace mpo_fast {

std::vector<std::vector<int64_t>> plan_pairs(const int64_t* sizes, int64_t n_pairs,
                                             int64_t max_tokens) {
  if (max_tokens <= 0) {
    throw std::invalid_argument("max_tokens must be positive, got " + std::to_string(max_tokens));
  }
  for (int64_t i = 0; i < n_pairs; ++i) {  // messages as in mpo_fast.packing._plan_python
    if (sizes[i] < 0) {
      throw std::invalid_argument("pair_tokens must be >= 0, but pair_tokens[" +
                                  std::to_string(i) + "] = " + std::to_string(sizes[i]));
    }
    if (sizes[i] > max_tokens) {
      throw std::invalid_argument(
          "pair " + std::to_string(i) + " has " + std::to_string(sizes[i]) +
          " tokens, more than max_tokens=" + std::to_string(max_tokens) +
          ": a pair is never split, so raise the budget or truncate that pair");
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n_pairs));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [sizes](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });

  std::vector<std::vector<int64_t>> bins;
  std::set<std::pair<int64_t, int64_t>> open;  // (remaining room, bin id)
  for (const int64_t pair : order) {
    const int64_t size = sizes[pair];
    auto it = open.lower_bound({size, std::numeric_limits<int64_t>::min()});
    int64_t bin;
    int64_t room;
    if (it == open.end()) {
      bin = static_cast<int64_t>(bins.size());
      bins.emplace_back();
      room = max_tokens;
    } else {
      room = it->first;
      bin = it->second;
      open.erase(it);
    }
    bins[static_cast<size_t>(bin)].push_back(pair);
    open.emplace(room - size, bin);
  }
  for (auto& bin : bins) std::sort(bin.begin(), bin.end());
  return bins;
}

}  // namespace mpo_fast
