// combine: the reverse of dispatch. Each rank sums, for every record it forwarded, the rows its
// node's ranks return for that token (fp32, ranks ascending), and sends that one partial sum over
// the network to the token's home rank (nothing crosses the network for the home's own node); the
// home rank adds the partial sums of its tokens, nodes ascending, then the biases, and rounds once.
//
// Two kernels per call (README.md has the protocol):
//   pull    block 0 announces that this rank's combine input is in place (to its node) and that
//           its partial landing area is free (to the same-index rank of each other node); every
//           block waits for the inputs of its node's ranks and for the landing areas it sends to;
//           one warp per forwarded record sums the rows and stores or puts the partial; the last
//           block meets the node's other ranks, so no rank's input is reused while it is read.
//   reduce  every block waits for the partial sums of each other node; one warp per token adds
//           them with the biases and writes bf16 (and the summed top-k weights).
#include "common/check.h"
#include "device/token_loop.cuh"
#include "device/vector_copy.cuh"
#include "internode/device.cuh"
#include "internode/launch.h"
#include "internode/phases.h"

namespace deepep_megatron::internode {

namespace {

// fp32 values of one bf16 vector (int4: 8 channels; int: 2 channels), loaded or stored as one unit.
template <typename Vec>
struct Floats;
template <>
struct Floats<int4> {
    static constexpr int kValues = 8;
    __device__ static void load(const float* address, float* values) {
        const float4 a = __ldcg(reinterpret_cast<const float4*>(address));
        const float4 b = __ldcg(reinterpret_cast<const float4*>(address) + 1);
        values[0] = a.x, values[1] = a.y, values[2] = a.z, values[3] = a.w;
        values[4] = b.x, values[5] = b.y, values[6] = b.z, values[7] = b.w;
    }
    __device__ static void store(float* address, const float* values) {
        reinterpret_cast<float4*>(address)[0] = make_float4(values[0], values[1], values[2], values[3]);
        reinterpret_cast<float4*>(address)[1] = make_float4(values[4], values[5], values[6], values[7]);
    }
};
template <>
struct Floats<int> {
    static constexpr int kValues = 2;
    __device__ static void load(const float* address, float* values) {
        const float2 a = __ldcg(reinterpret_cast<const float2*>(address));
        values[0] = a.x, values[1] = a.y;
    }
    __device__ static void store(float* address, const float* values) {
        *reinterpret_cast<float2*>(address) = make_float2(values[0], values[1]);
    }
};

// ------------------------------------------------------------------------------------ pull
struct NodeInputs {
    const uint8_t* x[MAX_RANKS_PER_NODE];      // combine input rows of each rank of my node
    const float* weights[MAX_RANKS_PER_NODE];  // their top-k weights, or null
    int item_start[MAX_NODES + 1];
};

__device__ void announce_combine(const CombineParams& p) {
    const Group& g = p.group;
    if (blockIdx.x != 0) return;
    const int t = threadIdx.x;
    if (t < g.ranks_per_node) {
        set_node_flag(g, t, &SignalArea::input_ready, g.local, p.operation);
    } else if (t >= 32 && t - 32 < g.num_nodes && t - 32 != g.node) {
        set_remote_flag(g, t - 32, &SignalArea::partials_free, g.node, p.operation);
    }
}

__device__ bool learn_node_inputs(const CombineParams& p, NodeInputs& inputs) {
    const Group& g = p.group;
    const int t = threadIdx.x;
    bool ready = true;
    if (t < g.ranks_per_node) {
        ready = wait_flag(g, &my_signals(g)->input_ready[t], p.operation, kPhaseCombineInput,
                          g.node * g.ranks_per_node + t);
        const uint8_t* input = g.node_peer[t] + p.areas.input;
        inputs.x[t] = input + p.areas.input_rows.x;
        inputs.weights[t] = p.num_topk > 0
                                ? reinterpret_cast<const float*>(input + p.areas.input_rows.topk_weights)
                                : nullptr;
    } else if (t >= 32 && t - 32 < g.num_nodes) {
        const int node = t - 32;
        if (node != g.node)
            ready = wait_flag(g, &my_signals(g)->partials_free[node], p.operation, kPhasePartialCredit,
                              pe_of(g, node));
    } else if (t == 64) {
        inputs.item_start[0] = 0;
        for (int node = 0; node < g.num_nodes; ++node)
            inputs.item_start[node + 1] = inputs.item_start[node] + p.records_from_node[node];
    }
    return __syncthreads_and(ready) != 0;
}

// One partial: the rows of the token at my node's ranks, summed in fp32 (ranks ascending).
template <typename Vec>
__device__ void sum_rows(const CombineParams& p, const NodeInputs& inputs, const int* rows, float* partial,
                         int lane) {
    using F = Floats<Vec>;
    const int num_vectors = p.hidden / F::kValues;
    const int64_t row_bytes = static_cast<int64_t>(p.hidden) * 2;
    for (int i = lane; i < num_vectors; i += 32) {
        float acc[F::kValues];
#pragma unroll
        for (int v = 0; v < F::kValues; ++v) acc[v] = 0.0f;
#pragma unroll
        for (int local = 0; local < MAX_RANKS_PER_NODE; ++local) {  // unrolled: `rows` stays in registers
            if (rows[local] < 0) continue;
            const Vec* row = reinterpret_cast<const Vec*>(inputs.x[local] + rows[local] * row_bytes);
            accumulate_bf16(acc, load_peer(row + i));
        }
        F::store(partial + static_cast<int64_t>(i) * F::kValues, acc);
    }
    if (p.num_topk > 0 && lane < p.num_topk) {
        float sum = 0.0f;
#pragma unroll
        for (int local = 0; local < MAX_RANKS_PER_NODE; ++local)
            if (rows[local] >= 0)
                sum += load_landed(inputs.weights[local] + static_cast<int64_t>(rows[local]) * p.num_topk +
                                   lane);
        reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(partial) + p.areas.partial.topk_weights)[lane] =
            sum;
    }
}

// Returns whether this warp issued a put (warp-uniform).
template <typename Vec>
__device__ bool send_partials(const CombineParams& p, const NodeInputs& inputs) {
    const Group& g = p.group;
    const int lane = lane_id();
    const size_t partial_bytes = p.areas.partial.bytes;
    bool put_issued = false;
    for_each_token_of_warp(inputs.item_start[g.num_nodes], [&](int item) {
        const NodeItem at = node_item(inputs.item_start, g.num_nodes, item);
        const int lane_row = lane < g.ranks_per_node
                                 ? p.forward_rows[(static_cast<int64_t>(at.node) * p.max_tokens + at.index) *
                                                      g.ranks_per_node +
                                                  lane]
                                 : -1;
        int rows[MAX_RANKS_PER_NODE];
#pragma unroll
        for (int local = 0; local < MAX_RANKS_PER_NODE; ++local)
            rows[local] = __shfl_sync(kFullMask, lane_row, local);
        const size_t slot = static_cast<size_t>(at.node) * p.max_tokens + at.index;
        const bool home_here = at.node == g.node;
        // My own tokens' partials go straight to my landing area; others' to staging, then out.
        uint8_t* partial =
            g.base + (home_here ? p.areas.partial_landing : p.areas.partial_staging) + slot * partial_bytes;
        sum_rows<Vec>(p, inputs, rows, reinterpret_cast<float*>(partial), lane);
        if (home_here) return;
        fence_system();
        __syncwarp();
        const size_t landing =
            p.areas.partial_landing + (static_cast<size_t>(g.node) * p.max_tokens + at.index) * partial_bytes;
        nvshmemx_putmem_signal_nbi_warp(g.base + landing, partial, partial_bytes,
                                        arrival_counter(g, &SignalArea::combine_arrived, g.node), 1,
                                        NVSHMEM_SIGNAL_ADD, pe_of(g, at.node));
        put_issued = true;
    });
    return put_issued;
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) combine_pull_kernel(CombineParams p) {
    __shared__ NodeInputs inputs;
    const Group& g = p.group;
    announce_combine(p);
    if (block_stopped_at_start(g.wait, kPhaseCombineStart)) return;
    if (!learn_node_inputs(p, inputs)) return;
    const bool put_issued = send_partials<Vec>(p, inputs);
    __syncwarp();
    if (put_issued && lane_id() == 0) nvshmem_quiet();  // partial staging may be rewritten next call
    fence_system();  // this block's reads are done and its partials visible
    if (last_block(&my_signals(g)->tickets[kTicketPull]))
        meet_node(g, &SignalArea::pull_done, p.operation, kPhasePullDone);
}

// ------------------------------------------------------------------------------------ reduce
template <typename Vec>
__device__ void reduce_tokens(const CombineParams& p) {
    using F = Floats<Vec>;
    const Group& g = p.group;
    const int lane = lane_id();
    const size_t partial_bytes = p.areas.partial.bytes;
    const int num_vectors = p.hidden / F::kValues;
    for_each_token_of_warp(p.num_tokens, [&](int token) {
        const int lane_slot =
            lane < g.num_nodes ? p.node_slot[static_cast<int64_t>(token) * g.num_nodes + lane] : -1;
        const float* partials[MAX_NODES];
#pragma unroll
        for (int node = 0; node < MAX_NODES; ++node) {
            const int slot = __shfl_sync(kFullMask, lane_slot, node);
            partials[node] = node < g.num_nodes && slot >= 0
                                 ? reinterpret_cast<const float*>(
                                       g.base + p.areas.partial_landing +
                                       (static_cast<size_t>(node) * p.max_tokens + slot) * partial_bytes)
                                 : nullptr;
        }
        const int64_t row = static_cast<int64_t>(token) * num_vectors;
        for (int i = lane; i < num_vectors; i += 32) {
            float acc[F::kValues];
#pragma unroll
            for (int v = 0; v < F::kValues; ++v) acc[v] = 0.0f;
#pragma unroll
            for (int node = 0; node < MAX_NODES; ++node) {
                if (partials[node] == nullptr) continue;
                float values[F::kValues];
                F::load(partials[node] + static_cast<int64_t>(i) * F::kValues, values);
#pragma unroll
                for (int v = 0; v < F::kValues; ++v) acc[v] += values[v];
            }
            if (p.bias0 != nullptr)
                accumulate_bf16(acc, load_streaming(reinterpret_cast<const Vec*>(p.bias0) + row + i));
            if (p.bias1 != nullptr)
                accumulate_bf16(acc, load_streaming(reinterpret_cast<const Vec*>(p.bias1) + row + i));
            reinterpret_cast<Vec*>(p.combined_x)[row + i] = pack_bf16(acc, static_cast<Vec*>(nullptr));
        }
        if (p.combined_weights != nullptr && lane < p.num_topk) {
            float sum = 0.0f;
#pragma unroll
            for (int node = 0; node < MAX_NODES; ++node) {  // unrolled: `partials` stays in registers
                if (partials[node] == nullptr) continue;
                sum += load_landed(
                    reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(partials[node]) +
                                                   p.areas.partial.topk_weights) +
                    lane);
            }
            p.combined_weights[static_cast<int64_t>(token) * p.num_topk + lane] = sum;
        }
    });
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) combine_reduce_kernel(CombineParams p) {
    const Group& g = p.group;
    if (block_stopped_at_start(g.wait, kPhaseCombineStart)) return;
    bool ready = true;
    const int node = threadIdx.x;
    if (node < g.num_nodes && node != g.node)
        ready = wait_arrivals(g, &my_signals(g)->combine_arrived[node], p.arrivals_total[node],
                              p.tokens_to_node[node], p.operation, kPhasePartials, pe_of(g, node));
    if (!__syncthreads_and(ready)) return;
    reduce_tokens<Vec>(p);
}

}  // namespace

void launch_combine(const CombineParams& params, int num_blocks, cudaStream_t stream) {
    auto aligned = [](const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; };
    const bool wide = params.hidden % 8 == 0 && aligned(params.bias0) && aligned(params.bias1) &&
                      aligned(params.combined_x);
    if (wide) {
        combine_pull_kernel<int4><<<num_blocks, kThreads, 0, stream>>>(params);
        DEEPEP_CUDA_CHECK(cudaGetLastError());
        combine_reduce_kernel<int4><<<num_blocks, kThreads, 0, stream>>>(params);
    } else {
        combine_pull_kernel<int><<<num_blocks, kThreads, 0, stream>>>(params);
        DEEPEP_CUDA_CHECK(cudaGetLastError());
        combine_reduce_kernel<int><<<num_blocks, kThreads, 0, stream>>>(params);
    }
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::internode
