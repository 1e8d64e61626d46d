// Device helpers of the low-latency kernels: memory ordering, bounded waits, signalling a peer
// (by store through its mapping in the same node, by NVSHMEM signal in another node), and the
// block-level bookkeeping every phase ends with.
//
// Ordering rule (same as the intranode family): a producer makes its data stores visible with
// `fence_system` in every storing thread, joins the block, then one thread publishes with a
// release operation. A consumer polls with `load_acquire_system`, joins its block, then loads the
// data with L1-bypassing loads. NVSHMEM puts carry their own signal (the put's data is visible
// once its signal is).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "device/clock.cuh"
#include "device/memory_order.cuh"
#include "device/vector_copy.cuh"
#include "low_latency/params.h"

namespace deepep_megatron {
namespace low_latency {

// ------------------------------------------------------------------------------ vector access
// Caller inputs are read with device/vector_copy.cuh's load_streaming; memory ordering and the
// clock come from device/memory_order.cuh and device/clock.cuh.

// Memory other ranks wrote (landing areas): L2 only, never a stale L1 line.
__device__ __forceinline__ int4 load_landed(const int4* address) {
    return __ldcg(address);
}
__device__ __forceinline__ int load_landed(const int* address) {
    return __ldcg(address);
}
__device__ __forceinline__ float load_landed(const float* address) {
    return __ldcg(address);
}

// ------------------------------------------------------------------------------ bounded waits
// Record the first timeout for the host and make every other wait of this rank give up.
__device__ __forceinline__ void report_timeout(const WaitContext& ctx, int phase, int peer,
                                               long long expected, long long seen) {
    if (atomicCAS(ctx.abort_flag, 0, 1) == 0) {
        ctx.record->rank = ctx.rank;
        ctx.record->peer = peer;
        ctx.record->phase = phase;
        ctx.record->expected = expected;
        ctx.record->seen = seen;
        __threadfence_system();
        ctx.record->flag = 1;
        __threadfence_system();
    }
}

__device__ __forceinline__ bool aborted(const WaitContext& ctx) {
    return *reinterpret_cast<volatile int*>(ctx.abort_flag) != 0;
}

// Spin until the high half of `*word` equals `seq`; the low half comes back in `*value`.
__device__ __forceinline__ bool wait_sequence(const uint64_t* word, unsigned int seq, const WaitContext& ctx,
                                              int phase, int peer, unsigned int* value) {
    const long long start = global_time_ns();
    while (true) {
        const uint64_t seen = load_acquire_system(word);
        if (static_cast<unsigned int>(seen >> 32) == seq) {
            *value = static_cast<unsigned int>(seen & 0xffffffffull);
            return true;
        }
        if (aborted(ctx)) return false;
        if (global_time_ns() - start > ctx.timeout_ns) {
            report_timeout(ctx, phase, peer, seq, static_cast<long long>(seen >> 32));
            return false;
        }
    }
}

// Spin until `*word >= target`. Returns false after a timeout (recorded) or an abort.
__device__ __forceinline__ bool wait_at_least(const uint64_t* word, uint64_t target, const WaitContext& ctx,
                                              int phase, int peer) {
    const long long start = global_time_ns();
    while (true) {
        const uint64_t seen = load_acquire_system(word);
        if (seen >= target) return true;
        if (aborted(ctx)) return false;
        if (global_time_ns() - start > ctx.timeout_ns) {
            report_timeout(ctx, phase, peer, static_cast<long long>(target), static_cast<long long>(seen));
            return false;
        }
    }
}

// ------------------------------------------------------------------------------ reaching peers
__device__ __forceinline__ uint8_t* local_at(const Symmetric& sym, size_t offset) {
    return sym.base + offset;
}

// Peer's memory in my address space, or null when the peer is in another node (use puts).
__device__ __forceinline__ uint8_t* peer_at(const Symmetric& sym, int peer, size_t offset) {
    const uint64_t base = sym.peer_base[peer];
    return base == 0 ? nullptr : reinterpret_cast<uint8_t*>(base) + offset;
}

// Set a peer's 64-bit signal word (release: it orders this thread's earlier stores).
__device__ __forceinline__ void signal_set(const Symmetric& sym, int peer, size_t offset, uint64_t value) {
    if (uint8_t* mapped = peer_at(sym, peer, offset)) {
        store_release_system(reinterpret_cast<uint64_t*>(mapped), value);
    } else {
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_at(sym, offset)), value, NVSHMEM_SIGNAL_SET,
                           peer);
    }
}

// Add to a same-node peer's arrival counter after this block's stores (see the ordering rule).
__device__ __forceinline__ void signal_add_mapped(const Symmetric& sym, int peer, size_t offset,
                                                  uint64_t value) {
    add_release_system(reinterpret_cast<uint64_t*>(peer_at(sym, peer, offset)), value);
}

// ------------------------------------------------------------------------------ this call's bank
constexpr unsigned kFullMask = 0xffffffffu;

// Offset of word `index` of a signal section of this call's bank.
__device__ __forceinline__ size_t signal_word(const Symmetric& sym, size_t section, size_t index) {
    return sym.signal_offset + section + index * sizeof(uint64_t);
}

__device__ __forceinline__ uint64_t* local_signal(const Symmetric& sym, size_t section, size_t index) {
    return reinterpret_cast<uint64_t*>(local_at(sym, signal_word(sym, section, index)));
}

__device__ __forceinline__ BankCounters* bank_counters(const Symmetric& sym) {
    return reinterpret_cast<BankCounters*>(local_at(sym, sym.signal_offset + sym.signals.counters));
}

__device__ __forceinline__ unsigned int read_counter(const unsigned int* counter) {
    return *reinterpret_cast<const volatile unsigned int*>(counter);
}

// ------------------------------------------------------------------------------ block bookkeeping
// Block-uniform "a wait of this rank gave up": thread 0 decides, everyone agrees.
__device__ __forceinline__ bool block_stopped(const WaitContext& ctx, int* shared_flag) {
    __syncthreads();
    if (threadIdx.x == 0) *shared_flag = aborted(ctx) ? 1 : 0;
    __syncthreads();
    return *shared_flag != 0;
}

// Every block calls this at the end of a phase; true in exactly one block, the last to arrive
// (its earlier phases' memory operations, and every other block's, are complete).
__device__ __forceinline__ bool last_block(int* ticket, int* shared_flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const int arrived = atomicAdd(ticket, 1);
        *shared_flag = arrived == static_cast<int>(gridDim.x) - 1 ? 1 : 0;
        if (*shared_flag) *ticket = 0;
        __threadfence();
    }
    __syncthreads();
    return *shared_flag != 0;
}

__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// Largest i in [0, n) with sorted[i] <= value (sorted ascending, sorted[0] <= value).
__device__ __forceinline__ int last_not_above(const int* sorted, int n, int value) {
    int low = 0, high = n - 1;
    while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (sorted[mid] <= value)
            low = mid;
        else
            high = mid - 1;
    }
    return low;
}

}  // namespace low_latency
}  // namespace deepep_megatron
