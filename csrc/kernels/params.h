// Plain structs shared by host code and kernels: the signal area of a rank's registered region,
// the diagnostics record a timed-out wait leaves for the host, and kernel parameter blocks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deepep_megatron {

constexpr int kMaxRanks = 8;          // one NVLink domain
constexpr int kMaxBlocks = 160;       // >= SMs on any Hopper part
constexpr int kMaxTopk = 16;
constexpr int kMaxLocalExperts = 1024;
constexpr int kRegionAlignment = 256;
constexpr size_t kSignalAreaBytes = size_t(1) << 20;

// One rank's announcement to a peer during notify: how many tokens it sends to every rank (so
// every rank can build the whole [src, dst] count matrix) and its selections per expert of the
// receiving rank. `epoch` is written last, with release semantics.
struct CountSlot {
    int epoch;
    int tokens_to_rank[kMaxRanks];
    int tokens_per_local_expert[kMaxLocalExperts];
    int padding[7];
};

// Layout of the first kSignalAreaBytes of every rank's region. Peers write into it remotely;
// flags are epochs compared as "reached" ((int)(flag - epoch) >= 0), never reset.
struct SignalArea {
    // Local bookkeeping, touched only by this rank's kernels.
    int epoch;            // epoch of the last completed operation
    int blocks_done;      // ticket for "last block of the grid"
    int abort;            // set by a timed-out wait so that the other waits give up too
    int padding0[29];
    // Written by peers.
    CountSlot count_slots[2][kMaxRanks];               // [epoch parity][src]
    unsigned long long recv_offset[kMaxRanks];         // [src] (epoch << 32) | (offset / alignment)
    unsigned long long combine_x_offset[kMaxRanks];    // [src] same packing
    unsigned long long combine_w_offset[kMaxRanks];    // [src] same packing, offset 0 = none
    int dispatch_done[kMaxRanks][kMaxBlocks];          // [src][block] epoch
    int combine_done[kMaxRanks][kMaxBlocks];           // [src][block] epoch
};
static_assert(sizeof(SignalArea) <= kSignalAreaBytes, "signal area too large");

// Host-mapped memory: results the host waits for, and the first timeout's diagnostics.
struct HostMailbox {
    volatile int notify_ticket;            // set after the fields below are written
    volatile int num_recv_tokens;
    volatile int tokens_per_local_expert[kMaxLocalExperts];
    volatile int timeout_flag;             // 1 once a wait timed out; fields below describe it
    volatile int timeout_rank;
    volatile int timeout_peer;
    volatile int timeout_phase;            // WaitPhase
    volatile int timeout_expected;
    volatile int timeout_seen;
    volatile int overflow_rows;            // > 0: a worst-case dispatch had more rows than that
};

enum WaitPhase : int {
    kPhaseNotifyCounts = 1,
    kPhaseDispatchOffsets = 2,
    kPhaseDispatchData = 3,
    kPhaseCombineOffsets = 4,
    kPhaseCombineDone = 5,
};

// Base addresses of every rank's region in this process's address space.
struct PeerRegions {
    uint8_t* base[kMaxRanks];
};

// Where one rank's output block for a dispatch lies, relative to the block start.
struct RecvBlockLayout {
    size_t x_offset, scales_offset, topk_idx_offset, topk_weights_offset, src_idx_offset, total_bytes;
};

inline size_t align_region(size_t bytes) {
    return (bytes + kRegionAlignment - 1) / kRegionAlignment * kRegionAlignment;
}

// The receive block of `num_rows` rows. Computed identically by the receiver (to allocate it)
// and by every sender (to write into it).
#ifdef __CUDACC__
__host__ __device__
#endif
inline RecvBlockLayout recv_block_layout(int num_rows, int row_bytes, int num_scales, int num_topk) {
    RecvBlockLayout layout{};
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
        size_t offset = cursor;
        cursor += (bytes + kRegionAlignment - 1) / kRegionAlignment * kRegionAlignment;
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

// Everything the waits of one kernel need to time out cleanly and say why.
struct WaitContext {
    SignalArea* local_signals;
    HostMailbox* mailbox;
    long long timeout_ns;
    int rank;
};

struct NotifyParams {
    const bool* is_token_in_rank;       // [N, R]
    const int* num_tokens_per_expert;   // [E]
    int* send_slot;                     // [N, R] out
    int* count_matrix;                  // [R, R] out, [src][dst]
    int num_tokens, num_ranks, experts_per_rank;
    int host_ticket;
    PeerRegions peers;
    WaitContext wait;
};

struct DispatchParams {
    const uint8_t* x;                   // [N, row_bytes]
    const uint8_t* scales;              // [N, num_scales * 4] or null
    const int64_t* topk_idx;            // [N, K] or null
    const float* topk_weights;          // [N, K] or null
    const int* send_slot;               // [N, R]
    const int* count_matrix;            // [R, R]
    int num_tokens, row_bytes, num_scales, num_topk, num_ranks, experts_per_rank;
    int num_worst_tokens;               // > 0: every receive block has this many rows
    size_t my_recv_offset;              // my receive block, relative to my region base
    PeerRegions peers;
    WaitContext wait;
};

struct CombineParams {
    const int* send_slot;               // [N, R]
    const int* count_matrix;            // [R, R]
    const uint16_t* bias0;              // [N, H] bf16 or null
    const uint16_t* bias1;              // [N, H] bf16 or null
    uint16_t* combined_x;               // [N, H] bf16 out
    float* combined_weights;            // [N, K] out or null
    int num_tokens, hidden, num_topk, num_ranks;
    size_t my_x_offset;                 // my combine input, relative to my region base
    size_t my_w_offset;                 // my top-k weights input, 0 when absent
    PeerRegions peers;
    WaitContext wait;
};

struct LayoutParams {
    const int64_t* topk_idx;            // [N, K]
    int* num_tokens_per_rank;           // [R] out, zeroed
    int* num_tokens_per_expert;         // [E] out, zeroed
    bool* is_token_in_rank;             // [N, R] out
    int num_tokens, num_topk, num_ranks, num_experts;
};

}  // namespace deepep_megatron
