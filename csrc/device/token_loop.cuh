// The warp-per-token loop of the data kernels: each warp of the grid owns whole tokens (warp w
// takes tokens w, w + W, w + 2W, ... where W is the number of warps in the grid), and a token's
// destinations come from its row of send_slot ([N, R] int32, -1 = not sent to that rank).
#pragma once

#include <cstdint>

namespace deepep_megatron {

__device__ __forceinline__ int lane_id() {
    return static_cast<int>(threadIdx.x % 32);
}

// Calls `body(token)` for every token this warp owns; all lanes of the warp take part.
template <typename Body>
__device__ __forceinline__ void for_each_token_of_warp(int num_tokens, Body body) {
    const int warps_per_block = blockDim.x / 32;
    const int first_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int total_warps = gridDim.x * warps_per_block;
    for (int token = first_warp; token < num_tokens; token += total_warps) body(token);
}

// As `for_each_token_of_warp`, with a software pipeline one token deep: `prefetch(token)` issues
// the small loads of a token (its slots, its metadata) while the previous token is still being
// copied, and `body(token, prefetched)` does the copy. A warp's loop is bound by memory latency,
// so taking the dependent small loads off the critical path shortens every token.
template <typename Prefetch, typename Body>
__device__ __forceinline__ void for_each_token_of_warp_prefetched(int num_tokens, Prefetch prefetch,
                                                                  Body body) {
    const int warps_per_block = blockDim.x / 32;
    const int first_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int total_warps = gridDim.x * warps_per_block;
    if (first_warp >= num_tokens) return;
    auto ahead = prefetch(first_warp);
    for (int token = first_warp; token < num_tokens; token += total_warps) {
        auto current = ahead;
        if (token + total_warps < num_tokens) ahead = prefetch(token + total_warps);
        body(token, current);
    }
}

// A token's send_slot row, spread over the warp: lane r loads the slot for rank r once, and any
// lane reads rank r's slot by a shuffle (every lane must call `of` together).
struct TokenSlots {
    int lane_slot;
    __device__ __forceinline__ int of(int rank) const { return __shfl_sync(0xffffffffu, lane_slot, rank); }
};
__device__ __forceinline__ TokenSlots load_token_slots(const int* send_slot, int token, int num_ranks,
                                                       int lane) {
    return TokenSlots{lane < num_ranks ? send_slot[static_cast<int64_t>(token) * num_ranks + lane] : -1};
}

}  // namespace deepep_megatron
