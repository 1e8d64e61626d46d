// IntranodeRuntime: one rank's registered region, its peers' mappings, and the host side of the
// layout, dispatch and combine kernels.
//
// Region of every rank (one cudaMalloc, IPC-mapped by all peers):
//   [signal area | staging | arena]
// The arena holds dispatch outputs handed to the user (zero copy); staging receives when the
// arena is full (then copied out) and holds combine inputs that are not already in the region.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "arena.hpp"
#include "kernels/params.h"

namespace deepep_megatron {

// Raised (as a Python TimeoutError) when a device-side wait or the host sync times out.
class DeviceTimeout : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

struct DispatchOutputs {
    at::Tensor recv_x;                          // [rows, H] payload dtype
    std::optional<at::Tensor> recv_scales;      // [rows, S] float32
    std::optional<at::Tensor> recv_topk_idx;    // [rows, K] int64
    std::optional<at::Tensor> recv_topk_weights;// [rows, K] float32
    at::Tensor recv_src_idx;                    // [rows] int32
    at::Tensor count_matrix;                    // [R, R] int32
    at::Tensor send_slot;                       // [N, R] int32
    int64_t num_recv_tokens;                    // -1 when not synced
    std::vector<int64_t> num_recv_tokens_per_expert;  // aligned; empty when not synced
    bool zero_copy;                             // outputs live in the arena
};

class IntranodeRuntime {
public:
    IntranodeRuntime(int rank, int num_ranks, int64_t staging_bytes, int64_t arena_bytes, double timeout_seconds);
    ~IntranodeRuntime();
    IntranodeRuntime(const IntranodeRuntime&) = delete;
    IntranodeRuntime& operator=(const IntranodeRuntime&) = delete;

    std::string ipc_handle() const;
    void open_peers(const std::vector<std::string>& handles);

    // [R] int32, [E] int32, [N, R] bool.
    std::tuple<at::Tensor, at::Tensor, at::Tensor> layout(const at::Tensor& topk_idx, int64_t num_experts);

    // Fresh dispatch when `cached_count_matrix` is empty, else cached (layout from the handle).
    DispatchOutputs dispatch(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
                             const std::optional<at::Tensor>& is_token_in_rank,
                             const std::optional<at::Tensor>& num_tokens_per_expert,
                             const std::optional<at::Tensor>& cached_count_matrix,
                             const std::optional<at::Tensor>& cached_send_slot, int64_t cached_num_rows,
                             int64_t num_worst_tokens,
                             int64_t expert_alignment, int64_t num_sms);

    // combined_x [N, H] bf16, combined_weights [N, K] float32 or none.
    std::tuple<at::Tensor, std::optional<at::Tensor>> combine(
        const at::Tensor& x, const std::optional<at::Tensor>& topk_weights, const std::optional<at::Tensor>& bias0,
        const std::optional<at::Tensor>& bias1, const at::Tensor& send_slot, const at::Tensor& count_matrix,
        int64_t num_tokens, int64_t num_sms);

    // Throws DeviceTimeout if any wait of this rank has timed out.
    void check_health();
    void destroy();

    int64_t staging_bytes() const { return static_cast<int64_t>(staging_bytes_); }
    int64_t arena_bytes_in_use() const { return static_cast<int64_t>(arena_->bytes_in_use()); }

private:
    WaitContext wait_context() const;
    PeerRegions peer_regions() const;
    void wait_for_notify(int ticket);
    std::string describe_timeout() const;
    at::Tensor view_in_region(std::shared_ptr<ArenaBlock> block, size_t offset, at::IntArrayRef sizes,
                              at::ScalarType dtype) const;
    size_t place_in_region(const at::Tensor& tensor, size_t staging_offset, cudaStream_t stream);

    int rank_, num_ranks_, device_;
    size_t staging_offset_, staging_bytes_, arena_offset_;
    std::shared_ptr<void> region_owner_;
    uint8_t* region_ = nullptr;
    std::shared_ptr<Arena> arena_;
    HostMailbox* mailbox_ = nullptr;
    HostMailbox* mailbox_device_ = nullptr;
    std::vector<uint8_t*> peer_bases_;
    long long timeout_ns_;
    int host_ticket_ = 0;
    bool peers_open_ = false;
    bool failed_ = false;
    bool destroyed_ = false;
};

}  // namespace deepep_megatron
