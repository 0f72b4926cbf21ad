// Pair planner: best-fit-decreasing bin packing of whole preference pairs into micro-batches
// under a token budget. Pure C++ (no torch); bound to Python in bindings.cpp and mirrored line
// for line by mpo_fast.packing._plan_python, which must give the identical plan.
#pragma once

#include <cstdint>
#include <vector>

namespace mpo_fast {

// sizes[i] = tokens of pair i (chosen + rejected), 0 <= sizes[i] <= max_tokens.
// Pairs are taken largest first (ties: lower index first); each goes to the open bin with the
// least remaining room that still fits it (ties: the bin opened first), else to a new bin.
// Returns the bins in the order they were opened, each bin's pair indices in ascending order.
// Throws std::invalid_argument on max_tokens <= 0 or a size outside [0, max_tokens].
std::vector<std::vector<int64_t>> plan_pairs(const int64_t* sizes, int64_t n_pairs,
                                             int64_t max_tokens);

}  // namespace mpo_fast
