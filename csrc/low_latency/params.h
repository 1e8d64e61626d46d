// Plain structs shared by the low-latency runtime (host) and its kernels: how a kernel reaches
// the symmetric block and its peers, where a timed-out wait reports, and the parameter blocks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "low_latency/layout.h"

namespace deepep_megatron {
namespace low_latency {

// Which halves of a call a launch runs: the hook launches RECEIVE alone after a SEND-only launch.
enum Phases : int { kPhaseSend = 1, kPhaseReceive = 2 };

// Waits, named in the timeout message.
enum WaitPhase : int {
    kWaitDispatchRelease = 1,  // sender waits for a receiver to free the bank (call before last)
    kWaitDispatchCount = 2,    // receiver waits for a source's token count
    kWaitDispatchData = 3,     // receiver waits for a source's tokens to arrive
    kWaitCombineRelease = 4,
    kWaitCombineData = 5,  // token owner waits for an expert rank's rows
};

// Host-mapped record of the first timeout, read by the host to raise TimeoutError.
struct TimeoutRecord {
    volatile int flag;
    volatile int rank, peer, phase;
    volatile long long expected, seen;
};

struct WaitContext {
    int* abort_flag;        // device memory: the first timeout sets it, every wait gives up
    TimeoutRecord* record;  // host-mapped
    long long timeout_ns;
    int rank;
};

// How this rank reaches the symmetric block of every rank.
struct Symmetric {
    uint8_t* base;              // my block (also the symmetric address puts are given)
    const uint64_t* peer_base;  // [R] peer's block in my address space; 0: another node (puts)
    size_t signal_offset;       // this call's bank signals, from base
    size_t data_offset;         // this call's bank data, from base
    SignalLayout signals;
    DataLayout data;
};

struct DispatchParams {
    const uint16_t* x;        // [N, H] bf16
    const int64_t* topk_idx;  // [N, K]
    int num_tokens, hidden, num_topk, num_experts, experts_per_rank, max_tokens, num_ranks, rank;
    bool fp8, round_scale, ue8m0;
    int phases;
    Symmetric sym;
    // Outputs (receive phase).
    uint8_t* recv_x;             // [E_local, R * T, H] e4m3 or bf16
    void* recv_scales;           // float [E_local, G, R * T] or packed UE8M0 int [E_local, W, R * T]
    int* recv_count;             // [E_local]
    int* recv_src_info;          // [E_local, R * T] source token, -1 past the count
    int* recv_route;             // [E_local, R * T] src * kMaxTopk + top-k slot, -1 past the count
    int64_t* recv_layout_range;  // [E_local, R] (begin << 32) | count
    int* cumulative_recv_stats;  // [E_local] or null
    int64_t* wait_recv_stats;    // [R] or null
    WaitContext wait;
};

struct CombineParams {
    const uint16_t* x;          // [E_local, R * T, H] bf16 (the zero-copy buffer when zero_copy)
    const int64_t* topk_idx;    // [N, K]
    const float* topk_weights;  // [N, K]
    const int* recv_count;      // [E_local] of the dispatch
    const int* recv_src_info;   // [E_local, R * T]
    const int* recv_route;      // [E_local, R * T]
    uint16_t* combined_x;       // [N, H] bf16
    int64_t* wait_recv_stats;   // [R] or null
    int num_tokens, hidden, num_topk, num_experts, experts_per_rank, max_tokens, num_ranks, rank;
    bool zero_copy;
    int phases;
    Symmetric sym;
    WaitContext wait;
};

}  // namespace low_latency
}  // namespace deepep_megatron
