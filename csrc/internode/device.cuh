// Device helpers of the internode kernels: the signal words of this rank and of its peers, the
// bounded waits on them, telling a peer (a store through the mapping inside the node, an NVSHMEM
// signal to another node), the end-of-grid ticket, and warp copies.
//
// Ordering (as everywhere in this library, device/memory_order.cuh): a producer stores its data,
// `fence_system` in every storing thread, joins its block, then one thread publishes with a
// release store (same node) or an NVSHMEM signal; data that crosses nodes travels as
// put-with-signal, each put carrying its own signal, so no ordering across blocks or queue pairs
// is assumed. A consumer polls with an acquire load, joins its block, then reads the data.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "device/memory_order.cuh"
#include "device/wait.cuh"
#include "internode/params.h"

namespace deepep_megatron::internode {

constexpr unsigned kFullMask = 0xffffffffu;

using NodeFlags = unsigned long long (SignalArea::*)[MAX_NODES];
using LocalFlags = unsigned long long (SignalArea::*)[MAX_RANKS_PER_NODE];

__device__ __forceinline__ SignalArea* my_signals(const Group& g) {
    return reinterpret_cast<SignalArea*>(g.base);
}

// Tell rank `local` of my node that `(its flags)[index]` reached `operation`.
__device__ __forceinline__ void set_node_flag(const Group& g, int local, LocalFlags flags, int index,
                                              int operation) {
    auto* peer = reinterpret_cast<SignalArea*>(g.node_peer[local]);
    store_release_system(&(peer->*flags)[index], static_cast<unsigned long long>(operation));
}

// Tell the rank of `node` with my local index that `(its flags)[index]` reached `operation`
// (SET, never ADD: with a NIC in the job, an ADD even to a mapped peer goes through the NIC).
__device__ __forceinline__ void set_remote_flag(const Group& g, int node, NodeFlags flags, int index,
                                                int operation) {
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(&(my_signals(g)->*flags)[index]),
                       static_cast<uint64_t>(operation), NVSHMEM_SIGNAL_SET, pe_of(g, node));
}

// The symmetric address of one of my arrival counters (where a put's signal lands at the peer).
__device__ __forceinline__ uint64_t* arrival_counter(const Group& g, NodeFlags counters, int index) {
    return reinterpret_cast<uint64_t*>(&(my_signals(g)->*counters)[index]);
}

// Waits until `*flag` reaches `operation`.
__device__ __forceinline__ bool wait_flag(const Group& g, const unsigned long long* flag, int operation,
                                          int phase, int peer) {
    return bounded_wait(g.wait, operation, phase, peer, [&](int& seen) {
        const unsigned long long value = load_acquire_system(flag);
        seen = static_cast<int>(value);
        return value >= static_cast<unsigned long long>(operation);
    });
}

// Waits until the cumulative counter `*counter` reaches `total`, the last `count` of which belong
// to this operation (the record reports counts of this operation).
__device__ __forceinline__ bool wait_arrivals(const Group& g, const unsigned long long* counter,
                                              unsigned long long total, int count, int operation, int phase,
                                              int peer) {
    return bounded_wait_for(g.wait, operation, count, phase, peer, [&](int& seen) {
        const unsigned long long value = load_acquire_system(counter);
        seen = count - static_cast<int>(total - (value < total ? value : total));
        return value >= total;
    });
}

// True in every thread when this rank's group already gave up (the block then skips its work).
__device__ __forceinline__ bool block_stopped_at_start(const WaitContext& ctx, int phase) {
    return __syncthreads_or(threadIdx.x == 0 && abort_seen_at_start(ctx, phase)) != 0;
}

// Every block calls this at its end; true in exactly one block, the last to arrive, once every
// block's earlier memory operations are done (each storing thread fenced before).
__device__ __forceinline__ bool last_block(int* ticket) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const int arrived = atomicAdd(ticket, 1);
        is_last = arrived == static_cast<int>(gridDim.x) - 1 ? 1 : 0;
        if (is_last) *ticket = 0;
        __threadfence();
    }
    __syncthreads();
    return is_last != 0;
}

// The last block of a kernel: thread d (< ranks per node) tells rank d of my node that I reached
// `operation` in `flags`, then waits until rank d told me the same, so the kernel ends only when
// every rank of the node has finished its part (phase: what the wait is named).
__device__ __forceinline__ void meet_node(const Group& g, LocalFlags flags, int operation, int phase) {
    if (threadIdx.x < g.ranks_per_node) {
        const int local = threadIdx.x;
        set_node_flag(g, local, flags, g.local, operation);
        wait_flag(g, &(my_signals(g)->*flags)[local], operation, phase, g.node * g.ranks_per_node + local);
    }
}

// (node, index) of work item `item` when the items are the records of every source node in turn.
struct NodeItem {
    int node, index;
};
__device__ __forceinline__ NodeItem node_item(const int* item_start, int num_nodes, int item) {
    int node = 0;
    while (node + 1 < num_nodes && item_start[node + 1] <= item) ++node;
    return NodeItem{node, item - item_start[node]};
}

// Peer data (landing areas, mapped blocks): L2-coherent loads that skip L1.
__device__ __forceinline__ int load_landed(const int* address) {
    return __ldcg(address);
}
__device__ __forceinline__ float load_landed(const float* address) {
    return __ldcg(address);
}
__device__ __forceinline__ int64_t load_landed(const int64_t* address) {
    return static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(address)));
}

}  // namespace deepep_megatron::internode
