// The prologue the data kernels share: block 0 publishes a packed (epoch, offset) word into every
// peer's signal area ("where my input or receive block lies this epoch"); every block then learns
// every peer's word, and from the [src, dst] count matrix where its rows lie in a peer's block.
#pragma once

#include <cstddef>

#include "common/limits.h"
#include "device/memory_order.cuh"
#include "device/wait.cuh"
#include "transport/peer_regions.h"

namespace deepep_megatron {

// Offsets travel with their epoch in one 64-bit word, so a reader never pairs a new epoch with an
// old offset. Offsets are region-aligned, so 32 bits of alignment units cover 1 TiB.
__device__ __forceinline__ unsigned long long pack_offset(int epoch, size_t offset) {
    return (static_cast<unsigned long long>(static_cast<unsigned>(epoch)) << 32) |
           static_cast<unsigned long long>(offset / REGION_ALIGNMENT);
}
__device__ __forceinline__ size_t unpack_offset(unsigned long long packed) {
    return static_cast<size_t>(packed & 0xffffffffull) * REGION_ALIGNMENT;
}
__device__ __forceinline__ int unpack_epoch(unsigned long long packed) {
    return static_cast<int>(packed >> 32);
}

// A table of packed words in a family's signal area, one per source rank.
template <typename Signals>
using PackedOffsetTable = unsigned long long (Signals::*)[MAX_RANKS_PER_NODE];

// Block 0, thread `peer` (< num_ranks): writes `offset` for this epoch into slot `my_rank` of
// `table` in the peer's signal area, with release semantics. Other threads do nothing.
template <typename Signals>
__device__ __forceinline__ void publish_offset_to_peers(const PeerRegions& peers, int num_ranks, int my_rank,
                                                        PackedOffsetTable<Signals> table, int epoch,
                                                        size_t offset) {
    if (blockIdx.x != 0 || threadIdx.x >= num_ranks) return;
    auto* peer_signals = reinterpret_cast<Signals*>(peers.base[threadIdx.x]);
    store_release_system(&(peer_signals->*table)[my_rank], pack_offset(epoch, offset));
}

// Waits until the word `slot` carries `epoch`, then returns its offset through `offset`.
__device__ __forceinline__ bool wait_offset(const unsigned long long* slot, int epoch, const WaitContext& ctx,
                                            int phase, int peer, size_t* offset) {
    return bounded_wait(ctx, epoch, phase, peer, [&](int& seen) {
        const unsigned long long packed = load_acquire_system(slot);
        seen = unpack_epoch(packed);
        if (seen != epoch) return false;
        *offset = unpack_offset(packed);
        return true;
    });
}

// Every block learns what every peer published: thread `peer` (< num_ranks) runs `learn(peer)`,
// which waits and returns false if it gave up, and stores what it learnt in shared memory. The
// answer is the same in every thread: false when the group aborted before this block started
// (`start_phase` is recorded) or any of the block's waits gave up. Ends with a block barrier, so
// what was learnt is visible to the whole block.
template <typename Learn>
__device__ __forceinline__ bool learn_from_every_peer(const WaitContext& ctx, int num_ranks, int start_phase,
                                                      Learn learn) {
    if (__syncthreads_or(threadIdx.x == 0 && abort_seen_at_start(ctx, start_phase))) return false;
    bool arrived = true;
    if (threadIdx.x < num_ranks) arrived = learn(static_cast<int>(threadIdx.x));
    return __syncthreads_and(arrived) != 0;
}

// Where `sender`'s rows lie in `receiver`'s receive block: rows are ordered by source rank, so
// they start after the rows of every lower rank (count_matrix is [src, dst], row-major).
struct RowsInBlock {
    int first;  // row of the sender's first row
    int total;  // rows of the whole block
};
__device__ __forceinline__ RowsInBlock rows_in_block(const int* count_matrix, int num_ranks, int sender,
                                                     int receiver) {
    RowsInBlock rows{0, 0};
    for (int src = 0; src < num_ranks; ++src) {
        const int count = count_matrix[src * num_ranks + receiver];
        rows.total += count;
        if (src < sender) rows.first += count;
    }
    return rows;
}

}  // namespace deepep_megatron
