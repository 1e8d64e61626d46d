// combine: every rank pulls the rows of its own tokens straight from the ranks that hold them
// and reduces them in registers (fp32), so each row crosses the interconnect once and nothing is
// staged on the receiving side.
//
// Protocol for one epoch, per block:
//   A. block 0 tells every rank where this rank's combine input (and top-k weights) lie;
//   B. each block learns where every rank's input lies;
//   C. warps reduce tokens: ranks in ascending order, then bias 0, then bias 1, one rounding;
//   D. the block tells every rank it has finished reading from it;
//   E. the block waits until the same block of every rank has finished reading this rank's
//      input, so the input may be reused once the kernel ends.
#include "common/check.h"
#include "device/peer_exchange.cuh"
#include "device/token_loop.cuh"
#include "device/vector_copy.cuh"
#include "intranode/launch.h"
#include "intranode/phases.h"
#include "intranode/signals.cuh"

namespace deepep_megatron::intranode {

namespace {

constexpr int kCombineChunks = 2;  // vectors per lane in flight, per source rank
// Lane k of a token's warp sums top-k weight k.
static_assert(MAX_TOPK <= 32, "one lane per top-k slot");

struct Sources {
    const uint8_t* x[MAX_RANKS_PER_NODE];      // each rank's combine input rows
    const float* weights[MAX_RANKS_PER_NODE];  // each rank's top-k weights, or null
    int first_row[MAX_RANKS_PER_NODE];         // row of this rank's first token in that input
};

// Step A: the weights' word first, then the input's (the order of the stores is kept as it was
// measured; a reader waits for each word on its own).
__device__ void publish_inputs(const CombineParams& p, int epoch) {
    publish_offset_to_peers(p.group.peers, p.num_ranks, p.group.wait.rank,
                            &NvlinkSignalArea::combine_w_offset, epoch, p.my_w_offset);
    publish_offset_to_peers(p.group.peers, p.num_ranks, p.group.wait.rank,
                            &NvlinkSignalArea::combine_x_offset, epoch, p.my_x_offset);
}

// Step B, thread `peer`: where the peer's input lies and where this rank's rows start in it.
__device__ bool learn_source(const CombineParams& p, int epoch, int peer, Sources& src) {
    size_t x_offset = 0, w_offset = 0;
    const NvlinkSignalArea* local = p.group.signals;
    bool arrived = wait_offset(&local->combine_x_offset[peer], epoch, p.group.wait, kPhaseCombineOffsets,
                               peer, &x_offset);
    arrived = arrived && wait_offset(&local->combine_w_offset[peer], epoch, p.group.wait,
                                     kPhaseCombineOffsets, peer, &w_offset);
    const RowsInBlock rows = rows_in_block(p.count_matrix, p.num_ranks, p.group.wait.rank, peer);
    src.x[peer] = p.group.peers.base[peer] + x_offset;
    src.weights[peer] =
        w_offset ? reinterpret_cast<const float*>(p.group.peers.base[peer] + w_offset) : nullptr;
    src.first_row[peer] = rows.first;
    return arrived;
}

// Step C for one token's hidden vector.
template <typename Vec>
__device__ void reduce_row(const CombineParams& p, const Vec* const* rows, int token, int lane) {
    constexpr int kValues = sizeof(Vec) / 2;
    const int num_vectors = p.hidden * 2 / static_cast<int>(sizeof(Vec));
    const int64_t row_offset = static_cast<int64_t>(token) * num_vectors;
    for (int base = lane; base < num_vectors; base += 32 * kCombineChunks) {
        float acc[kCombineChunks][kValues];
        Vec loaded[MAX_RANKS_PER_NODE][kCombineChunks];
#pragma unroll
        for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
            if (rows[r] == nullptr) continue;
#pragma unroll
            for (int c = 0; c < kCombineChunks; ++c) {
                const int i = base + c * 32;
                if (i < num_vectors) loaded[r][c] = load_peer(rows[r] + i);
            }
        }
#pragma unroll
        for (int c = 0; c < kCombineChunks; ++c) {
#pragma unroll
            for (int v = 0; v < kValues; ++v) acc[c][v] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
            if (rows[r] == nullptr) continue;
#pragma unroll
            for (int c = 0; c < kCombineChunks; ++c) accumulate_bf16(acc[c], loaded[r][c]);
        }
#pragma unroll
        for (int c = 0; c < kCombineChunks; ++c) {
            const int i = base + c * 32;
            if (i >= num_vectors) continue;
            if (p.bias0 != nullptr)
                accumulate_bf16(acc[c],
                                load_streaming(reinterpret_cast<const Vec*>(p.bias0) + row_offset + i));
            if (p.bias1 != nullptr)
                accumulate_bf16(acc[c],
                                load_streaming(reinterpret_cast<const Vec*>(p.bias1) + row_offset + i));
            reinterpret_cast<Vec*>(p.combined_x)[row_offset + i] =
                pack_bf16(acc[c], static_cast<Vec*>(nullptr));
        }
    }
}

// Step C for the tokens of this warp.
template <typename Vec>
__device__ void reduce_tokens(const CombineParams& p, const Sources& src) {
    const int lane = lane_id();
    const int64_t row_bytes = static_cast<int64_t>(p.hidden) * 2;
    for_each_token_of_warp(p.num_tokens, [&](int token) {
        const TokenSlots slots = load_token_slots(p.send_slot, token, p.num_ranks, lane);
        const Vec* rows[MAX_RANKS_PER_NODE];
        int row_index[MAX_RANKS_PER_NODE];
#pragma unroll
        for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
            const int slot = slots.of(r);
            row_index[r] = slot >= 0 ? src.first_row[r] + slot : -1;
            rows[r] =
                (r < p.num_ranks && slot >= 0)
                    ? reinterpret_cast<const Vec*>(src.x[r] + static_cast<int64_t>(row_index[r]) * row_bytes)
                    : nullptr;
        }
        reduce_row<Vec>(p, rows, token, lane);
        if (p.combined_weights != nullptr && lane < p.num_topk) {
            float sum = 0.0f;
#pragma unroll
            for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
                if (rows[r] != nullptr && src.weights[r] != nullptr)
                    sum += src.weights[r][static_cast<int64_t>(row_index[r]) * p.num_topk + lane];
            }
            p.combined_weights[static_cast<int64_t>(token) * p.num_topk + lane] = sum;
        }
    });
}

template <typename Vec>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(CombineParams p) {
    __shared__ Sources src;
    const int epoch = current_epoch(p.group.signals);
    publish_inputs(p, epoch);
    const bool learnt = learn_from_every_peer(p.group.wait, p.num_ranks, kPhaseCombineStart,
                                              [&](int peer) { return learn_source(p, epoch, peer, src); });
    if (learnt) {
        reduce_tokens<Vec>(p, src);
        // Steps D, E: every load of this block has returned its value once the block joins.
        handshake_with_peers(&NvlinkSignalArea::combine_done, p.group, p.num_ranks, epoch, kPhaseCombineDone);
    }
    finish_operation(p.group.signals);
}

}  // namespace

void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream) {
    auto aligned = [](const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; };
    const bool wide = params.hidden % 8 == 0 && aligned(params.bias0) && aligned(params.bias1) &&
                      aligned(params.combined_x);
    if (wide)
        combine_kernel<int4><<<num_blocks, kCombineThreads, 0, stream>>>(params);
    else
        combine_kernel<int><<<num_blocks, kCombineThreads, 0, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::intranode
