// notify: the count exchange that precedes a fresh dispatch.
//
// One block. It (1) numbers this rank's tokens per destination (send_slot), (2) tells every rank
// how many tokens it sends to each rank and how many selections each of that rank's experts
// gets, (3) waits for every rank's announcement, and (4) publishes the [src, dst] count matrix to
// device memory and this rank's receive counts to host-mapped memory for the host sync.
#include <cub/block/block_scan.cuh>

#include "common/check.h"
#include "device/memory_order.cuh"
#include "device/wait.cuh"
#include "intranode/launch.h"
#include "intranode/phases.h"
#include "intranode/signals.cuh"

namespace deepep_megatron::intranode {

namespace {

using CountScan = cub::BlockScan<int, kNotifyThreads>;

// Exclusive scan of is_token_in_rank per destination over this thread's contiguous token chunk;
// writes send_slot and leaves the per-destination totals in `send_counts`.
__device__ void number_tokens_per_destination(const NotifyParams& p, CountScan::TempStorage& scan_storage,
                                              int* send_counts) {
    const int R = p.num_ranks;
    const int chunk = (p.num_tokens + blockDim.x - 1) / blockDim.x;
    const int begin = min(p.num_tokens, static_cast<int>(threadIdx.x) * chunk);
    const int end = min(p.num_tokens, begin + chunk);
    for (int rank = 0; rank < R; ++rank) {
        int mine = 0;
        for (int t = begin; t < end; ++t) mine += p.is_token_in_rank[static_cast<int64_t>(t) * R + rank];
        int before = 0, total = 0;
        CountScan(scan_storage).ExclusiveSum(mine, before, total);
        for (int t = begin; t < end; ++t) {
            const int64_t index = static_cast<int64_t>(t) * R + rank;
            p.send_slot[index] = p.is_token_in_rank[index] ? before++ : -1;
        }
        if (threadIdx.x == 0) send_counts[rank] = total;
        __syncthreads();  // scan storage is reused by the next destination
    }
}

// Warp `peer` writes this rank's announcement into the peer's count slot, then releases it.
__device__ void announce_counts(const NotifyParams& p, const int* send_counts, int epoch) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp >= p.num_ranks) return;
    const int peer = warp;
    auto* peer_signals = reinterpret_cast<NvlinkSignalArea*>(p.group.peers.base[peer]);
    CountSlot* slot = &peer_signals->count_slots[epoch & 1][p.group.wait.rank];
    for (int i = lane; i < p.num_ranks; i += 32) slot->tokens_to_rank[i] = send_counts[i];
    const int* experts = p.num_tokens_per_expert + peer * p.experts_per_rank;
    for (int i = lane; i < p.experts_per_rank; i += 32) slot->tokens_per_local_expert[i] = experts[i];
    fence_system();
    __syncwarp();
    if (lane == 0) store_release_system(&slot->epoch, epoch);
}

// Thread `src` (< R) waits for rank src's announcement. True in every thread once all arrived.
__device__ bool wait_for_announcements(const NotifyParams& p, int epoch) {
    bool arrived = true;
    if (threadIdx.x < p.num_ranks) {
        const int src = threadIdx.x;
        arrived = wait_epoch(&p.group.signals->count_slots[epoch & 1][src].epoch, epoch, p.group.wait,
                             kPhaseNotifyCounts, src);
    }
    return __syncthreads_and(arrived) != 0;
}

// The count matrix to device memory, this rank's receive counts to the host, then the ticket the
// host waits for (after a system fence, so the host never reads counts older than the ticket).
__device__ void publish_counts(const NotifyParams& p, int epoch) {
    const int R = p.num_ranks;
    Mailbox* mailbox = p.group.mailbox;
    const CountSlot* slots = p.group.signals->count_slots[epoch & 1];
    for (int i = threadIdx.x; i < R * R; i += blockDim.x)
        p.count_matrix[i] = slots[i / R].tokens_to_rank[i % R];
    for (int expert = threadIdx.x; expert < p.experts_per_rank; expert += blockDim.x) {
        int total = 0;
        for (int src = 0; src < R; ++src) total += slots[src].tokens_per_local_expert[expert];
        mailbox->tokens_per_local_expert[expert] = total;
    }
    if (threadIdx.x == 0) {
        int received = 0;
        for (int src = 0; src < R; ++src) received += slots[src].tokens_to_rank[p.group.wait.rank];
        mailbox->num_recv_tokens = received;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        mailbox->notify_ticket = p.host_ticket;
    }
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(NotifyParams p) {
    __shared__ CountScan::TempStorage scan_storage;
    __shared__ int send_counts[MAX_RANKS_PER_NODE];
    const int epoch = current_epoch(p.group.signals);
    // A group that already gave up: no counts, no ticket; the host finds the record and raises.
    if (__syncthreads_or(threadIdx.x == 0 && abort_seen_at_start(p.group.wait, kPhaseNotifyStart))) return;

    number_tokens_per_destination(p, scan_storage, send_counts);
    announce_counts(p, send_counts, epoch);
    if (!wait_for_announcements(p, epoch)) return;  // the host finds the timeout record and raises
    publish_counts(p, epoch);
}

}  // namespace

void launch_notify(const NotifyParams& params, cudaStream_t stream) {
    notify_kernel<<<1, kNotifyThreads, 0, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::intranode
