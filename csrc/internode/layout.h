// Where everything of the internode family lies in a rank's symmetric (NVSHMEM) block.
//
// Every rank allocates the same block with nvshmem_malloc, so an offset names the same place on
// every rank: a rank of the same node is reached at its mapped base + offset (loads and stores), a
// rank of another node by an NVSHMEM put to my base + offset on its PE.
//
//   [ SignalArea | data ]
//
// The signal area is fixed (words peers write, never reset: flags carry operation numbers,
// arrival counters only grow). The data part is laid out per call from the call's sizes, which
// every rank derives from the same exchanged counts; a dispatch and a combine each lay out their
// own areas from the start of the data part (an operation's areas are only in use while it runs,
// and a peer writes into them only after this rank has announced the operation, see README.md):
//
//   dispatch: staging [T] records | landing [nodes][T] records | receive block (max received rows)
//   combine:  input (max received rows) | partial staging [nodes][T] | partial landing [nodes][T]
//
// T is the most tokens any rank sends in the call. A record is one token as it crosses the
// network: a header (source token, the token's row at every rank of the group, -1 where it does
// not go), the payload, its FP8 scales, its top-k ids and weights, each 16-byte aligned. A partial
// is one token's fp32 sum over the ranks of one node, then its summed top-k weights.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/host_device.h"
#include "common/limits.h"
#include "device/wait_context.h"

namespace deepep_megatron::internode {

// Ranks of the largest group: the per-rank row table of a record is sized by the group.
constexpr int kMaxRanks = MAX_NODES * MAX_RANKS_PER_NODE;
constexpr size_t kRecordAlignment = 16;

DEEPEP_HOST_DEVICE inline size_t align_to(size_t bytes, size_t alignment) {
    return (bytes + alignment - 1) / alignment * alignment;
}

// ------------------------------------------------------------------------------------ signals
// Flags hold the operation number (the host counts this rank's dispatches and combines together;
// every rank makes the same calls, so numbers agree) and are compared as "reached"; counters are
// cumulative arrivals (the host keeps the totals to wait for).
struct SignalArea {
    WaitControl wait;  // abort word and operation clock of the bounded waits
    int tickets[4];    // per kernel kind: blocks that finished (the last one resets it)
    int padding[4];
    // Written by ranks of other nodes (NVSHMEM signals), indexed by their node.
    unsigned long long dispatch_arrived[MAX_NODES];  // records from (node, my local index), +1 each
    unsigned long long combine_arrived[MAX_NODES];   // partial sums from (node, my local index), +1 each
    unsigned long long landing_free[MAX_NODES];      // (node, my local index) may receive my records
    unsigned long long partials_free[MAX_NODES];     // (node, my local index) may receive my partials
    // Written by ranks of my node (stores through the mapping), indexed by their local index.
    unsigned long long receive_free[MAX_RANKS_PER_NODE];  // its receive block may be written
    unsigned long long forward_done[MAX_RANKS_PER_NODE];  // it finished writing into receive blocks
    unsigned long long input_ready[MAX_RANKS_PER_NODE];   // its combine input is in place
    unsigned long long pull_done[MAX_RANKS_PER_NODE];     // it finished reading combine inputs
};

// Kinds of kernel, for SignalArea::tickets.
enum KernelTicket : int { kTicketSend = 0, kTicketForward = 1, kTicketPull = 2, kTicketReduce = 3 };

constexpr size_t kDataStart = 4096;
static_assert(sizeof(SignalArea) <= kDataStart, "the signal area fits before the data");

// ------------------------------------------------------------------------------------ rows
struct RecordLayout {
    size_t rows;          // int32 [num_ranks]: the token's row at every rank, -1 where not sent
    size_t payload;       // row_bytes
    size_t scales;        // float32 [num_scales]
    size_t topk_idx;      // int64 [num_topk], global expert ids
    size_t topk_weights;  // float32 [num_topk]
    size_t bytes;         // the whole record, 16-byte aligned
};

// Header: int32 source token, 3 spare int32, then the row table.
DEEPEP_HOST_DEVICE inline RecordLayout record_layout(int num_ranks, int row_bytes, int num_scales,
                                                     int num_topk) {
    RecordLayout layout{};
    size_t cursor = 16;
    auto take = [&cursor](size_t bytes) {
        const size_t offset = cursor;
        cursor += align_to(bytes, kRecordAlignment);
        return offset;
    };
    layout.rows = take(static_cast<size_t>(num_ranks) * 4);
    layout.payload = take(static_cast<size_t>(row_bytes));
    layout.scales = take(static_cast<size_t>(num_scales) * 4);
    layout.topk_idx = take(static_cast<size_t>(num_topk) * 8);
    layout.topk_weights = take(static_cast<size_t>(num_topk) * 4);
    layout.bytes = cursor;
    return layout;
}

// One token's fp32 partial sum over one node's ranks: [hidden] then [num_topk] summed weights.
struct PartialLayout {
    size_t topk_weights;
    size_t bytes;
};
DEEPEP_HOST_DEVICE inline PartialLayout partial_layout(int hidden, int num_topk) {
    const size_t values = align_to(static_cast<size_t>(hidden) * 4, kRecordAlignment);
    return PartialLayout{values, values + align_to(static_cast<size_t>(num_topk) * 4, kRecordAlignment)};
}

// The rows a rank receives, in final order (source rank, then token): what dispatch returns.
struct ReceiveLayout {
    size_t x, scales, topk_idx, topk_weights, src_idx, bytes;
};
DEEPEP_HOST_DEVICE inline ReceiveLayout receive_layout(int num_rows, int row_bytes, int num_scales,
                                                       int num_topk) {
    ReceiveLayout layout{};
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
        const size_t offset = cursor;
        cursor += align_to(bytes, REGION_ALIGNMENT);
        return offset;
    };
    const size_t rows = static_cast<size_t>(num_rows);
    layout.x = take(rows * row_bytes);
    layout.scales = take(rows * num_scales * 4);
    layout.topk_idx = take(rows * num_topk * 8);
    layout.topk_weights = take(rows * num_topk * 4);
    layout.src_idx = take(rows * 4);
    layout.bytes = cursor;
    return layout;
}

