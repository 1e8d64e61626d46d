// Low-latency dispatch: each (token, top-k slot) becomes one message in the expert owner's
// landing area, slot (local expert, this rank, j) where j counts this rank's earlier selections
// of that expert, so the receiver packs by source rank, then token, as the portable backend does.
//
// Send phase (every block):
//   A. wait until every receiver has released this bank from the call before last (credit);
//   B. one warp ranks this rank's selections in shared memory (slot of each (token, k) among the
//      selections of its expert, and the count per expert); the block then sets the count words
//      (seq << 32) | count of its share of the experts, before any data moves;
//   C. one warp per (token, part): read and (FP8) cast the part once, store it to every
//      same-node destination through its mapping, or stage it and put it with a signal to a
//      destination in another node;
//   D. publish the block's same-node arrivals (one release add per expert), quiet the puts.
// Receive phase (every block):
//   E. wait for every (local expert, source) count of this seq, then until its arrivals reach
//      (parts + 1) x count past what earlier calls consumed;
//   F. pack: one warp per row copies payload, scales (column-major) and header fields;
//   G. the last block to finish records the consumed arrivals and releases the bank to every
//      source.
// Sequence numbers, tickets and consumed-arrival totals live in device memory, so calls replay
// correctly from a CUDA graph; nothing is ever reset between calls.
#include <stdexcept>
#include <string>

#include "low_latency/device.cuh"
#include "low_latency/fp8.cuh"
#include "low_latency/launch.h"

