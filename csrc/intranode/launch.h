// Host-side entry points of the intranode kernels. Each launches on `stream` and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include "intranode/params.h"

namespace deepep_megatron::intranode {

constexpr int kDispatchThreads = 512;
constexpr int kCombineThreads = 512;
constexpr int kNotifyThreads = 1024;

void launch_layout(const LayoutParams& params, cudaStream_t stream);
void launch_notify(const NotifyParams& params, cudaStream_t stream);
void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream);
void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream);

}  // namespace deepep_megatron::intranode
