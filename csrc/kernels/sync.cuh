// Memory-ordering helpers and bounded waits for flags that other ranks write over NVLink (or,
// on the one-GPU harness, through IPC mappings of the same device memory).
//
// Ordering rule: a producer makes its data stores visible with `fence_system` in every thread
// that stored, joins the block, then one thread publishes with `store_release_system`. A consumer
// polls with `load_acquire_system` and joins its block before touching the data.
#pragma once

#include <cstdint>

#include "params.h"

namespace deepep_megatron {

__device__ __forceinline__ int load_acquire_system(const int* address) {
    int value;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ unsigned long long load_acquire_system(const unsigned long long* address) {
    unsigned long long value;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void store_release_system(int* address, int value) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ void store_release_system(unsigned long long* address, unsigned long long value) {
    asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void fence_system() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

__device__ __forceinline__ long long global_time_ns() {
    long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

__device__ __forceinline__ bool epoch_reached(int flag, int epoch) { return static_cast<int>(flag - epoch) >= 0; }

// Offsets travel with their epoch in one 64-bit word so a reader never pairs a new epoch with
// an old offset.
__device__ __forceinline__ unsigned long long pack_offset(int epoch, size_t offset) {
    return (static_cast<unsigned long long>(static_cast<unsigned>(epoch)) << 32) |
           static_cast<unsigned long long>(offset / kRegionAlignment);
}
__device__ __forceinline__ size_t unpack_offset(unsigned long long packed) {
    return static_cast<size_t>(packed & 0xffffffffull) * kRegionAlignment;
}
__device__ __forceinline__ int unpack_epoch(unsigned long long packed) { return static_cast<int>(packed >> 32); }

// Record the first timeout for the host and tell the grid's other waits to give up.
__device__ __forceinline__ void report_timeout(const WaitContext& ctx, int phase, int peer, int expected, int seen) {
    if (atomicCAS(const_cast<int*>(&ctx.mailbox->timeout_flag), 0, 1) == 0) {
        ctx.mailbox->timeout_rank = ctx.rank;
        ctx.mailbox->timeout_peer = peer;
        ctx.mailbox->timeout_phase = phase;
        ctx.mailbox->timeout_expected = expected;
        ctx.mailbox->timeout_seen = seen;
        __threadfence_system();
    }
    atomicExch(&ctx.local_signals->abort, 1);
}

__device__ __forceinline__ bool aborted(const WaitContext& ctx) {
    return *reinterpret_cast<volatile int*>(&ctx.local_signals->abort) != 0;
}

// Spin until `*flag` reaches `epoch`. Returns false after a timeout (recorded) or an abort.
__device__ __forceinline__ bool wait_epoch(const int* flag, int epoch, const WaitContext& ctx, int phase, int peer) {
    const long long start = global_time_ns();
    while (true) {
        int seen = load_acquire_system(flag);
        if (epoch_reached(seen, epoch)) return true;
        if (aborted(ctx)) return false;
        if (global_time_ns() - start > ctx.timeout_ns) {
            report_timeout(ctx, phase, peer, epoch, seen);
            return false;
        }
    }
}

// Spin until a packed (epoch, offset) word reaches `epoch`; returns the offset through `offset`.
__device__ __forceinline__ bool wait_offset(const unsigned long long* slot, int epoch, const WaitContext& ctx, int phase,
                                            int peer, size_t* offset) {
    const long long start = global_time_ns();
    while (true) {
        unsigned long long packed = load_acquire_system(slot);
        if (unpack_epoch(packed) == epoch) {
            *offset = unpack_offset(packed);
            return true;
        }
        if (aborted(ctx)) return false;
        if (global_time_ns() - start > ctx.timeout_ns) {
            report_timeout(ctx, phase, peer, epoch, unpack_epoch(packed));
            return false;
        }
    }
}

// Block-level handshake with every peer: this block tells each peer that its part of the phase
// (`flags` selects the phase's [src][block] flag array) is done, then waits until the same block
// of every peer has said so. Callers make their own stores visible first (fence_system).
using BlockFlags = int (SignalArea::*)[kMaxRanks][kMaxBlocks];

__device__ __forceinline__ void handshake_with_peers(BlockFlags flags, const PeerRegions& peers, int num_ranks,
                                                     int epoch, const WaitContext& ctx, int phase) {
    __syncthreads();
    if (threadIdx.x < num_ranks) {
        const int peer = threadIdx.x;
        auto* peer_signals = reinterpret_cast<SignalArea*>(peers.base[peer]);
        store_release_system(&(peer_signals->*flags)[ctx.rank][blockIdx.x], epoch);
        wait_epoch(&(ctx.local_signals->*flags)[peer][blockIdx.x], epoch, ctx, phase, peer);
    }
}

// The epoch of the operation now running: one past the last completed one.
__device__ __forceinline__ int current_epoch(const SignalArea* signals) {
    return *reinterpret_cast<const volatile int*>(&signals->epoch) + 1;
}

// Called by every block at its end: the last block to finish advances the epoch, so the next
// kernel on the stream sees the next epoch. Graph replays therefore stay consistent.
__device__ __forceinline__ void finish_operation(SignalArea* signals) {
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

}  // namespace deepep_megatron
