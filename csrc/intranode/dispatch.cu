// dispatch: every token is written once, by one warp, straight into its final row of each
// destination rank's receive block (no rings, no copy-out on the receiver).
//
// Protocol for one epoch, per block:
//   A. block 0 tells every rank where this rank's receive block lies (packed epoch + offset);
//   B. each block learns where every destination's receive block lies;
//   C. warps copy tokens: one read of the row, one vector store per destination, metadata;
//   D. the block releases a per-(src, block) completion flag at every destination;
//   E. the block waits until the same block of every source has completed, so the kernel ends
//      only when this rank's receive block is full.
#include "common/check.h"
#include "device/memory_order.cuh"
#include "device/peer_exchange.cuh"
#include "device/token_loop.cuh"
#include "device/vector_copy.cuh"
#include "intranode/launch.h"
#include "intranode/phases.h"
#include "intranode/signals.cuh"

namespace deepep_megatron::intranode {

namespace {

// Vectors each lane has in flight per round of a row copy. The copy is bound by how many bytes
// are in flight (the loads' latency, not bandwidth, limits a warp), so more is better until the
// registers run out: 8 x 16 bytes keeps the kernel within 128 registers at 512 threads.
constexpr int kDispatchUnroll = 8;
// Scales each lane keeps in registers (one token's scales: hidden <= 16384 at 128 channels per
// scale); a longer row's remaining scales are copied straight from memory.
constexpr int kScalesPerLane = 4;

struct Destinations {
    size_t block_offset[MAX_RANKS_PER_NODE];  // receive block, relative to the peer's region base
    int first_row[MAX_RANKS_PER_NODE];        // row of this rank's first token in that block
    int num_rows[MAX_RANKS_PER_NODE];         // rows of that block
    RecvBlockLayout layout[MAX_RANKS_PER_NODE];
};

// Step B, thread `peer`: where the peer's receive block lies and where this rank's rows start.
__device__ bool learn_destination(const DispatchParams& p, int epoch, int peer, Destinations& dst) {
    size_t offset = 0;
    const bool arrived = wait_offset(&p.group.signals->recv_offset[peer], epoch, p.group.wait,
                                     kPhaseDispatchOffsets, peer, &offset);
    const RowsInBlock rows = rows_in_block(p.count_matrix, p.num_ranks, p.group.wait.rank, peer);
    const int num_rows = p.num_worst_tokens > 0 ? p.num_worst_tokens : rows.total;
    dst.block_offset[peer] = offset;
    dst.first_row[peer] = rows.first;
    dst.num_rows[peer] = num_rows;
    dst.layout[peer] = recv_block_layout(num_rows, p.row_bytes, p.num_scales, p.num_topk);
    return arrived;
}

// Step C for one token's payload: each lane moves kDispatchUnroll vectors per round, loaded
// once and stored to every destination.
template <typename Vec>
__device__ void copy_row(const Vec* source, Vec* const* targets, int num_ranks, int num_vectors, int lane) {
    for (int base = lane; base < num_vectors; base += 32 * kDispatchUnroll) {
        Vec values[kDispatchUnroll];
#pragma unroll
        for (int u = 0; u < kDispatchUnroll; ++u) {
            const int i = base + u * 32;
            if (i < num_vectors) values[u] = load_streaming(source + i);
        }
#pragma unroll
        for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
            if (r >= num_ranks || targets[r] == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kDispatchUnroll; ++u) {
                const int i = base + u * 32;
                if (i < num_vectors) targets[r][i] = values[u];
            }
        }
    }
}

// Step C, one token's scales and top-k as this lane holds them. They are loaded once, before the
// payload, so that their latency overlaps the payload's, and stored to every destination from
// registers (loading them per destination put several dependent round trips on every token).
struct TokenMetadata {
    int scales[kScalesPerLane];  // the token's scales lane, lane + 32, ... (raw float32 bits)
    int64_t expert;              // lane < num_topk: the global expert id of top-k slot `lane`
    float weight;                // its weight (0 without weights)
};

__device__ __forceinline__ TokenMetadata load_token_metadata(const DispatchParams& p, int token, int lane) {
    TokenMetadata meta;
    if (p.scales != nullptr) {
        const int* source =
            reinterpret_cast<const int*>(p.scales) + static_cast<int64_t>(token) * p.num_scales;
#pragma unroll
        for (int j = 0; j < kScalesPerLane; ++j) {
            const int i = lane + 32 * j;
            if (i < p.num_scales) meta.scales[j] = load_streaming(source + i);
        }
    }
    const int64_t slot = static_cast<int64_t>(token) * p.num_topk + lane;
    const bool has_slot = p.topk_idx != nullptr && lane < p.num_topk;
    meta.expert = has_slot ? p.topk_idx[slot] : -1;
    meta.weight = has_slot && p.topk_weights != nullptr ? p.topk_weights[slot] : 0.0f;
    return meta;
}

// Step C for one token's scales and metadata at every destination (top-k remapped to the
// destination's local expert ids, -1 and weight 0 for other ranks' experts).
__device__ void store_token_metadata(const DispatchParams& p, const Destinations& dst, int token,
                                     const TokenMetadata& meta, const int* rows, int lane) {
    for (int r = 0; r < p.num_ranks; ++r) {
        if (rows[r] < 0) continue;
        uint8_t* block = p.group.peers.base[r] + dst.block_offset[r];
        const int64_t row = rows[r];
        if (p.scales != nullptr) {
            int* target = reinterpret_cast<int*>(block + dst.layout[r].scales_offset) + row * p.num_scales;
#pragma unroll
            for (int j = 0; j < kScalesPerLane; ++j) {
                const int i = lane + 32 * j;
                if (i < p.num_scales) target[i] = meta.scales[j];
            }
            const int* source =
                reinterpret_cast<const int*>(p.scales) + static_cast<int64_t>(token) * p.num_scales;
            for (int i = lane + 32 * kScalesPerLane; i < p.num_scales; i += 32)
                target[i] = load_streaming(source + i);
        }
        if (p.topk_idx != nullptr && lane < p.num_topk) {
            const int64_t local = meta.expert - static_cast<int64_t>(r) * p.experts_per_rank;
            const bool mine = meta.expert >= 0 && local >= 0 && local < p.experts_per_rank;
            reinterpret_cast<int64_t*>(block + dst.layout[r].topk_idx_offset)[row * p.num_topk + lane] =
                mine ? local : -1;
            if (p.topk_weights != nullptr)
                reinterpret_cast<float*>(block + dst.layout[r].topk_weights_offset)[row * p.num_topk + lane] =
                    mine ? meta.weight : 0.0f;
        }
        if (lane == 0) reinterpret_cast<int*>(block + dst.layout[r].src_idx_offset)[row] = token;
    }
}

// What a warp loads of a token ahead of copying it.
struct TokenAhead {
    TokenSlots slots;
    TokenMetadata meta;
};

// Step C for the tokens of this warp.
template <typename Vec>
__device__ void send_tokens(const DispatchParams& p, const Destinations& dst) {
    const int lane = lane_id();
    const int num_vectors = p.row_bytes / static_cast<int>(sizeof(Vec));
    auto prefetch = [&](int token) {
        return TokenAhead{load_token_slots(p.send_slot, token, p.num_ranks, lane),
                          load_token_metadata(p, token, lane)};
    };
    for_each_token_of_warp_prefetched(p.num_tokens, prefetch, [&](int token, const TokenAhead& ahead) {
        int rows[MAX_RANKS_PER_NODE];
        Vec* targets[MAX_RANKS_PER_NODE];
#pragma unroll
        for (int r = 0; r < MAX_RANKS_PER_NODE; ++r) {
            int slot = ahead.slots.of(r);
            if (slot >= 0 && dst.first_row[r] + slot >= dst.num_rows[r]) {
                // More rows than num_worst_tokens: drop the token rather than write past the
                // block, and tell the host, which raises.
                if (lane == 0)
                    atomicMax(const_cast<int*>(&p.group.mailbox->overflow_rows), dst.first_row[r] + slot + 1);
                slot = -1;
            }
            rows[r] = slot >= 0 ? dst.first_row[r] + slot : -1;
            targets[r] = nullptr;
            if (r < p.num_ranks && slot >= 0) {
                uint8_t* block = p.group.peers.base[r] + dst.block_offset[r] + dst.layout[r].x_offset;
                targets[r] = reinterpret_cast<Vec*>(block + static_cast<int64_t>(rows[r]) * p.row_bytes);
            }
        }
        const Vec* source = reinterpret_cast<const Vec*>(p.x + static_cast<int64_t>(token) * p.row_bytes);
        copy_row(source, targets, p.num_ranks, num_vectors, lane);
        store_token_metadata(p, dst, token, ahead.meta, rows, lane);
    });
}

template <typename Vec>
__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(DispatchParams p) {
    __shared__ Destinations dst;
    const int epoch = current_epoch(p.group.signals);
    publish_offset_to_peers(p.group.peers, p.num_ranks, p.group.wait.rank, &NvlinkSignalArea::recv_offset,
                            epoch,
                            p.my_recv_offset);  // step A
    const bool learnt = learn_from_every_peer(p.group.wait, p.num_ranks, kPhaseDispatchStart, [&](int peer) {
        return learn_destination(p, epoch, peer, dst);
    });
    if (learnt) {
        send_tokens<Vec>(p, dst);
        fence_system();  // this block's rows are visible before its completion flag (steps D, E)
        handshake_with_peers(&NvlinkSignalArea::dispatch_done, p.group, p.num_ranks, epoch,
                             kPhaseDispatchData);
    }
    finish_operation(p.group.signals);
}

}  // namespace

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream) {
    const bool wide = params.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(params.x) % 16 == 0;
    if (wide)
        dispatch_kernel<int4><<<num_blocks, kDispatchThreads, 0, stream>>>(params);
    else
        dispatch_kernel<int><<<num_blocks, kDispatchThreads, 0, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::intranode
