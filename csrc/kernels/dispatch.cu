// dispatch: every token is written once, by one warp, straight into its final row of each
// destination rank's receive block (no rings, no copy-out on the receiver).
//
// Protocol for one epoch, per block:
//   A. block 0 tells every rank where this rank's receive block lies (packed epoch + offset);
//   B. each block learns where every destination's receive block lies;
//   C. warps copy tokens: one read of the row, one 16-byte store per destination, metadata;
//   D. the block releases a per-(src, block) completion flag at every destination;
//   E. the block waits until the same block of every source has completed, so the kernel ends
//      only when this rank's receive block is full.
#include "check.h"
#include "copy.cuh"
#include "launch.h"
#include "sync.cuh"

namespace deepep_megatron {

namespace {

constexpr int kDispatchUnroll = 4;

struct Destinations {
    size_t block_offset[kMaxRanks];   // receive block, relative to the peer's region base
    int first_row[kMaxRanks];         // row of this rank's first token in that block
    int num_rows[kMaxRanks];          // rows of that block
    RecvBlockLayout layout[kMaxRanks];
};

// Step A.
__device__ void publish_receive_block(const DispatchParams& p, int epoch) {
    if (blockIdx.x != 0 || threadIdx.x >= p.num_ranks) return;
    auto* peer_signals = reinterpret_cast<SignalArea*>(p.peers.base[threadIdx.x]);
    store_release_system(&peer_signals->recv_offset[p.wait.rank], pack_offset(epoch, p.my_recv_offset));
}

// Step B. Returns false if a wait gave up.
__device__ bool learn_destinations(const DispatchParams& p, int epoch, Destinations& dst, int& ok) {
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    if (threadIdx.x < p.num_ranks) {
        const int peer = threadIdx.x, R = p.num_ranks;
        size_t offset = 0;
        if (!wait_offset(&p.wait.local_signals->recv_offset[peer], epoch, p.wait, kPhaseDispatchOffsets, peer, &offset))
            ok = 0;
        int rows = 0, first_row = 0;
        for (int src = 0; src < R; ++src) {
            const int count = p.count_matrix[src * R + peer];
            rows += count;
            if (src < p.wait.rank) first_row += count;
        }
        if (p.num_worst_tokens > 0) rows = p.num_worst_tokens;
        dst.block_offset[peer] = offset;
        dst.first_row[peer] = first_row;
        dst.num_rows[peer] = rows;
        dst.layout[peer] = recv_block_layout(rows, p.row_bytes, p.num_scales, p.num_topk);
    }
    __syncthreads();
    return ok != 0;
}

// Step C for one token's payload: each lane moves kDispatchUnroll vectors per round, loaded
// once and stored to every destination.
template <typename Vec>
__device__ void copy_row(const Vec* source, Vec* const* targets, int num_ranks, int num_vectors, int lane) {
    for (int base = lane; base < num_vectors; base += 32 * kDispatchUnroll) {
        Vec values[kDispatchUnroll];
#pragma unroll
        for (int u = 0; u < kDispatchUnroll; ++u) {
            const int i = base + u * 32;
            if (i < num_vectors) values[u] = load_streaming(source + i);
        }
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r) {
            if (r >= num_ranks || targets[r] == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kDispatchUnroll; ++u) {
                const int i = base + u * 32;
                if (i < num_vectors) targets[r][i] = values[u];
            }
        }
    }
}

// Step C for one token's scales and metadata (top-k remapped to the destination's local ids).
__device__ void copy_token_metadata(const DispatchParams& p, const Destinations& dst, int token, const int* rows,
                                    int lane) {
    for (int r = 0; r < p.num_ranks; ++r) {
        if (rows[r] < 0) continue;
        uint8_t* block = p.peers.base[r] + dst.block_offset[r];
        const int64_t row = rows[r];
        if (p.scales != nullptr) {
            const int* source = reinterpret_cast<const int*>(p.scales) + static_cast<int64_t>(token) * p.num_scales;
            int* target = reinterpret_cast<int*>(block + dst.layout[r].scales_offset) + row * p.num_scales;
            for (int i = lane; i < p.num_scales; i += 32) target[i] = load_streaming(source + i);
        }
        if (p.topk_idx != nullptr && lane < p.num_topk) {
            const int64_t expert = p.topk_idx[static_cast<int64_t>(token) * p.num_topk + lane];
            int64_t local = expert - static_cast<int64_t>(r) * p.experts_per_rank;
            const bool mine = expert >= 0 && local >= 0 && local < p.experts_per_rank;
            reinterpret_cast<int64_t*>(block + dst.layout[r].topk_idx_offset)[row * p.num_topk + lane] = mine ? local : -1;
            if (p.topk_weights != nullptr) {
                const float weight = p.topk_weights[static_cast<int64_t>(token) * p.num_topk + lane];
                reinterpret_cast<float*>(block + dst.layout[r].topk_weights_offset)[row * p.num_topk + lane] =
                    mine ? weight : 0.0f;
            }
        }
        if (lane == 0) reinterpret_cast<int*>(block + dst.layout[r].src_idx_offset)[row] = token;
    }
}

template <typename Vec>
__device__ void send_tokens(const DispatchParams& p, const Destinations& dst) {
    const int lane = threadIdx.x % 32;
    const int warps_per_block = blockDim.x / 32;
    const int first_warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int total_warps = gridDim.x * warps_per_block;
    const int num_vectors = p.row_bytes / static_cast<int>(sizeof(Vec));
    for (int token = first_warp; token < p.num_tokens; token += total_warps) {
        // Lane r reads the slot for destination r; the warp shares them.
        const int my_slot = lane < p.num_ranks ? p.send_slot[static_cast<int64_t>(token) * p.num_ranks + lane] : -1;
        int rows[kMaxRanks];
        Vec* targets[kMaxRanks];
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r) {
            int slot = __shfl_sync(0xffffffffu, my_slot, r);
            if (slot >= 0 && dst.first_row[r] + slot >= dst.num_rows[r]) {
                // More rows than num_worst_tokens: drop the token rather than write past the
                // block, and tell the host, which raises.
                if (lane == 0) atomicMax(const_cast<int*>(&p.wait.mailbox->overflow_rows), dst.first_row[r] + slot + 1);
                slot = -1;
            }
            rows[r] = slot >= 0 ? dst.first_row[r] + slot : -1;
            targets[r] = nullptr;
            if (r < p.num_ranks && slot >= 0) {
                uint8_t* block = p.peers.base[r] + dst.block_offset[r] + dst.layout[r].x_offset;
                targets[r] = reinterpret_cast<Vec*>(block + static_cast<int64_t>(rows[r]) * p.row_bytes);
            }
        }
        const Vec* source = reinterpret_cast<const Vec*>(p.x + static_cast<int64_t>(token) * p.row_bytes);
        copy_row(source, targets, p.num_ranks, num_vectors, lane);
        copy_token_metadata(p, dst, token, rows, lane);
    }
}

template <typename Vec>
__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(DispatchParams p) {
    __shared__ Destinations dst;
    __shared__ int ok;
    const int epoch = current_epoch(p.wait.local_signals);
    publish_receive_block(p, epoch);
    if (learn_destinations(p, epoch, dst, ok)) {
        send_tokens<Vec>(p, dst);
        fence_system();  // this block's rows are visible before its completion flag (steps D, E)
        handshake_with_peers(&SignalArea::dispatch_done, p.peers, p.num_ranks, epoch, p.wait, kPhaseDispatchData);
    }
    finish_operation(p.wait.local_signals);
}

}  // namespace

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream) {
    const bool wide = params.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(params.x) % 16 == 0;
    if (wide)
        dispatch_kernel<int4><<<num_blocks, kDispatchThreads, 0, stream>>>(params);
    else
        dispatch_kernel<int><<<num_blocks, kDispatchThreads, 0, stream>>>(params);
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron
