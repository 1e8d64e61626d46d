// combine: every rank pulls the rows of its own tokens straight from the ranks that hold them
// and reduces them in registers (fp32), so each row crosses the interconnect once and nothing is
// staged on the receiving side.
//
// Protocol for one epoch, per block:
//   A. block 0 tells every rank where this rank's combine input (and top-k weights) lie;
//   B. each block learns where every rank's input lies;
//   C. warps reduce tokens: ranks in ascending order, then bias 0, then bias 1, one rounding;
//   D. the block tells every rank it has finished reading from it;
//   E. the block waits until the same block of every rank has finished reading this rank's
//      input, so the input may be reused once the kernel ends.
#include "check.h"
#include "copy.cuh"
#include "launch.h"
#include "sync.cuh"

namespace deepep_megatron {

namespace {

constexpr int kCombineChunks = 2;  // 16-byte chunks per lane in flight, per source rank

struct Sources {
    const uint8_t* x[kMaxRanks];      // each rank's combine input rows
    const float* weights[kMaxRanks];  // each rank's top-k weights, or null
    int first_row[kMaxRanks];         // row of this rank's first token in that input
};

// Step A.
__device__ void publish_inputs(const CombineParams& p, int epoch) {
    if (blockIdx.x != 0 || threadIdx.x >= p.num_ranks) return;
    auto* peer_signals = reinterpret_cast<SignalArea*>(p.peers.base[threadIdx.x]);
    store_release_system(&peer_signals->combine_w_offset[p.wait.rank], pack_offset(epoch, p.my_w_offset));
    store_release_system(&peer_signals->combine_x_offset[p.wait.rank], pack_offset(epoch, p.my_x_offset));
}

// Step B. Returns false if a wait gave up.
__device__ bool learn_sources(const CombineParams& p, int epoch, Sources& src, int& ok) {
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    if (threadIdx.x < p.num_ranks) {
        const int peer = threadIdx.x, R = p.num_ranks;
        size_t x_offset = 0, w_offset = 0;
        const SignalArea* local = p.wait.local_signals;
        bool arrived = wait_offset(&local->combine_x_offset[peer], epoch, p.wait, kPhaseCombineOffsets, peer, &x_offset);
        arrived = arrived &&
                  wait_offset(&local->combine_w_offset[peer], epoch, p.wait, kPhaseCombineOffsets, peer, &w_offset);
        if (!arrived) ok = 0;
        int first_row = 0;
        for (int s = 0; s < p.wait.rank; ++s) first_row += p.count_matrix[s * R + peer];
        src.x[peer] = p.peers.base[peer] + x_offset;
        src.weights[peer] = w_offset ? reinterpret_cast<const float*>(p.peers.base[peer] + w_offset) : nullptr;
        src.first_row[peer] = first_row;
    }
    __syncthreads();
    return ok != 0;
}

// Step C for one token's hidden vector.
template <typename Vec>
__device__ void reduce_row(const CombineParams& p, const Vec* const* rows, int token, int lane) {
    constexpr int kValues = sizeof(Vec) / 2;
    const int num_vectors = p.hidden * 2 / static_cast<int>(sizeof(Vec));
    const int64_t row_offset = static_cast<int64_t>(token) * num_vectors;
    for (int base = lane; base < num_vectors; base += 32 * kCombineChunks) {
        float acc[kCombineChunks][kValues];
        Vec loaded[kMaxRanks][kCombineChunks];
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r) {
            if (rows[r] == nullptr) continue;
#pragma unroll
            for (int c = 0; c < kCombineChunks; ++c) {
                const int i = base + c * 32;
                if (i < num_vectors) loaded[r][c] = load_peer(rows[r] + i);
            }
        }
#pragma unroll
        for (int c = 0; c < kCombineChunks; ++c) {
#pragma unroll
            for (int v = 0; v < kValues; ++v) acc[c][v] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r) {
            if (rows[r] == nullptr) continue;
#pragma unroll
            for (int c = 0; c < kCombineChunks; ++c) accumulate_bf16(acc[c], loaded[r][c]);
        }
#pragma unroll
        for (int c = 0; c < kCombineChunks; ++c) {
            const int i = base + c * 32;
            if (i >= num_vectors) continue;
            if (p.bias0 != nullptr) accumulate_bf16(acc[c], load_streaming(reinterpret_cast<const Vec*>(p.bias0) + row_offset + i));
            if (p.bias1 != nullptr) accumulate_bf16(acc[c], load_streaming(reinterpret_cast<const Vec*>(p.bias1) + row_offset + i));
            reinterpret_cast<Vec*>(p.combined_x)[row_offset + i] = pack_bf16(acc[c], static_cast<Vec*>(nullptr));
        }
    }
}

template <typename Vec>
__device__ void reduce_tokens(const CombineParams& p, const Sources& src) {
    const int lane = threadIdx.x % 32;
    const int warps_per_block = blockDim.x / 32;
    const int first_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int total_warps = gridDim.x * warps_per_block;
    const int64_t row_bytes = static_cast<int64_t>(p.hidden) * 2;
    for (int token = first_warp; token < p.num_tokens; token += total_warps) {
        const int my_slot = lane < p.num_ranks ? p.send_slot[static_cast<int64_t>(token) * p.num_ranks + lane] : -1;
        const Vec* rows[kMaxRanks];
        int row_index[kMaxRanks];
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r) {
            const int slot = __shfl_sync(0xffffffffu, my_slot, r);
            row_index[r] = slot >= 0 ? src.first_row[r] + slot : -1;
            rows[r] = (r < p.num_ranks && slot >= 0)
                          ? reinterpret_cast<const Vec*>(src.x[r] + static_cast<int64_t>(row_index[r]) * row_bytes)
                          : nullptr;
        }
        reduce_row<Vec>(p, rows, token, lane);
        if (p.combined_weights != nullptr && lane < p.num_topk) {
            float sum = 0.0f;
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r) {
                if (rows[r] != nullptr && src.weights[r] != nullptr)
                    sum += src.weights[r][static_cast<int64_t>(row_index[r]) * p.num_topk + lane];
            }
            p.combined_weights[static_cast<int64_t>(token) * p.num_topk + lane] = sum;
        }
    }
}

template <typename Vec>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(CombineParams p) {
    __shared__ Sources src;
    __shared__ int ok;
    const int epoch = current_epoch(p.wait.local_signals);
    publish_inputs(p, epoch);
    if (learn_sources(p, epoch, src, ok)) {
        reduce_tokens<Vec>(p, src);
        // Steps D, E: every load of this block has returned its value once the block joins.
        handshake_with_peers(&SignalArea::combine_done, p.peers, p.num_ranks, epoch, p.wait, kPhaseCombineDone);
    }
    finish_operation(p.wait.local_signals);
}

}  // namespace

void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream) {
    auto aligned = [](const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; };
    const bool wide = params.hidden % 8 == 0 && aligned(params.bias0) && aligned(params.bias1) &&
                      aligned(params.combined_x);
    if (wide)
        combine_kernel<int4><<<num_blocks, kCombineThreads, 0, stream>>>(params);
    else
        combine_kernel<int><<<num_blocks, kCombineThreads, 0, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron
