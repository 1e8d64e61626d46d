// Low-latency combine: every packed row goes back to its source, into the row of its
// (token, top-k slot) in the source's combine landing area; the source then sums each token's
// rows weighted by topk_weights in fp32, in top-k order, and rounds once to bf16 (the portable
// backend's arithmetic, so results are bit-identical).
//
// Send phase (every block):
//   A. wait until every token owner has released this bank from the call before last;
//   B. one warp per row: same-node owners get the row through their mapping, others by one put
//      with a signal (from the zero-copy buffer, or after staging the row there);
//   C. publish the block's same-node arrivals (one release add per owner), quiet the puts.
// Receive phase (every block):
//   D. count this rank's selections per expert rank and wait until that rank's arrivals (rows)
//      reach the selections past what earlier calls consumed;
//   E. one warp per (token, part of 1024 channels) reduces and stores;
//   F. the last block to finish records the consumed arrivals and releases the bank.
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "low_latency/device.cuh"
#include "low_latency/launch.h"

namespace deepep_megatron {
namespace low_latency {

namespace {

constexpr int kCopyUnroll = 8;  // vectors in flight per lane

__device__ __forceinline__ size_t combine_landing_row(const CombineParams& p, int token, int k) {
    return p.sym.data_offset + p.sym.data.combine_landing +
           (static_cast<size_t>(token) * kMaxTopk + k) * p.hidden * 2;
}

template <typename Vec>
__device__ __forceinline__ void copy_row(const Vec* source, Vec* target, int num_vectors, int lane) {
    for (int base = 0; base < num_vectors; base += 32 * kCopyUnroll) {
        Vec values[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u)
            if (base + u * 32 + lane < num_vectors) values[u] = load_streaming(source + base + u * 32 + lane);
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u)
            if (base + u * 32 + lane < num_vectors) target[base + u * 32 + lane] = values[u];
    }
}

template <typename Vec>
__device__ bool combine_send(const CombineParams& p, int* shared, int* flag) {
    const Symmetric& sym = p.sym;
    const int lane = threadIdx.x & 31, warps = blockDim.x / 32;
    const int global_warp = blockIdx.x * warps + threadIdx.x / 32, total_warps = gridDim.x * warps;
    const int R = p.num_ranks, experts = p.experts_per_rank;
    const int capacity = R * p.max_tokens;
    const unsigned int seq = read_counter(&bank_counters(sym)->combine_send_seq) + 1;

    // A. The call before last on this bank has been reduced everywhere.
    for (int r = threadIdx.x; r < R; r += blockDim.x)
        wait_at_least(local_signal(sym, sym.signals.combine_released, r), seq - 1, p.wait,
                      kWaitCombineRelease, r);
    if (block_stopped(p.wait, flag)) return false;

    int* expert_start = shared;                  // [E_local + 1] first row of each expert in row order
    int* arrivals = expert_start + experts + 1;  // [R] same-node arrivals of this block, per owner
    for (int e = threadIdx.x; e < experts; e += blockDim.x) expert_start[e + 1] = p.recv_count[e];
    for (int r = threadIdx.x; r < R; r += blockDim.x) arrivals[r] = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        expert_start[0] = 0;
        for (int e = 0; e < experts; ++e) expert_start[e + 1] += expert_start[e];
    }
    __syncthreads();

