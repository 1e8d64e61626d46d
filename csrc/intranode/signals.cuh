// Device helpers on the intranode signal area: the epoch of the running operation, the end of an
// operation, and the per-block handshake with every peer.
#pragma once

#include "device/memory_order.cuh"
#include "device/wait.cuh"
#include "intranode/params.h"

namespace deepep_megatron::intranode {

// The epoch of the operation now running: one past the last completed one.
__device__ __forceinline__ int current_epoch(const NvlinkSignalArea* signals) {
    return load_volatile(&signals->epoch) + 1;
}

// Called by every block at its end: the last block to finish advances the epoch, so the next
// kernel on the stream sees the next epoch. Graph replays therefore stay consistent.
__device__ __forceinline__ void finish_operation(NvlinkSignalArea* signals) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&signals->blocks_done, 1) == static_cast<int>(gridDim.x) - 1) {
            signals->blocks_done = 0;
            signals->epoch += 1;
            __threadfence();
        }
    }
}

// A [src][block] array of epoch flags in the signal area, one per phase that ends in a handshake.
using BlockFlags = int (NvlinkSignalArea::*)[MAX_RANKS_PER_NODE][kMaxBlocks];

// Block-level handshake with every peer: thread `peer` (< num_ranks) tells the peer that this
// block's part of the phase is done (release), then waits until the same block of that peer has
// said so (acquire). Callers make their own stores visible first (fence_system).
__device__ __forceinline__ void handshake_with_peers(BlockFlags flags, const GroupParams& group,
                                                     int num_ranks, int epoch, int phase) {
    __syncthreads();
    if (threadIdx.x < num_ranks) {
        const int peer = threadIdx.x;
        auto* peer_signals = reinterpret_cast<NvlinkSignalArea*>(group.peers.base[peer]);
        store_release_system(&(peer_signals->*flags)[group.wait.rank][blockIdx.x], epoch);
        wait_epoch(&(group.signals->*flags)[peer][blockIdx.x], epoch, group.wait, phase, peer);
    }
}

}  // namespace deepep_megatron::intranode
