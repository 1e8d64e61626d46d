// intranode::Runtime: the host side of the intranode family for one rank (Python:
// _C.IntranodeRuntime). It is composed of
//   - an IpcRegion: this rank's registered region, mapped by every peer, and the peers' regions;
//   - the signal area at the start of the region (NvlinkSignalArea, zeroed, flags never reset);
//   - the staging area and the Arena (zero-copy dispatch outputs) after it;
//   - a host-mapped Mailbox (receive counts for the host sync, the timeout record).
//
// Region of every rank: [ signal area (kSignalAreaBytes) | staging | arena ]
// The arena holds dispatch outputs handed to the user (zero copy); staging receives when the
// arena is full (then copied out) and holds combine inputs that are not already in the region.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/arena.hpp"
#include "common/host_mapped.hpp"
#include "intranode/args.hpp"
#include "intranode/params.h"
#include "transport/ipc_region.hpp"

namespace deepep_megatron::intranode {

class Runtime {
  public:
    Runtime(int rank, int num_ranks, int64_t staging_bytes, int64_t arena_bytes, double timeout_seconds);
    ~Runtime();
    Runtime(const Runtime&) = delete;
    Runtime& operator=(const Runtime&) = delete;

    std::string ipc_handle() const { return region_.export_handle(); }
    void open_peers(const std::vector<std::string>& handles) { region_.open_peers(handles); }

    // topk_idx [N, K] int64 -> ([R] int32 tokens per rank, [E] int32 tokens per expert, [N, R] bool).
    std::tuple<at::Tensor, at::Tensor, at::Tensor> layout(const at::Tensor& topk_idx, int64_t num_experts);
    DispatchOutputs dispatch_fresh(const FreshDispatchArgs& args);
    DispatchOutputs dispatch_cached(const CachedDispatchArgs& args);
    CombineOutputs combine(const CombineArgs& args);

    // Unmaps the peers and frees what only this runtime uses; the region lives on while arena
    // tensors view it. Idempotent.
    void destroy();

    int64_t staging_bytes() const { return static_cast<int64_t>(staging_bytes_); }
    int64_t arena_bytes_in_use() const { return static_cast<int64_t>(arena_->bytes_in_use()); }

  private:
    // What a dispatch kernel needs beyond the layout, with its inputs made contiguous.
    struct DispatchInputs {
        at::Tensor x;                      // [N, H]
        std::optional<at::Tensor> scales;  // [N, S]
        std::optional<at::Tensor> topk_idx, topk_weights;
        int experts_per_rank = 0;
        int64_t num_rows = 0;          // rows of this rank's receive block
        int64_t num_worst_tokens = 0;  // > 0: every receive block has this many rows
        int64_t num_sms = 0;
    };
    // Where this call's receive block lies: in the arena (zero copy) or in staging.
    struct ReceiveBlock {
        size_t offset;
        RecvBlockLayout layout;
        std::shared_ptr<ArenaBlock> arena_block;  // null in staging
    };

    // Raises before any launch if the runtime is unusable: destroyed, peers not open, or an earlier
    // wait of this rank gave up (the buffer stays failed). Also reports worst-case overflows.
    void check_health();
    void check_launch(int64_t num_sms);
    GroupParams group_params() const;
    [[noreturn]] void fail(const std::string& message);

    void launch_count_exchange(const FreshDispatchArgs& args, const at::Tensor& send_slot,
                               const at::Tensor& count_matrix, int experts_per_rank, cudaStream_t stream);
    void wait_for_count_exchange();
    void read_receive_counts(int experts_per_rank, int64_t expert_alignment, DispatchOutputs& out) const;
    DispatchOutputs run_dispatch(const DispatchInputs& in, DispatchOutputs out, cudaStream_t stream);
    ReceiveBlock take_receive_block(const RecvBlockLayout& layout, cudaStream_t stream);
    void mark_rows_unused(const ReceiveBlock& block, int64_t num_rows, int num_topk,
                          cudaStream_t stream) const;
    void launch_dispatch_kernel(const DispatchInputs& in, const DispatchOutputs& out, size_t block_offset,
                                cudaStream_t stream);
    void hand_out_outputs(const DispatchInputs& in, const ReceiveBlock& block, DispatchOutputs& out,
                          cudaStream_t stream) const;
    at::Tensor take_output(const ReceiveBlock& block, size_t offset, at::IntArrayRef sizes,
                           at::ScalarType dtype, const at::TensorOptions& options, cudaStream_t stream) const;
    size_t place_in_region(const at::Tensor& tensor, size_t staging_offset, cudaStream_t stream);

    int rank_, num_ranks_;
    IpcRegion region_;
    size_t staging_offset_, staging_bytes_;
    std::shared_ptr<Arena> arena_;
    HostMapped<Mailbox> mailbox_;
    long long timeout_ns_;
    int host_ticket_ = 0;
    bool failed_ = false;
    bool destroyed_ = false;
};

}  // namespace deepep_megatron::intranode