namespace deepep_megatron {
namespace low_latency {

namespace {

constexpr int kFp8Iterations = kPartChannels / 256;  // a warp covers 256 channels per 16-byte load

__device__ __forceinline__ size_t landing_message(const DispatchParams& p, int local_expert, int source,
                                                  int slot) {
    return p.sym.data_offset + p.sym.data.dispatch_landing +
           ((static_cast<size_t>(local_expert) * p.num_ranks + source) * p.max_tokens + slot) *
               p.sym.data.slot;
}

__device__ __forceinline__ uint8_t* staged_message(const DispatchParams& p, int token) {
    return local_at(p.sym, p.sym.data_offset + p.sym.data.dispatch_staging +
                               static_cast<size_t>(token) * p.sym.data.slot);
}

__device__ __forceinline__ int4* staged_header(const DispatchParams& p, int token, int k) {
    return reinterpret_cast<int4*>(local_at(p.sym, p.sym.data_offset + p.sym.data.dispatch_headers)) +
           static_cast<size_t>(token) * kMaxTopk + k;
}

// One warp: for every selection i of this rank (row-major over [N, K]), `slot[i]` = how many
// earlier selections chose the same expert (its slot among the messages to that expert, so slots
// follow token order), and `count[e]` = selections of expert e. Selections of -1 get no slot.
__device__ void rank_selections(const int64_t* topk_idx, int num_selections, int* slot, int* count) {
    const int lane = threadIdx.x & 31;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int base = 0; base < num_selections; base += 32) {
        const int i = base + lane;
        const int expert = i < num_selections ? static_cast<int>(__ldg(topk_idx + i)) : -1;
        const unsigned same = __match_any_sync(kFullMask, expert);
        const int before = expert >= 0 ? count[expert] : 0;
        __syncwarp();
        if (expert >= 0) {
            if (i < num_selections) slot[i] = before + __popc(same & lanes_below);
            if ((same & lanes_below) == 0) count[expert] = before + __popc(same);  // the group's first lane
        } else if (i < num_selections) {
            slot[i] = -1;
        }
        __syncwarp();
    }
}

// One part of one token, ready to store: FP8 (cast here) or BF16 (as read).
struct Fp8Part {
    uint2 payload[kFp8Iterations];
    float scale[kFp8Iterations];
};

__device__ __forceinline__ void cast_part(const DispatchParams& p, int token, int part, int channels,
                                          int lane, Fp8Part& out) {
    const int4* source =
        reinterpret_cast<const int4*>(p.x + static_cast<size_t>(token) * p.hidden + part * kPartChannels);
    int4 raw[kFp8Iterations];
#pragma unroll
    for (int u = 0; u < kFp8Iterations; ++u)
        if (u * 256 + lane * 8 < channels) raw[u] = load_streaming(source + u * 32 + lane);
#pragma unroll
    for (int u = 0; u < kFp8Iterations; ++u) {
        if (u * 256 >= channels) break;  // warp-uniform: the part's channels are a multiple of 128
        const bool valid = u * 256 + lane * 8 < channels;
        float values[8];
        if (valid) {
            unpack_bf16x8(raw[u], values);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) values[i] = 0.0f;
        }
        out.scale[u] = fp8_scale(half_warp_max(valid ? abs_max8(values) : 0.0f), p.round_scale);
        out.payload[u] = quantize8(values, out.scale[u]);
    }
}

__device__ __forceinline__ void store_fp8_chunk(const Fp8Part& part, uint8_t* chunk, int channels, int lane) {
    const size_t scale_bytes = part_scale_bytes(channels, true);
#pragma unroll
    for (int u = 0; u < kFp8Iterations; ++u) {
        const int channel = u * 256 + lane * 8;
        if (channel >= channels) continue;
        *reinterpret_cast<uint2*>(chunk + scale_bytes + channel) = part.payload[u];
        if ((lane & 15) == 0) reinterpret_cast<float*>(chunk)[channel / kScaleBlock] = part.scale[u];
    }
}

template <typename Vec>
struct Bf16Part {
    static constexpr int kPerLane = kPartChannels * 2 / static_cast<int>(sizeof(Vec)) / 32;
    Vec values[kPerLane];
};

template <typename Vec>
__device__ __forceinline__ void load_bf16_part(const DispatchParams& p, int token, int part, int channels,
                                               int lane, Bf16Part<Vec>& out) {
    const Vec* source =
        reinterpret_cast<const Vec*>(p.x + static_cast<size_t>(token) * p.hidden + part * kPartChannels);
    const int num_vectors = channels * 2 / static_cast<int>(sizeof(Vec));
#pragma unroll
    for (int i = 0; i < Bf16Part<Vec>::kPerLane; ++i)
        if (lane + 32 * i < num_vectors) out.values[i] = load_streaming(source + lane + 32 * i);
}

template <typename Vec>
__device__ __forceinline__ void store_bf16_chunk(const Bf16Part<Vec>& part, uint8_t* chunk, int channels,
                                                 int lane) {
    Vec* target = reinterpret_cast<Vec*>(chunk);
    const int num_vectors = channels * 2 / static_cast<int>(sizeof(Vec));
#pragma unroll
    for (int i = 0; i < Bf16Part<Vec>::kPerLane; ++i)
        if (lane + 32 * i < num_vectors) target[lane + 32 * i] = part.values[i];
}

// Step C for one (token, part): `store(chunk)` writes the part into a message's chunk.
template <typename StoreChunk>
__device__ void send_part(const DispatchParams& p, int token, int part, int my_expert, int my_slot,
                          int* arrivals, bool& used_puts, StoreChunk store) {
    const int lane = threadIdx.x & 31;
    const int channels = part_channels(p.hidden, part);
    const size_t chunk_offset = part_offset(part, p.fp8);
    bool remote = false;
    for (int k = 0; k < p.num_topk; ++k) {
        const int expert = __shfl_sync(kFullMask, my_expert, k);
        const int slot = __shfl_sync(kFullMask, my_slot, k);
        if (expert < 0) continue;
        const int destination = expert / p.experts_per_rank;
        const size_t message = landing_message(p, expert % p.experts_per_rank, p.rank, slot);
        uint8_t* mapped = peer_at(p.sym, destination, message);
        if (mapped == nullptr) {
            remote = true;
            continue;
        }
        store(mapped + chunk_offset);
        if (part == 0 && lane == 0) *reinterpret_cast<int4*>(mapped) = make_int4(token, k, 0, 0);
        // Counted per block and published once the block's stores are visible (step D).
        if (lane == 0) atomicAdd(&arrivals[expert], part == 0 ? 2 : 1);
    }
    if (!remote) return;
    // Other nodes: stage the part once (puts read registered memory), then one put per
    // destination, each carrying its own arrival signal.
    uint8_t* staged = staged_message(p, token);
    store(staged + chunk_offset);
    if (part == 0 && lane < p.num_topk) *staged_header(p, token, lane) = make_int4(token, lane, 0, 0);
    __threadfence_system();  // a NIC reads the staging area
    __syncwarp();
    const size_t chunk_bytes = part_chunk_bytes(channels, p.fp8);
    for (int k = 0; k < p.num_topk; ++k) {
        const int expert = __shfl_sync(kFullMask, my_expert, k);
        const int slot = __shfl_sync(kFullMask, my_slot, k);
        if (expert < 0) continue;
        const int destination = expert / p.experts_per_rank, local = expert % p.experts_per_rank;
        const size_t message = landing_message(p, local, p.rank, slot);
        if (peer_at(p.sym, destination, message) != nullptr) continue;
        uint64_t* arrival = local_signal(p.sym, p.sym.signals.dispatch_arrival,
                                         static_cast<size_t>(local) * p.num_ranks + p.rank);
        nvshmemx_putmem_signal_nbi_warp(local_at(p.sym, message + chunk_offset), staged + chunk_offset,
                                        chunk_bytes, arrival, 1, NVSHMEM_SIGNAL_ADD, destination);
        if (part == 0)
            nvshmemx_putmem_signal_nbi_warp(local_at(p.sym, message), staged_header(p, token, k),
                                            kHeaderBytes, arrival, 1, NVSHMEM_SIGNAL_ADD, destination);
    }
    used_puts = true;
}

template <typename Vec>
__device__ bool dispatch_send(const DispatchParams& p, int* shared, int* flag) {
    const Symmetric& sym = p.sym;
    const int lane = threadIdx.x & 31, warps = blockDim.x / 32;
    const int global_warp = blockIdx.x * warps + threadIdx.x / 32, total_warps = gridDim.x * warps;
    const int R = p.num_ranks, E = p.num_experts, K = p.num_topk;
    const unsigned int seq = read_counter(&bank_counters(sym)->dispatch_send_seq) + 1;

    // A. The call before last on this bank has been received everywhere.
    for (int r = threadIdx.x; r < R; r += blockDim.x)
        wait_at_least(local_signal(sym, sym.signals.dispatch_released, r), seq - 1, p.wait,
                      kWaitDispatchRelease, r);
    if (block_stopped(p.wait, flag)) return false;

    // B. Rank the selections, then counts first: receivers learn how much to wait for while the
    //    data is still moving. A (token, expert) chosen more than T times by duplicates past the
    //    landing slots is dropped, never written out of bounds.
    const int num_selections = p.num_tokens * K;
    int* count = shared;        // [E] selections per expert
    int* arrivals = count + E;  // [E] same-node arrivals of this block, per expert
    int* slots = arrivals + E;  // [N * K]
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = arrivals[e] = 0;
    __syncthreads();
    if (threadIdx.x < 32) rank_selections(p.topk_idx, num_selections, slots, count);
    __syncthreads();
    for (int expert = blockIdx.x * blockDim.x + threadIdx.x; expert < E; expert += gridDim.x * blockDim.x) {
        const int local = expert % p.experts_per_rank;
        const int n = count[expert] < p.max_tokens ? count[expert] : p.max_tokens;
        signal_set(sym, expert / p.experts_per_rank,
                   signal_word(sym, sym.signals.dispatch_count, static_cast<size_t>(local) * R + p.rank),
                   (static_cast<uint64_t>(seq) << 32) | static_cast<uint32_t>(n));
    }

    // C. Data.
    const int parts = num_parts(p.hidden);
    bool used_puts = false;
    for (int item = global_warp; item < p.num_tokens * parts; item += total_warps) {
        const int token = item / parts, part = item % parts;
        const int selection = token * K + lane;
        int my_expert = lane < K ? static_cast<int>(__ldg(p.topk_idx + selection)) : -1;
        const int my_slot = lane < K ? slots[selection] : -1;
        if (my_slot >= p.max_tokens) my_expert = -1;
        const int channels = part_channels(p.hidden, part);
        if (p.fp8) {
            Fp8Part data;
            cast_part(p, token, part, channels, lane, data);
            send_part(p, token, part, my_expert, my_slot, arrivals, used_puts,
                      [&](uint8_t* chunk) { store_fp8_chunk(data, chunk, channels, lane); });
        } else {
            Bf16Part<Vec> data;
            load_bf16_part(p, token, part, channels, lane, data);
            send_part(p, token, part, my_expert, my_slot, arrivals, used_puts,
                      [&](uint8_t* chunk) { store_bf16_chunk(data, chunk, channels, lane); });
        }
    }

    // D. Same-node arrivals, after every thread's stores are visible system-wide.
    fence_system();
    __syncthreads();
    for (int expert = threadIdx.x; expert < E; expert += blockDim.x) {
        if (arrivals[expert] == 0) continue;
        const int local = expert % p.experts_per_rank;
        signal_add_mapped(
            sym, expert / p.experts_per_rank,
            signal_word(sym, sym.signals.dispatch_arrival, static_cast<size_t>(local) * R + p.rank),
            arrivals[expert]);
    }
    if (used_puts && lane == 0) nvshmem_quiet();  // staging may be rewritten two calls later
    if (last_block(&bank_counters(sym)->dispatch_send_ticket, flag) && threadIdx.x == 0)
        bank_counters(sym)->dispatch_send_seq = seq;
    return true;
}

// Step F for one packed row: the payload (its parts are spread over the message's chunks),
// the scales into their column-major place, the header into recv_src_info / recv_route.
constexpr int kUnpackUnroll = 16;  // vectors in flight per lane

template <typename Vec>
__device__ void unpack_row(const DispatchParams& p, const uint8_t* message, int local_expert, int row,
                           int source) {
    const int lane = threadIdx.x & 31;
    const int capacity = p.num_ranks * p.max_tokens;
    const size_t row_index = static_cast<size_t>(local_expert) * capacity + row;
    const int element_bytes = p.fp8 ? 1 : 2;
    const int channels_per_vector = static_cast<int>(sizeof(Vec)) / element_bytes;
    const int num_vectors = p.hidden / channels_per_vector;
    Vec* target = reinterpret_cast<Vec*>(p.recv_x + row_index * p.hidden * element_bytes);
    // Byte offset of payload vector v inside the message.
    auto source_offset = [&](int v) {
        const int channel = v * channels_per_vector, part = channel / kPartChannels;
        return part_offset(part, p.fp8) + part_scale_bytes(part_channels(p.hidden, part), p.fp8) +
               static_cast<size_t>(channel % kPartChannels) * element_bytes;
    };
    for (int base = 0; base < num_vectors; base += 32 * kUnpackUnroll) {
        Vec values[kUnpackUnroll];
#pragma unroll
        for (int u = 0; u < kUnpackUnroll; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vectors)
                values[u] = load_landed(reinterpret_cast<const Vec*>(message + source_offset(v)));
        }
#pragma unroll
        for (int u = 0; u < kUnpackUnroll; ++u) {
            const int v = base + u * 32 + lane;
            if (v < num_vectors) target[v] = values[u];
        }
    }
    if (p.fp8) {
        // Scale g sits in the chunk of part g / 8 at index g % 8; outputs are [E_local, G or W, R * T].
        const int num_scales = p.hidden / kScaleBlock, per_part = kPartChannels / kScaleBlock;
        auto scale_at = [&](int g) {
            return load_landed(reinterpret_cast<const float*>(message + part_offset(g / per_part, true)) +
                               g % per_part);
        };
        if (!p.ue8m0) {
            float* scales = reinterpret_cast<float*>(p.recv_scales);
            for (int g = lane; g < num_scales; g += 32)
                scales[(static_cast<size_t>(local_expert) * num_scales + g) * capacity + row] = scale_at(g);
        } else {
            const int num_words = (num_scales + 3) / 4;
            int* words = reinterpret_cast<int*>(p.recv_scales);
            for (int w = lane; w < num_words; w += 32) {
                uint32_t word = 0;
                for (int i = 0; i < 4 && 4 * w + i < num_scales; ++i)
                    word |= ue8m0_byte(scale_at(4 * w + i)) << (8 * i);
                words[(static_cast<size_t>(local_expert) * num_words + w) * capacity + row] =
                    static_cast<int>(word);
            }
        }
    }
    if (lane == 0) {
        const int4 header = load_landed(reinterpret_cast<const int4*>(message));
        p.recv_src_info[row_index] = header.x;
        p.recv_route[row_index] = source * kMaxTopk + header.y;
    }
}

