// internode::Runtime (Python: _nvshmem.InternodeRuntime): the host side of the internode family
// for one rank of one Buffer: its symmetric block (allocated by the caller through
// csrc/transport/nvshmem), the mappings of its node's blocks, the timeout record, the operation
// numbers and arrival totals, and every launch. Calls only enqueue work on the current stream
// (the count exchange and its host sync are the Python adapter's).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/diagnostics.h"
#include "common/host_mapped.hpp"
#include "internode/args.hpp"
#include "internode/params.h"

namespace deepep_megatron::internode {

class Runtime {
  public:
    // `block_address`: my symmetric block of `block_bytes`; `node_peer_bases[l]`: the block of
    // rank l of my node mapped into this process (mine included, never 0).
    Runtime(int rank, int num_ranks, int ranks_per_node, int64_t block_address, int64_t block_bytes,
            const std::vector<int64_t>& node_peer_bases, double timeout_seconds);
    ~Runtime();
    Runtime(const Runtime&) = delete;
    Runtime& operator=(const Runtime&) = delete;

    // Bytes a block needs for calls with at most `max_tokens` tokens per rank and
    // `max_recv_rows` rows received per rank: BF16 or FP8 dispatch of `hidden` channels with
    // `num_topk` top-k, and its combine.
    static int64_t required_bytes(int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t num_ranks,
                                  int64_t ranks_per_node, int64_t max_recv_rows);

    DispatchOutputs dispatch(const DispatchArgs& args);
    CombineOutputs combine(const CombineArgs& args);

    // Throws DeviceTimeout (a Python TimeoutError) if a wait of this buffer gave up.
    void check_health();
    // Frees what only this runtime holds (the block belongs to the caller). Idempotent.
    void destroy();

  private:
    Group group() const;
    void require_block(size_t end, const char* what) const;
    void copy_out(const uint8_t* source, at::Tensor& out, int64_t valid_rows, cudaStream_t stream) const;

    int rank_, num_ranks_, ranks_per_node_, num_nodes_, device_;
    uint8_t* block_;
    size_t block_bytes_;
    std::vector<uint8_t*> node_peers_;
    HostMapped<TimeoutRecord> record_;
    long long timeout_ns_;
    int operation_ = 0;  // this rank's dispatches and combines, counted together
    std::vector<unsigned long long> dispatch_arrived_;  // per node: records expected so far
    std::vector<unsigned long long> combine_arrived_;   // per node: partial sums expected so far
    bool failed_ = false;
    bool destroyed_ = false;
};

}  // namespace deepep_megatron::internode