// A combine's input at every rank: the rows it received (bf16) and their top-k weights.
struct InputLayout {
    size_t x, topk_weights, bytes;
};
DEEPEP_HOST_DEVICE inline InputLayout input_layout(int num_rows, int hidden, int num_topk) {
    const size_t x_bytes = align_to(static_cast<size_t>(num_rows) * hidden * 2, REGION_ALIGNMENT);
    return InputLayout{0, x_bytes,
                       x_bytes + align_to(static_cast<size_t>(num_rows) * num_topk * 4, REGION_ALIGNMENT)};
}

// ------------------------------------------------------------------------------------ areas
// Offsets from the block base.
struct DispatchAreas {
    size_t staging, landing, receive, end;
    RecordLayout record;
};
DEEPEP_HOST_DEVICE inline DispatchAreas dispatch_areas(int max_tokens, int max_recv_rows, int row_bytes,
                                                       int num_scales, int num_topk, int num_ranks,
                                                       int num_nodes) {
    DispatchAreas areas{};
    areas.record = record_layout(num_ranks, row_bytes, num_scales, num_topk);
    const size_t tokens = static_cast<size_t>(max_tokens);
    areas.staging = kDataStart;
    areas.landing = areas.staging + align_to(tokens * areas.record.bytes, REGION_ALIGNMENT);
    areas.receive = areas.landing + align_to(num_nodes * tokens * areas.record.bytes, REGION_ALIGNMENT);
    areas.end = areas.receive + receive_layout(max_recv_rows, row_bytes, num_scales, num_topk).bytes;
    return areas;
}

struct CombineAreas {
    size_t input, partial_staging, partial_landing, end;
    InputLayout input_rows;  // laid out for the most rows any rank received
    PartialLayout partial;
};
DEEPEP_HOST_DEVICE inline CombineAreas combine_areas(int max_tokens, int max_recv_rows, int hidden,
                                                     int num_topk, int num_nodes) {
    CombineAreas areas{};
    areas.input_rows = input_layout(max_recv_rows, hidden, num_topk);
    areas.partial = partial_layout(hidden, num_topk);
    const size_t partials = static_cast<size_t>(num_nodes) * max_tokens * areas.partial.bytes;
    areas.input = kDataStart;
    areas.partial_staging = areas.input + areas.input_rows.bytes;
    areas.partial_landing = areas.partial_staging + align_to(partials, REGION_ALIGNMENT);
    areas.end = areas.partial_landing + align_to(partials, REGION_ALIGNMENT);
    return areas;
}

}  // namespace deepep_megatron::internode