template <typename Vec>
__device__ void dispatch_receive(const DispatchParams& p, int* shared, int* flag) {
    const Symmetric& sym = p.sym;
    const int warps = blockDim.x / 32;
    const int global_warp = blockIdx.x * warps + threadIdx.x / 32, total_warps = gridDim.x * warps;
    const int R = p.num_ranks, experts = p.experts_per_rank, pairs = experts * R;
    const int capacity = R * p.max_tokens, parts = num_parts(p.hidden);
    const unsigned int seq = read_counter(&bank_counters(sym)->dispatch_recv_seq) + 1;
    const long long start = global_time_ns();

    int* count = shared;                // [E_local * R] messages of (expert, source)
    int* begin = count + pairs;         // [E_local * R] first packed row of (expert, source)
    int* expert_start = begin + pairs;  // [E_local + 1] first row of each expert in row order
    auto* source_wait = reinterpret_cast<unsigned long long*>(
        reinterpret_cast<uintptr_t>(expert_start + experts + 1 + 1) & ~uintptr_t(7));  // [R], block 0
    const bool records_stats = blockIdx.x == 0 && p.wait_recv_stats != nullptr;
    if (records_stats)
        for (int r = threadIdx.x; r < R; r += blockDim.x) source_wait[r] = 0;

    // E. Counts of this call, then the data they announce.
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        unsigned int n = 0;
        wait_sequence(local_signal(sym, sym.signals.dispatch_count, i), seq, p.wait, kWaitDispatchCount,
                      i % R, &n);
        count[i] = static_cast<int>(n);
    }
    if (block_stopped(p.wait, flag)) return;
    const uint64_t* expected = local_signal(sym, sym.signals.dispatch_expected, 0);
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const uint64_t target = expected[i] + static_cast<uint64_t>(parts + 1) * count[i];
        if (wait_at_least(local_signal(sym, sym.signals.dispatch_arrival, i), target, p.wait,
                          kWaitDispatchData, i % R) &&
            records_stats)
            atomicMax(&source_wait[i % R], static_cast<unsigned long long>(global_time_ns() - start));
    }
    if (block_stopped(p.wait, flag)) return;

    // Packing: rows of an expert by source rank, then slot (token order).
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        int running = 0;
        for (int r = 0; r < R; ++r) {
            begin[e * R + r] = running;
            running += count[e * R + r];
        }
        expert_start[e + 1] = running;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        expert_start[0] = 0;
        for (int e = 0; e < experts; ++e) expert_start[e + 1] += expert_start[e];
    }
    __syncthreads();
    if (blockIdx.x == 0) {
        for (int e = threadIdx.x; e < experts; e += blockDim.x) {
            const int rows = expert_start[e + 1] - expert_start[e];
            p.recv_count[e] = rows;
            if (p.cumulative_recv_stats != nullptr) p.cumulative_recv_stats[e] += rows;
        }
        for (int i = threadIdx.x; i < pairs; i += blockDim.x)
            p.recv_layout_range[i] = (static_cast<int64_t>(begin[i]) << 32) | static_cast<int64_t>(count[i]);
        if (records_stats)
            for (int r = threadIdx.x; r < R; r += blockDim.x)
                p.wait_recv_stats[r] += static_cast<int64_t>(source_wait[r]);
    }

    // F. Copy every row into the packed outputs.
    const int total_rows = expert_start[experts];
    for (int row_in_order = global_warp; row_in_order < total_rows; row_in_order += total_warps) {
        const int e = last_not_above(expert_start, experts, row_in_order);
        const int row = row_in_order - expert_start[e];
        const int source = last_not_above(begin + e * R, R, row);
        const int slot = row - begin[e * R + source];
        unpack_row<Vec>(p, local_at(sym, landing_message(p, e, source, slot)), e, row, source);
    }
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
         i < static_cast<size_t>(experts) * capacity; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const int e = static_cast<int>(i / capacity), row = static_cast<int>(i % capacity);
        if (row >= expert_start[e + 1] - expert_start[e]) {
            p.recv_src_info[i] = -1;
            p.recv_route[i] = -1;
        }
    }

    // G. Consumed; the bank may take the next call's messages from every source.
    if (last_block(&bank_counters(sym)->dispatch_recv_ticket, flag)) {
        uint64_t* consumed = local_signal(sym, sym.signals.dispatch_expected, 0);
        for (int i = threadIdx.x; i < pairs; i += blockDim.x)
            consumed[i] += static_cast<uint64_t>(parts + 1) * count[i];
        if (threadIdx.x == 0) bank_counters(sym)->dispatch_recv_seq = seq;
        for (int r = threadIdx.x; r < R; r += blockDim.x)
            signal_set(sym, r, signal_word(sym, sym.signals.dispatch_released, p.rank), seq);
    }
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const DispatchParams p) {
    extern __shared__ __align__(16) int shared[];
    __shared__ int flag;
    if (p.phases & kPhaseSend) {
        if (!dispatch_send<Vec>(p, shared, &flag)) return;
        __syncthreads();  // the receive phase reuses shared memory
    }
    if (p.phases & kPhaseReceive) dispatch_receive<Vec>(p, shared, &flag);
}

}  // namespace

size_t dispatch_shared_bytes(int num_experts, int experts_per_rank, int num_ranks, int num_selections) {
    const size_t send = (2 * static_cast<size_t>(num_experts) + num_selections) * sizeof(int);
    const size_t receive =
        (2 * static_cast<size_t>(experts_per_rank) * num_ranks + experts_per_rank + 2) * sizeof(int) + 8 +
        static_cast<size_t>(num_ranks) * sizeof(unsigned long long);
    return send > receive ? send : receive;
}

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream) {
    const size_t shared = dispatch_shared_bytes(params.num_experts, params.experts_per_rank, params.num_ranks,
                                                params.num_tokens * params.num_topk);
    const bool wide = params.fp8 || params.hidden % 8 == 0;
    auto kernel = wide ? dispatch_kernel<int4> : dispatch_kernel<int>;
    if (shared > 48 * 1024)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    kernel<<<num_blocks, kThreads, shared, stream>>>(params);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("deepep_megatron: low-latency dispatch launch failed: ") +
                                 cudaGetErrorString(status));
}

}  // namespace low_latency
}  // namespace deepep_megatron
