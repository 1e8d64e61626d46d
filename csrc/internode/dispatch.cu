// dispatch: each token crosses the network once per destination node other than its own, then is
// forwarded over NVLink (peer mappings) to the ranks of that node that hold its experts, straight
// into its final row (source rank, then token: the portable backend's order).
//
// Two kernels per call (README.md has the protocol):
//   send    block 0 announces that this rank's landing area and receive block are free for this
//           operation; every block waits until the same-index rank of each other node announced
//           the same, then one warp per token writes the token's record (header with its row at
//           every rank, payload, scales, top-k) into staging and puts it, with a +1 signal, into
//           the landing area of the same-index rank of each other node it goes to.
//   forward every block waits for the records of every other node and for the receive blocks of
//           its node's ranks; one warp per record (landed ones, and this rank's own tokens for its
//           own node, read from staging) writes it into the receive block of each rank of this
//           node that it goes to; the last block meets the node's other forwarders, so the kernel
//           ends when this rank's receive block is complete.
#include "common/check.h"
#include "device/token_loop.cuh"
#include "device/vector_copy.cuh"
#include "internode/device.cuh"
#include "internode/launch.h"
#include "internode/phases.h"

namespace deepep_megatron::internode {

namespace {

constexpr int kCopyUnroll = 4;  // vectors per lane in flight

// The warp copies `count` vectors from `source` to every non-null target.
template <typename Vec, typename Load>
__device__ __forceinline__ void copy_to_targets(Vec* const* targets, int num_targets, const Vec* source,
                                                int count, int lane, Load load) {
    for (int base = lane; base < count; base += 32 * kCopyUnroll) {
        Vec values[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const int i = base + u * 32;
            if (i < count) values[u] = load(source + i);
        }
#pragma unroll
        for (int t = 0; t < MAX_RANKS_PER_NODE; ++t) {
            if (t >= num_targets || targets[t] == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kCopyUnroll; ++u) {
                const int i = base + u * 32;
                if (i < count) targets[t][i] = values[u];
            }
        }
    }
}

// How a copy reads: inputs once through the read-only path; records (written by peers or by the
// previous kernel) coherently, skipping L1.
struct InputLoad {
    template <typename Vec>
    __device__ __forceinline__ Vec operator()(const Vec* address) const {
        return load_streaming(address);
    }
};
struct RecordLoad {
    template <typename Vec>
    __device__ __forceinline__ Vec operator()(const Vec* address) const {
        return load_peer(address);
    }
};

// ------------------------------------------------------------------------------------ send
__device__ void announce_dispatch(const DispatchParams& p) {
    const Group& g = p.group;
    if (blockIdx.x != 0) return;
    const int t = threadIdx.x;
    if (t < g.ranks_per_node) {
        set_node_flag(g, t, &SignalArea::receive_free, g.local, p.operation);
    } else if (t >= 32 && t - 32 < g.num_nodes && t - 32 != g.node) {
        set_remote_flag(g, t - 32, &SignalArea::landing_free, g.node, p.operation);
    }
}

// One token's record in staging: header, row table, payload, scales, top-k.
template <typename Vec>
__device__ void write_record(const DispatchParams& p, int token, uint8_t* record, const int* first_row,
                             int lane) {
    const Group& g = p.group;
    const RecordLayout& layout = p.areas.record;
    if (lane == 0) reinterpret_cast<int*>(record)[0] = token;
    int* rows = reinterpret_cast<int*>(record + layout.rows);
    for (int r = lane; r < g.num_ranks; r += 32) {
        const int slot = p.send_slot[static_cast<int64_t>(token) * g.num_ranks + r];
        rows[r] = slot >= 0 ? first_row[r] + slot : -1;
    }
    Vec* payload = reinterpret_cast<Vec*>(record + layout.payload);
    const Vec* source = reinterpret_cast<const Vec*>(p.x + static_cast<int64_t>(token) * p.row_bytes);
    copy_to_targets(&payload, 1, source, p.row_bytes / static_cast<int>(sizeof(Vec)), lane, InputLoad{});
    float* scales = reinterpret_cast<float*>(record + layout.scales);
    for (int i = lane; i < p.num_scales; i += 32)
        scales[i] = p.scales[static_cast<int64_t>(token) * p.num_scales + i];
    if (lane < p.num_topk) {
        const int64_t slot = static_cast<int64_t>(token) * p.num_topk + lane;
        reinterpret_cast<int64_t*>(record + layout.topk_idx)[lane] = p.topk_idx[slot];
        reinterpret_cast<float*>(record + layout.topk_weights)[lane] =
            p.topk_weights != nullptr ? p.topk_weights[slot] : 0.0f;
    }
}

// Returns whether this warp issued a put (warp-uniform).
template <typename Vec>
__device__ bool send_records(const DispatchParams& p, const int* first_row) {
    const Group& g = p.group;
    const int lane = lane_id();
    const size_t record_bytes = p.areas.record.bytes;
    bool put_issued = false;
    for_each_token_of_warp(p.num_tokens, [&](int token) {
        const int lane_slot =
            lane < g.num_nodes ? p.node_slot[static_cast<int64_t>(token) * g.num_nodes + lane] : -1;
        if (__ballot_sync(kFullMask, lane_slot >= 0) == 0) return;  // the token goes nowhere
        uint8_t* record = g.base + p.areas.staging + static_cast<size_t>(token) * record_bytes;
        write_record<Vec>(p, token, record, first_row, lane);
        fence_system();  // the record is visible to the put (a copy by this warp, or the NIC)
        __syncwarp();
        for (int node = 0; node < g.num_nodes; ++node) {
            const int slot = __shfl_sync(kFullMask, lane_slot, node);
            if (slot < 0 || node == g.node) continue;
            const size_t landing =
                p.areas.landing + (static_cast<size_t>(g.node) * p.max_tokens + slot) * record_bytes;
            nvshmemx_putmem_signal_nbi_warp(g.base + landing, record, record_bytes,
                                            arrival_counter(g, &SignalArea::dispatch_arrived, g.node), 1,
                                            NVSHMEM_SIGNAL_ADD, pe_of(g, node));
            put_issued = true;
        }
    });
    return put_issued;
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) dispatch_send_kernel(DispatchParams p) {
    __shared__ int first_row[kMaxRanks];  // row of my first token at every rank
    const Group& g = p.group;
    announce_dispatch(p);
    if (block_stopped_at_start(g.wait, kPhaseDispatchStart)) return;
    for (int r = threadIdx.x; r < g.num_ranks; r += blockDim.x) {
        int before = 0;
        for (int src = 0; src < g.rank; ++src) before += p.count_matrix[src * g.num_ranks + r];
        first_row[r] = before;
    }
    bool ready = true;
    const int node = threadIdx.x;
    if (node < g.num_nodes && node != g.node)
        ready = wait_flag(g, &my_signals(g)->landing_free[node], p.operation, kPhaseLandingCredit,
                          pe_of(g, node));
    if (!__syncthreads_and(ready)) return;
    const bool put_issued = send_records<Vec>(p, first_row);
    __syncwarp();
    // Staging may be rewritten by the next call. Only warps that put wait (on a network each
    // quiet is a round trip).
    if (put_issued && lane_id() == 0) nvshmem_quiet();
}

// ------------------------------------------------------------------------------------ forward
struct NodeTargets {
    uint8_t* block[MAX_RANKS_PER_NODE];  // receive block of each rank of my node, mapped
    ReceiveLayout layout[MAX_RANKS_PER_NODE];
    int item_start[MAX_NODES + 1];  // first work item of each source node's records
};

__device__ bool learn_node_targets(const DispatchParams& p, NodeTargets& targets) {
    const Group& g = p.group;
    const int t = threadIdx.x;
    bool ready = true;
    if (t < g.num_nodes) {
        if (t != g.node)
            ready = wait_arrivals(g, &my_signals(g)->dispatch_arrived[t], p.arrivals_total[t],
                                  p.records_from_node[t], p.operation, kPhaseRecords, pe_of(g, t));
    } else if (t >= 32 && t - 32 < g.ranks_per_node) {
        const int local = t - 32;
        const int rank = g.node * g.ranks_per_node + local;
        ready = wait_flag(g, &my_signals(g)->receive_free[local], p.operation, kPhaseReceiveCredit, rank);
        int rows = 0;
        for (int src = 0; src < g.num_ranks; ++src) rows += p.count_matrix[src * g.num_ranks + rank];
        targets.block[local] = g.node_peer[local] + p.areas.receive;
        targets.layout[local] = receive_layout(rows, p.row_bytes, p.num_scales, p.num_topk);
    } else if (t == 64) {
        targets.item_start[0] = 0;
        for (int node = 0; node < g.num_nodes; ++node)
            targets.item_start[node + 1] = targets.item_start[node] + p.records_from_node[node];
    }
    return __syncthreads_and(ready) != 0;
}

// Scales, top-k (as the destination's local expert ids; -1 and weight 0 for other ranks'
// experts) and the source token of one record at one destination row.
__device__ void forward_metadata(const DispatchParams& p, const uint8_t* record, uint8_t* block,
                                 const ReceiveLayout& layout, int row, int rank, int src_token, int lane) {
    const RecordLayout& rec = p.areas.record;
    const float* scales = reinterpret_cast<const float*>(record + rec.scales);
    float* scales_out =
        reinterpret_cast<float*>(block + layout.scales) + static_cast<int64_t>(row) * p.num_scales;
    for (int i = lane; i < p.num_scales; i += 32) scales_out[i] = load_landed(scales + i);
    if (lane < p.num_topk) {
        const int64_t expert = load_landed(reinterpret_cast<const int64_t*>(record + rec.topk_idx) + lane);
        const float weight = load_landed(reinterpret_cast<const float*>(record + rec.topk_weights) + lane);
        const int64_t local = expert - static_cast<int64_t>(rank) * p.experts_per_rank;
        const bool mine = expert >= 0 && local >= 0 && local < p.experts_per_rank;
        const int64_t slot = static_cast<int64_t>(row) * p.num_topk + lane;
        reinterpret_cast<int64_t*>(block + layout.topk_idx)[slot] = mine ? local : -1;
        reinterpret_cast<float*>(block + layout.topk_weights)[slot] = mine ? weight : 0.0f;
    }
    if (lane == 0) reinterpret_cast<int*>(block + layout.src_idx)[row] = src_token;
}

template <typename Vec>
__device__ void forward_records(const DispatchParams& p, const NodeTargets& targets) {
    const Group& g = p.group;
    const int lane = lane_id();
    const RecordLayout& rec = p.areas.record;
    const int num_items = targets.item_start[g.num_nodes];
    for_each_token_of_warp(num_items, [&](int item) {
        const NodeItem at = node_item(targets.item_start, g.num_nodes, item);
        const size_t record_offset =
            at.node == g.node
                ? p.areas.staging + static_cast<size_t>(p.own_node_tokens[at.index]) * rec.bytes
                : p.areas.landing + (static_cast<size_t>(at.node) * p.max_tokens + at.index) * rec.bytes;
        const uint8_t* record = g.base + record_offset;
        const int* node_rows = reinterpret_cast<const int*>(record + rec.rows) + g.node * g.ranks_per_node;
        const int lane_row = lane < g.ranks_per_node ? load_landed(node_rows + lane) : -1;
        if (lane < g.ranks_per_node)
            p.forward_rows[(static_cast<int64_t>(at.node) * p.max_tokens + at.index) * g.ranks_per_node +
                           lane] = lane_row;
        const int src_token = load_landed(reinterpret_cast<const int*>(record));
        int rows[MAX_RANKS_PER_NODE];
        Vec* payload_targets[MAX_RANKS_PER_NODE];
#pragma unroll
        for (int local = 0; local < MAX_RANKS_PER_NODE; ++local) {
            rows[local] = __shfl_sync(kFullMask, lane_row, local);
            payload_targets[local] = nullptr;
            if (local < g.ranks_per_node && rows[local] >= 0)
                payload_targets[local] =
                    reinterpret_cast<Vec*>(targets.block[local] + targets.layout[local].x +
                                           static_cast<int64_t>(rows[local]) * p.row_bytes);
        }
        copy_to_targets(payload_targets, g.ranks_per_node, reinterpret_cast<const Vec*>(record + rec.payload),
                        p.row_bytes / static_cast<int>(sizeof(Vec)), lane, RecordLoad{});
#pragma unroll
        for (int local = 0; local < MAX_RANKS_PER_NODE; ++local) {  // unrolled: `rows` stays in registers
            if (rows[local] < 0) continue;
            forward_metadata(p, record, targets.block[local], targets.layout[local], rows[local],
                             g.node * g.ranks_per_node + local, src_token, lane);
        }
    });
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads, 1) dispatch_forward_kernel(DispatchParams p) {
    __shared__ NodeTargets targets;
    const Group& g = p.group;
    if (block_stopped_at_start(g.wait, kPhaseDispatchStart)) return;
    if (!learn_node_targets(p, targets)) return;
    forward_records<Vec>(p, targets);
    fence_system();  // this block's rows are visible before the node learns it is done
    if (last_block(&my_signals(g)->tickets[kTicketForward]))
        meet_node(g, &SignalArea::forward_done, p.operation, kPhaseForwardDone);
}

}  // namespace

void launch_dispatch(const DispatchParams& params, int num_blocks, cudaStream_t stream) {
    const bool wide = params.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(params.x) % 16 == 0;
    if (wide) {
        dispatch_send_kernel<int4><<<num_blocks, kThreads, 0, stream>>>(params);
        DEEPEP_CUDA_CHECK(cudaGetLastError());
        dispatch_forward_kernel<int4><<<num_blocks, kThreads, 0, stream>>>(params);
    } else {
        dispatch_send_kernel<int><<<num_blocks, kThreads, 0, stream>>>(params);
        DEEPEP_CUDA_CHECK(cudaGetLastError());
        dispatch_forward_kernel<int><<<num_blocks, kThreads, 0, stream>>>(params);
    }
    DEEPEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepep_megatron::internode
