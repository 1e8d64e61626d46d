// Host-side entry points of the internode kernels. Each launches its two kernels (dispatch: send,
// forward; combine: pull, reduce) with `num_blocks` blocks of kThreads threads on `stream`, and
// checks the launches.
#pragma once

#include <cuda_runtime.h>

#include "internode/params.h"

namespace deepep_megatron::internode {

constexpr int kThreads = 512;

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream);
void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream);

}  // namespace deepep_megatron::internode