    // B. Rows.
    const int total_rows = expert_start[experts];
    const int num_vectors = p.hidden * 2 / static_cast<int>(sizeof(Vec));
    bool used_puts = false;
    for (int row_in_order = global_warp; row_in_order < total_rows; row_in_order += total_warps) {
        const int e = last_not_above(expert_start, experts, row_in_order);
        const size_t index = static_cast<size_t>(e) * capacity + (row_in_order - expert_start[e]);
        const int route = __ldg(p.recv_route + index), token = __ldg(p.recv_src_info + index);
        const int owner = route / kMaxTopk, k = route % kMaxTopk;
        const size_t target = combine_landing_row(p, token, k);
        const Vec* source = reinterpret_cast<const Vec*>(p.x + index * p.hidden);
        if (uint8_t* mapped = peer_at(sym, owner, target)) {
            copy_row(source, reinterpret_cast<Vec*>(mapped), num_vectors, lane);
            if (lane == 0) atomicAdd(&arrivals[owner], 1);
            continue;
        }
        const void* put_source = source;
        if (!p.zero_copy) {  // puts read registered memory: stage the row in the zero-copy buffer
            uint8_t* staged =
                local_at(sym, sym.data_offset + sym.data.combine_staging + index * p.hidden * 2);
            copy_row(source, reinterpret_cast<Vec*>(staged), num_vectors, lane);
            put_source = staged;
        }
        __threadfence_system();  // a NIC reads the source
        __syncwarp();
        nvshmemx_putmem_signal_nbi_warp(local_at(sym, target), put_source, static_cast<size_t>(p.hidden) * 2,
                                        local_signal(sym, sym.signals.combine_arrival, p.rank), 1,
                                        NVSHMEM_SIGNAL_ADD, owner);
        used_puts = true;
    }

    // C. Same-node arrivals, after every thread's stores are visible system-wide.
    fence_system();
    __syncthreads();
    for (int r = threadIdx.x; r < R; r += blockDim.x)
        if (arrivals[r] != 0)
            signal_add_mapped(sym, r, signal_word(sym, sym.signals.combine_arrival, p.rank), arrivals[r]);
    if (used_puts && lane == 0) nvshmem_quiet();
    if (last_block(&bank_counters(sym)->combine_send_ticket, flag) && threadIdx.x == 0)
        bank_counters(sym)->combine_send_seq = seq;
    return true;
}

// Step E for one (token, part): per round, every lane loads its vector of all K rows first (the
// loads overlap), then adds weight x row in top-k order. fp32 multiply, then add, each rounded
// (no fused multiply-add), as the portable backend computes it.
template <typename Vec, int kMaxK>
__device__ void reduce_part(const CombineParams& p, int token, int part) {
    constexpr int kPerVector = static_cast<int>(sizeof(Vec)) / 2;  // bf16 channels per vector
    const int lane = threadIdx.x & 31;
    const int channels = part_channels(p.hidden, part);
    const int num_vectors = channels / kPerVector;
    const int K = p.num_topk;
    // Lane k < K holds selection k's weight, or a NaN-free 0 marker when the slot is empty.
    const size_t first = static_cast<size_t>(token) * K;
    const bool my_valid = lane < K && __ldg(p.topk_idx + first + lane) >= 0;
    const float my_weight = lane < K ? __ldg(p.topk_weights + first + lane) : 0.0f;
    const unsigned valid = __ballot_sync(kFullMask, my_valid);
    const uint8_t* rows =
        local_at(p.sym, combine_landing_row(p, token, 0)) + static_cast<size_t>(part) * kPartChannels * 2;
    const size_t row_stride = static_cast<size_t>(p.hidden) * 2;
    Vec* out =
        reinterpret_cast<Vec*>(p.combined_x + static_cast<size_t>(token) * p.hidden + part * kPartChannels);
    for (int v = lane; v - lane < num_vectors; v += 32) {  // warp-uniform trip count
        const bool active = v < num_vectors;
        Vec loaded[kMaxK];
#pragma unroll
        for (int k = 0; k < kMaxK; ++k)
            if (active && (valid >> k & 1u))
                loaded[k] = load_landed(reinterpret_cast<const Vec*>(rows + k * row_stride) + v);
        float acc[kPerVector];
#pragma unroll
        for (int j = 0; j < kPerVector; ++j) acc[j] = 0.0f;  // adding +0 for an empty slot changes nothing
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
            const float weight = __shfl_sync(kFullMask, my_weight, k);
            if (!(valid >> k & 1u)) continue;
            const uint32_t* words = reinterpret_cast<const uint32_t*>(&loaded[k]);
#pragma unroll
            for (int w = 0; w < kPerVector / 2; ++w) {
                acc[2 * w] = __fadd_rn(acc[2 * w], __fmul_rn(weight, __uint_as_float(words[w] << 16)));
                acc[2 * w + 1] =
                    __fadd_rn(acc[2 * w + 1], __fmul_rn(weight, __uint_as_float(words[w] & 0xffff0000u)));
            }
        }
        if (!active) continue;
        Vec result;
        uint32_t* words = reinterpret_cast<uint32_t*>(&result);
#pragma unroll
        for (int w = 0; w < kPerVector / 2; ++w) {
            const uint32_t low = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * w]));
            const uint32_t high = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * w + 1]));
            words[w] = low | (high << 16);
        }
        out[v] = result;
    }
}

