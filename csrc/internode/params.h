// Plain structs shared by the internode runtime (host) and its kernels: how a kernel reaches the
// group (its block, its node's blocks, the PEs of its same-index peers) and the parameter blocks
// of the four kernels.
#pragma once

#include <cstdint>

#include "common/limits.h"
#include "device/wait_context.h"
#include "internode/layout.h"

namespace deepep_megatron::internode {

// This rank in the group and how it reaches the others.
struct Group {
    int rank, num_ranks;
    int ranks_per_node, num_nodes;
    int node, local;  // rank = node * ranks_per_node + local
    uint8_t* base;    // my symmetric block (also the address NVSHMEM puts and signals are given)
    uint8_t* node_peer[MAX_RANKS_PER_NODE];  // the blocks of my node's ranks, mapped (mine included)
    WaitContext wait;
};

// Rank (node, local) of the group as an NVSHMEM PE (PE numbers are group ranks).
__host__ __device__ inline int pe_of(const Group& g, int node) {
    return node * g.ranks_per_node + g.local;
}

// A dispatch: the send kernel writes records and puts them; the forward kernel places the records
// that reached this rank (and its own node's) into the receive blocks of its node's ranks.
struct DispatchParams {
    const uint8_t* x;            // [N, row_bytes]
    const float* scales;         // [N, num_scales] or null
    const int64_t* topk_idx;     // [N, K] or null
    const float* topk_weights;   // [N, K] or null
    const int* send_slot;        // [N, R]: the token's index among my tokens to each rank, -1 if none
    const int* node_slot;        // [N, nodes]: its index among my tokens to each node, -1 if none
    const int* count_matrix;     // [R, R] [src][dst] tokens
    const int* own_node_tokens;  // [records_from_node[node]]: my tokens to my node, ascending
    int* forward_rows;           // [nodes, max_tokens, ranks_per_node] out: row of each record I forward
    int num_tokens, row_bytes, num_scales, num_topk;
    int experts_per_rank;                          // 0 without top-k
    int max_tokens;                                // landing slots per source node
    int records_from_node[MAX_NODES];              // records (node, my local) sends to my node
    unsigned long long arrivals_total[MAX_NODES];  // dispatch_arrived value once they are all in
    int operation;
    DispatchAreas areas;
    Group group;
};

// A combine: the pull kernel sums, per record this rank forwarded, the rows its node's ranks
// return and sends the fp32 partial to the token's home rank; the reduce kernel adds the partials
// of its own tokens, node by node, and the biases.
struct CombineParams {
    const int* forward_rows;           // [nodes, max_tokens, ranks_per_node] from the dispatch
    const int* node_slot;              // [N, nodes] from the dispatch
    const uint16_t* bias0;             // [N, H] bf16 or null
    const uint16_t* bias1;             // [N, H] bf16 or null
    uint16_t* combined_x;              // [N, H] bf16 out
    float* combined_weights;           // [N, K] out or null
    int num_tokens, hidden, num_topk;  // num_topk: 0 without weights
    int max_tokens;
    int records_from_node[MAX_NODES];              // records I forwarded, per source node
    int tokens_to_node[MAX_NODES];                 // my tokens that went to each node
    unsigned long long arrivals_total[MAX_NODES];  // combine_arrived value once they are all in
    int operation;
    CombineAreas areas;
    Group group;
};

}  // namespace deepep_megatron::internode
