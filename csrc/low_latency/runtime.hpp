// LowLatencyRuntime: the host side of the low-latency family for one Buffer: its symmetric block
// (allocated by the caller through csrc/transport/nvshmem), the mappings of same-node peers, the
// timeout record, and every launch. Calls only enqueue work on the current stream: there is no
// host synchronisation anywhere, so calls can be captured in CUDA graphs.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/diagnostics.h"
#include "low_latency/params.h"

namespace deepep_megatron {
namespace low_latency {

// One dispatch: its outputs, and what the receive phase (run now or by the hook) needs.
struct DispatchCall {
    DispatchParams params{};
    int num_blocks = 0;
    bool received = false;
    at::Tensor x, topk_idx;  // inputs, kept alive until the receive
    at::Tensor recv_x;       // [E_local, R * T, H] e4m3 or bf16
    std::optional<at::Tensor>
        recv_scales;               // [E_local, R * T, G] float32 or [.., ceil(G / 4)] int32, column-major
    at::Tensor recv_count;         // [E_local] int32
    at::Tensor recv_src_info;      // [E_local, R * T] int32
    at::Tensor recv_route;         // [E_local, R * T] int32: src * 16 + top-k slot
    at::Tensor recv_layout_range;  // [E_local, R] int64
    std::optional<at::Tensor> cumulative_recv_stats, wait_recv_stats;
};

struct CombineCall {
    CombineParams params{};
    int num_blocks = 0;
    bool received = false;
    at::Tensor x, topk_idx, topk_weights, recv_count, recv_src_info, recv_route;  // kept alive
    at::Tensor combined_x;                                                        // [N, H] bf16
    std::optional<at::Tensor> wait_recv_stats;
};

class LowLatencyRuntime {
  public:
    // `block_address`: my symmetric block of `block_bytes`; `peer_bases[r]`: rank r's block mapped
    // into this process (same node), or 0 (another node: reached by NVSHMEM puts).
    LowLatencyRuntime(int rank, int num_ranks, int64_t block_address, int64_t block_bytes,
                      const std::vector<int64_t>& peer_bases, double timeout_seconds);
    ~LowLatencyRuntime();
    LowLatencyRuntime(const LowLatencyRuntime&) = delete;
    LowLatencyRuntime& operator=(const LowLatencyRuntime&) = delete;

    // Bytes a block needs for calls of these sizes (Buffer.get_low_latency_rdma_size_hint mirrors it).
    static int64_t required_bytes(int64_t max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts);

    std::shared_ptr<DispatchCall> dispatch(const at::Tensor& x, const at::Tensor& topk_idx,
                                           int64_t max_tokens, int64_t num_experts, bool use_fp8,
                                           bool round_scale, bool use_ue8m0, int64_t bank, int64_t num_sms,
                                           bool receive,
                                           const std::optional<at::Tensor>& cumulative_recv_stats,
                                           const std::optional<at::Tensor>& wait_recv_stats);
    void dispatch_receive(DispatchCall& call);

    std::shared_ptr<CombineCall> combine(const at::Tensor& x, const at::Tensor& topk_idx,
                                         const at::Tensor& topk_weights, const at::Tensor& recv_count,
                                         const at::Tensor& recv_src_info, const at::Tensor& recv_route,
                                         int64_t max_tokens, int64_t num_experts, int64_t bank,
                                         bool zero_copy, const std::optional<at::Tensor>& out,
                                         int64_t num_sms, bool receive,
                                         const std::optional<at::Tensor>& wait_recv_stats);
    void combine_receive(CombineCall& call);

    // [E_local, R * T, H] bf16 view of bank `bank`'s combine staging area (the zero-copy buffer).
    at::Tensor combine_buffer(int64_t bank, int64_t max_tokens, int64_t hidden, int64_t num_experts);

    // Zero both banks' signals and counters and the combine buffers, on the current stream. The
    // caller synchronises and waits for every rank before the next call (a collective reset).
    void clean(int64_t max_tokens, int64_t hidden, int64_t num_experts);

    // Throws DeviceTimeout if a wait of this buffer has timed out.
    void check_health();
    void destroy();

  private:
    Symmetric symmetric(int bank, int max_tokens, int hidden, int num_experts) const;
    WaitContext wait_context() const;
    void check_sizes(int64_t max_tokens, int64_t hidden, int64_t num_experts, int64_t num_sms) const;
    std::string describe_timeout() const;

    int rank_, num_ranks_, device_;
    uint8_t* block_;
    size_t block_bytes_;
    uint64_t* peer_bases_device_ = nullptr;  // [R]
    TimeoutRecord* record_ = nullptr;        // host-mapped
    TimeoutRecord* record_device_ = nullptr;
    long long timeout_ns_;
    int max_shared_bytes_ = 0;
    bool failed_ = false;
    bool destroyed_ = false;
};

}  // namespace low_latency
}  // namespace deepep_megatron
