// The arguments and results of the internode runtime's calls, one struct per call, bound to Python
// as classes with named fields (deepep_megatron/backends/internode.py fills them from Buffer's
// checked requests and the exchanged counts). N tokens, H hidden, R ranks, K top-k, S scales per
// row, `nodes` = R / ranks per node, T = the most tokens any rank sends in the call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace deepep_megatron::internode {

// A dispatch, fresh or cached (a cached one repeats a handle's routes without top-k).
struct DispatchArgs {
    at::Tensor x;                            // [N, H] bf16, or float8_e4m3fn with scales
    std::optional<at::Tensor> scales;        // [N, S] float32 (FP8 only)
    std::optional<at::Tensor> topk_idx;      // [N, K] int64 (fresh dispatches only)
    std::optional<at::Tensor> topk_weights;  // [N, K] float32 (with topk_idx)
    at::Tensor send_slot;                    // [N, R] int32: index among my tokens to each rank, -1
    at::Tensor node_slot;                    // [N, nodes] int32: index among my tokens to each node, -1
    at::Tensor count_matrix;                 // [R, R] int32 on the device, [src][dst] tokens
    at::Tensor own_node_tokens;              // [n] int32: my tokens to my own node, ascending
    std::vector<int64_t> records_from_node;  // [nodes]: tokens (node, my local index) sends to my node
    int64_t max_tokens = 0;                  // T
    int64_t max_recv_rows = 0;               // the most rows any rank returns (sizes the receive block)
    int64_t num_recv_rows = 0;               // rows this rank returns (num_worst_tokens, or received)
    int64_t num_recv_tokens = 0;             // rows this rank receives
    int64_t experts_per_rank = 0;            // 0 without top-k
    int64_t num_sms = 0;                     // blocks of each kernel
};

struct DispatchOutputs {
    at::Tensor recv_x;                            // [rows, H] payload dtype
    std::optional<at::Tensor> recv_scales;        // [rows, S] float32
    std::optional<at::Tensor> recv_topk_idx;      // [rows, K] int64, local expert ids, -1 elsewhere
    std::optional<at::Tensor> recv_topk_weights;  // [rows, K] float32, 0 where the id is -1
    at::Tensor recv_src_idx;                      // [rows] int32, -1 past the received rows
    at::Tensor forward_rows;                      // [nodes, T, ranks per node] int32 (for combine)
};

struct CombineArgs {
    at::Tensor x;                            // [rows, H] bf16: the rows this rank received
    std::optional<at::Tensor> topk_weights;  // [rows, K] float32, summed like x
    std::optional<at::Tensor> bias0;         // [N, H] bf16
    std::optional<at::Tensor> bias1;         // [N, H] bf16
    at::Tensor forward_rows;                 // from the dispatch's outputs
    at::Tensor node_slot;                    // from the dispatch's arguments
    std::vector<int64_t> records_from_node;  // as for the dispatch
    std::vector<int64_t> tokens_to_node;     // [nodes]: my tokens that went to each node
    int64_t max_tokens = 0;
    int64_t max_recv_rows = 0;
    int64_t num_recv_tokens = 0;  // rows of x that were received (the rest is padding)
    int64_t num_tokens = 0;       // N
    int64_t num_sms = 0;
};

struct CombineOutputs {
    at::Tensor combined_x;                       // [N, H] bf16
    std::optional<at::Tensor> combined_weights;  // [N, K] float32
};

}  // namespace deepep_megatron::internode