template <typename Vec>
__device__ void combine_receive(const CombineParams& p, int* shared, int* flag) {
    const Symmetric& sym = p.sym;
    const int warps = blockDim.x / 32;
    const int global_warp = blockIdx.x * warps + threadIdx.x / 32, total_warps = gridDim.x * warps;
    const int R = p.num_ranks, parts = num_parts(p.hidden);
    const unsigned int seq = read_counter(&bank_counters(sym)->combine_recv_seq) + 1;
    const long long start = global_time_ns();

    // D. Rows expected from each expert rank: this rank's valid selections of its experts.
    int* selections = shared;  // [R]
    for (int r = threadIdx.x; r < R; r += blockDim.x) selections[r] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < p.num_tokens * p.num_topk; i += blockDim.x) {
        const int64_t expert = __ldg(p.topk_idx + i);
        if (expert >= 0) atomicAdd(&selections[expert / p.experts_per_rank], 1);
    }
    __syncthreads();
    const uint64_t* expected = local_signal(sym, sym.signals.combine_expected, 0);
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        const uint64_t target = expected[r] + static_cast<uint64_t>(selections[r]);
        if (wait_at_least(local_signal(sym, sym.signals.combine_arrival, r), target, p.wait, kWaitCombineData,
                          r) &&
            blockIdx.x == 0 && p.wait_recv_stats != nullptr)
            p.wait_recv_stats[r] += global_time_ns() - start;
    }
    if (block_stopped(p.wait, flag)) return;

    // E. Reduce.
    for (int item = global_warp; item < p.num_tokens * parts; item += total_warps) {
        if (p.num_topk <= 8)  // fewer registers for the common top-k
            reduce_part<Vec, 8>(p, item / parts, item % parts);
        else
            reduce_part<Vec, kMaxTopk>(p, item / parts, item % parts);
    }

    // F. Consumed; the bank may take the next call's rows from every expert rank.
    if (last_block(&bank_counters(sym)->combine_recv_ticket, flag)) {
        uint64_t* consumed = local_signal(sym, sym.signals.combine_expected, 0);
        for (int r = threadIdx.x; r < R; r += blockDim.x) consumed[r] += static_cast<uint64_t>(selections[r]);
        if (threadIdx.x == 0) bank_counters(sym)->combine_recv_seq = seq;
        for (int r = threadIdx.x; r < R; r += blockDim.x)
            signal_set(sym, r, signal_word(sym, sym.signals.combine_released, p.rank), seq);
    }
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const CombineParams p) {
    extern __shared__ __align__(16) int shared[];
    __shared__ int flag;
    if (p.phases & kPhaseSend) {
        if (!combine_send<Vec>(p, shared, &flag)) return;
        __syncthreads();  // the receive phase reuses shared memory
    }
    if (p.phases & kPhaseReceive) combine_receive<Vec>(p, shared, &flag);
}

}  // namespace

size_t combine_shared_bytes(int experts_per_rank, int num_ranks) {
    return (static_cast<size_t>(experts_per_rank) + 1 + num_ranks) * sizeof(int);
}

void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream) {
    const size_t shared = combine_shared_bytes(params.experts_per_rank, params.num_ranks);
    auto kernel = params.hidden % 8 == 0 ? combine_kernel<int4> : combine_kernel<int>;
    if (shared > 48 * 1024)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    kernel<<<num_blocks, kThreads, shared, stream>>>(params);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("deepep_megatron: low-latency combine launch failed: ") +
                                 cudaGetErrorString(status));
}

}  // namespace low_latency
}  // namespace deepep_megatron
