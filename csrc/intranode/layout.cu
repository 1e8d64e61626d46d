// get_dispatch_layout: which ranks each token goes to, and how many tokens each rank and each
// expert gets. One thread per token; counts are gathered in shared memory first so that global
// atomics happen once per block and counter.
#include "common/check.h"
#include "intranode/launch.h"

namespace deepep_megatron::intranode {

namespace {

constexpr int kLayoutThreads = 256;
constexpr int kMaxSharedExperts = 8192;

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutParams p) {
    extern __shared__ int shared_counts[];  // [num_ranks] then [num_experts] when they fit
    const bool experts_in_shared = p.num_experts <= kMaxSharedExperts;
    int* rank_counts = shared_counts;
    int* expert_counts = experts_in_shared ? shared_counts + p.num_ranks : p.num_tokens_per_expert;
    const int num_shared = p.num_ranks + (experts_in_shared ? p.num_experts : 0);
    for (int i = threadIdx.x; i < num_shared; i += blockDim.x) shared_counts[i] = 0;
    __syncthreads();

    const int experts_per_rank = p.num_experts / p.num_ranks;
    const int token = blockIdx.x * blockDim.x + threadIdx.x;
    if (token < p.num_tokens) {
        unsigned rank_mask = 0;
        for (int k = 0; k < p.num_topk; ++k) {
            const int64_t expert = p.topk_idx[static_cast<int64_t>(token) * p.num_topk + k];
            if (expert < 0) continue;
            rank_mask |= 1u << (expert / experts_per_rank);
            atomicAdd(&expert_counts[expert], 1);
        }
        for (int rank = 0; rank < p.num_ranks; ++rank) {
            const bool in_rank = (rank_mask >> rank) & 1u;
            p.is_token_in_rank[static_cast<int64_t>(token) * p.num_ranks + rank] = in_rank;
            if (in_rank) atomicAdd(&rank_counts[rank], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
        if (rank_counts[i]) atomicAdd(&p.num_tokens_per_rank[i], rank_counts[i]);
    if (experts_in_shared) {
        for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
            if (expert_counts[i]) atomicAdd(&p.num_tokens_per_expert[i], expert_counts[i]);
    }
}

}  // namespace

void launch_layout(const LayoutParams& params, cudaStream_t stream) {
    if (params.num_tokens == 0) return;  // outputs are already zero
    const int blocks = (params.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
    const int shared_ints =
        params.num_ranks + (params.num_experts <= kMaxSharedExperts ? params.num_experts : 0);
    const size_t shared_bytes = static_cast<size_t>(shared_ints) * sizeof(int);
    if (shared_bytes > 48 * 1024) {
        DEEPEP_CUDA_CHECK(cudaFuncSetAttribute(layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shared_bytes)));
    }
    layout_kernel<<<blocks, kLayoutThreads, shared_bytes, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::intranode
