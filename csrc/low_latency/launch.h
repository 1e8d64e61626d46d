// Host-side entry points of the low-latency kernels. Each launches `num_blocks` blocks of
// kThreads threads on `stream` and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "low_latency/params.h"

namespace deepep_megatron {
namespace low_latency {

constexpr int kThreads = 512;

// Dynamic shared memory the kernels need (bytes), to check against the device limit first.
size_t dispatch_shared_bytes(int num_experts, int experts_per_rank, int num_ranks, int num_selections);
size_t combine_shared_bytes(int experts_per_rank, int num_ranks);

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream);
void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream);

}  // namespace low_latency
}  // namespace deepep_megatron
