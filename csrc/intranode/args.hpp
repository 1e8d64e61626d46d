// The arguments and results of the intranode host entry points, one struct per call, bound to
// Python as classes with named fields (deepep_megatron/backends/intranode.py builds them from the
// checked requests of Buffer). Shapes use N tokens, H hidden, R ranks, K top-k, S scales per row.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace deepep_megatron::intranode {

// A dispatch that computes its layout: count exchange, host sync (unless num_worst_tokens > 0).
struct FreshDispatchArgs {
    at::Tensor x;                            // [N, H] bf16, or [N, H] float8_e4m3fn with scales
    std::optional<at::Tensor> scales;        // [N, S] float32 (FP8 only)
    std::optional<at::Tensor> topk_idx;      // [N, K] int64, -1 = no expert
    std::optional<at::Tensor> topk_weights;  // [N, K] float32 (with topk_idx)
    at::Tensor is_token_in_rank;             // [N, R] bool
    at::Tensor num_tokens_per_expert;        // [E] int32, E = R * experts per rank
    int64_t num_worst_tokens = 0;            // > 0: outputs sized for the worst case, no host sync
    int64_t expert_alignment = 1;            // per-expert counts rounded up to this
    int64_t num_sms = 0;                     // blocks of the dispatch kernel
};

// A dispatch that repeats the layout of an earlier one (from its handle): no count exchange.
struct CachedDispatchArgs {
    at::Tensor x;                      // [N, H] as in the fresh dispatch
    std::optional<at::Tensor> scales;  // [N, S] float32 (FP8 only)
    at::Tensor count_matrix;           // [R, R] int32 from the handle
    at::Tensor send_slot;              // [N, R] int32 from the handle
    int64_t num_recv_rows = 0;         // rows of this rank's receive block (from the handle)
    int64_t num_worst_tokens = 0;      // the fresh dispatch's (> 0: rows past those received are unused)
    int64_t num_sms = 0;
};

struct CombineArgs {
    at::Tensor x;                            // [rows, H] bf16: the rows this rank received
    std::optional<at::Tensor> topk_weights;  // [rows, K] float32, summed like x
    std::optional<at::Tensor> bias0;         // [N, H] bf16, added to the result
    std::optional<at::Tensor> bias1;         // [N, H] bf16, added after bias0
    at::Tensor send_slot;                    // [N, R] int32 from the handle
    at::Tensor count_matrix;                 // [R, R] int32 from the handle
    int64_t num_tokens = 0;                  // N
    int64_t num_sms = 0;
};

struct DispatchOutputs {
    at::Tensor recv_x;                                // [rows, H] payload dtype
    std::optional<at::Tensor> recv_scales;            // [rows, S] float32
    std::optional<at::Tensor> recv_topk_idx;          // [rows, K] int64
    std::optional<at::Tensor> recv_topk_weights;      // [rows, K] float32
    at::Tensor recv_src_idx;                          // [rows] int32
    at::Tensor count_matrix;                          // [R, R] int32
    at::Tensor send_slot;                             // [N, R] int32
    int64_t num_recv_tokens = -1;                     // -1 when not synced
    std::vector<int64_t> num_recv_tokens_per_expert;  // aligned; empty when not synced
    bool zero_copy = false;                           // outputs live in the arena
};

struct CombineOutputs {
    at::Tensor combined_x;                       // [N, H] bf16
    std::optional<at::Tensor> combined_weights;  // [N, K] float32
};

}  // namespace deepep_megatron::intranode
