// Plain structs shared by the intranode host code and kernels: the signal area at the start of
// every rank's registered region, the host-mapped mailbox, the receive-block layout and the
// kernels' parameter blocks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/diagnostics.h"
#include "common/host_device.h"
#include "common/limits.h"
#include "device/wait_context.h"
#include "transport/peer_regions.h"

namespace deepep_megatron::intranode {

// Bytes reserved for NvlinkSignalArea at the start of every rank's region.
constexpr size_t kSignalAreaBytes = size_t(1) << 20;

// One rank's announcement to a peer during notify: how many tokens it sends to every rank (so
// every rank can build the whole [src, dst] count matrix) and its selections per expert of the
// receiving rank. `epoch` is written last, with release semantics.
struct CountSlot {
    int epoch;
    int tokens_to_rank[MAX_RANKS_PER_NODE];
    int tokens_per_local_expert[MAX_LOCAL_EXPERTS];
    int padding[7];
};

// The first kSignalAreaBytes of every rank's region: one slot per rank of the NVLink domain.
// Peers write into it remotely; flags are epochs compared as "reached", never reset.
struct NvlinkSignalArea {
    // Local bookkeeping, touched only by this rank's kernels (and `wait.abort` by any rank).
    int epoch;         // epoch of the last completed operation
    int blocks_done;   // ticket for "last block of the grid"
    WaitControl wait;  // abort word and operation clock of the bounded waits
    int padding0[26];
    // Written by peers.
    CountSlot count_slots[2][MAX_RANKS_PER_NODE];             // [epoch parity][src]
    unsigned long long recv_offset[MAX_RANKS_PER_NODE];       // [src] (epoch << 32) | (offset / alignment)
    unsigned long long combine_x_offset[MAX_RANKS_PER_NODE];  // [src] same packing
    unsigned long long combine_w_offset[MAX_RANKS_PER_NODE];  // [src] same packing, offset 0 = none
    int dispatch_done[MAX_RANKS_PER_NODE][kMaxBlocks];        // [src][block] epoch
    int combine_done[MAX_RANKS_PER_NODE][kMaxBlocks];         // [src][block] epoch
};
static_assert(offsetof(NvlinkSignalArea, count_slots) == 128, "the bookkeeping header is 128 bytes");
static_assert(sizeof(NvlinkSignalArea) <= kSignalAreaBytes, "signal area too large");

// Host-mapped memory of one rank: results the host waits for, and the timeout record.
struct Mailbox {
    volatile int notify_ticket;  // set after the two fields below are written
    volatile int num_recv_tokens;
    volatile int tokens_per_local_expert[MAX_LOCAL_EXPERTS];
    volatile int overflow_rows;  // > 0: a worst-case dispatch had more rows than that
    TimeoutRecord timeout;
};

// Where one rank's output block for a dispatch lies, relative to the block start.
struct RecvBlockLayout {
    size_t x_offset, scales_offset, topk_idx_offset, topk_weights_offset, src_idx_offset, total_bytes;
};

// The receive block of `num_rows` rows. Computed identically by the receiver (to allocate it)
// and by every sender (to write into it).
DEEPEP_HOST_DEVICE inline RecvBlockLayout recv_block_layout(int num_rows, int row_bytes, int num_scales,
                                                            int num_topk) {
    RecvBlockLayout layout{};
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
        size_t offset = cursor;
        cursor += (bytes + REGION_ALIGNMENT - 1) / REGION_ALIGNMENT * REGION_ALIGNMENT;
        return offset;
    };
    size_t rows = static_cast<size_t>(num_rows);
    layout.x_offset = take(rows * row_bytes);
    layout.scales_offset = take(rows * num_scales * 4);
    layout.topk_idx_offset = take(rows * num_topk * 8);
    layout.topk_weights_offset = take(rows * num_topk * 4);
    layout.src_idx_offset = take(rows * 4);
    layout.total_bytes = cursor;
    return layout;
}

// What every kernel that talks to peers gets: their regions, this rank's signal area and mailbox,
// and the context of its bounded waits.
struct GroupParams {
    PeerRegions peers;
    NvlinkSignalArea* signals;  // this rank's
    Mailbox* mailbox;           // this rank's, device mapping
    WaitContext wait;
};

struct NotifyParams {
    const bool* is_token_in_rank;      // [N, R]
    const int* num_tokens_per_expert;  // [E]
    int* send_slot;                    // [N, R] out
    int* count_matrix;                 // [R, R] out, [src][dst]
    int num_tokens, num_ranks, experts_per_rank;
    int host_ticket;
    GroupParams group;
};

struct DispatchParams {
    const uint8_t* x;           // [N, row_bytes]
    const uint8_t* scales;      // [N, num_scales * 4] or null
    const int64_t* topk_idx;    // [N, K] or null
    const float* topk_weights;  // [N, K] or null
    const int* send_slot;       // [N, R]
    const int* count_matrix;    // [R, R]
    int num_tokens, row_bytes, num_scales, num_topk, num_ranks, experts_per_rank;
    int num_worst_tokens;   // > 0: every receive block has this many rows
    size_t my_recv_offset;  // my receive block, relative to my region base
    GroupParams group;
};

struct CombineParams {
    const int* send_slot;     // [N, R]
    const int* count_matrix;  // [R, R]
    const uint16_t* bias0;    // [N, H] bf16 or null
    const uint16_t* bias1;    // [N, H] bf16 or null
    uint16_t* combined_x;     // [N, H] bf16 out
    float* combined_weights;  // [N, K] out or null
    int num_tokens, hidden, num_topk, num_ranks;
    size_t my_x_offset;  // my combine input, relative to my region base
    size_t my_w_offset;  // my top-k weights input, 0 when absent
    GroupParams group;
};

struct LayoutParams {
    const int64_t* topk_idx;     // [N, K]
    int* num_tokens_per_rank;    // [R] out, zeroed
    int* num_tokens_per_expert;  // [E] out, zeroed
    bool* is_token_in_rank;      // [N, R] out
    int num_tokens, num_topk, num_ranks, num_experts;
};

}  // namespace deepep_megatron::intranode
