#include "internode/runtime.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>

#include "common/check.h"
#include "internode/launch.h"

namespace deepep_megatron::internode {

namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
    require(t.defined() && t.is_cuda(), std::string(name) + " must be a CUDA tensor");
    require(t.dim() == dim, std::string(name) + " must have " + std::to_string(dim) + " dimensions");
}

void check_int_table(const at::Tensor& t, const char* name, int64_t rows, int64_t columns) {
    check_tensor(t, name, 2);
    require(
        t.scalar_type() == at::kInt && t.size(0) == rows && t.size(1) == columns,
        std::string(name) + " must be [" + std::to_string(rows) + ", " + std::to_string(columns) + "] int32");
}

// Per-node counts of the call into a fixed kernel array.
void copy_counts(const std::vector<int64_t>& counts, int num_nodes, int* out, const char* name) {
    require(static_cast<int>(counts.size()) == num_nodes, std::string(name) + " needs one count per node");
    for (int node = 0; node < num_nodes; ++node) {
        require(counts[node] >= 0, std::string(name) + " must not be negative");
        out[node] = static_cast<int>(counts[node]);
    }
}

}  // namespace

Runtime::Runtime(int rank, int num_ranks, int ranks_per_node, int64_t block_address, int64_t block_bytes,
                 const std::vector<int64_t>& node_peer_bases, double timeout_seconds)
    : rank_(rank),
      num_ranks_(num_ranks),
      ranks_per_node_(ranks_per_node),
      num_nodes_(ranks_per_node > 0 ? num_ranks / ranks_per_node : 0),
      block_(reinterpret_cast<uint8_t*>(block_address)),
      block_bytes_(static_cast<size_t>(block_bytes)),
      timeout_ns_(static_cast<long long>(timeout_seconds * 1e9)) {
    require(num_ranks >= 1 && rank >= 0 && rank < num_ranks, "rank out of range");
    require(ranks_per_node >= 1 && ranks_per_node <= MAX_RANKS_PER_NODE && num_ranks % ranks_per_node == 0,
            "ranks per node must divide the group and be at most " + std::to_string(MAX_RANKS_PER_NODE));
    require(num_nodes_ <= MAX_NODES, "at most " + std::to_string(MAX_NODES) + " nodes");
    require(static_cast<int>(node_peer_bases.size()) == ranks_per_node,
            "one mapped block per rank of the node");
    require(block_ != nullptr && block_bytes_ >= kDataStart, "the symmetric block is too small");
    require(node_peer_bases[rank % ranks_per_node] == block_address, "my own block must map to itself");
    for (int64_t base : node_peer_bases) {
        require(base != 0, "every rank of the node must be mapped");
        node_peers_.push_back(reinterpret_cast<uint8_t*>(base));
    }
    dispatch_arrived_.assign(num_nodes_, 0);
    combine_arrived_.assign(num_nodes_, 0);
    DEEPEP_CUDA_CHECK(cudaGetDevice(&device_));
    // Flags, counters and tickets start at zero; operation numbers start at 1.
    DEEPEP_CUDA_CHECK(cudaMemset(block_, 0, kDataStart));
    DEEPEP_CUDA_CHECK(cudaDeviceSynchronize());
}

Runtime::~Runtime() {
    try {
        destroy();
    } catch (...) {
    }
}

void Runtime::destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    block_ = nullptr;  // the caller's (NVSHMEM allocation)
    if (failed_ || (record_.host() != nullptr && record_.host()->written)) {
        // After a timeout, blocks of the failed operation that were not yet resident (and kernels
        // queued behind it) may still write the record: keep it until the process ends, as the
        // other families do (see intranode::Runtime::destroy).
        record_.abandon();
        return;
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    record_.reset();
}

int64_t Runtime::required_bytes(int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t num_ranks,
                                int64_t ranks_per_node, int64_t max_recv_rows) {
    require(max_tokens >= 1 && hidden >= 2 && ranks_per_node >= 1 && num_ranks % ranks_per_node == 0,
            "bad sizes");
    const int nodes = static_cast<int>(num_ranks / ranks_per_node);
    const int tokens = static_cast<int>(max_tokens), rows = static_cast<int>(max_recv_rows);
    const int topk = static_cast<int>(num_topk), ranks = static_cast<int>(num_ranks),
              h = static_cast<int>(hidden);
    size_t end = dispatch_areas(tokens, rows, h * 2, 0, topk, ranks, nodes).end;
    if (hidden % FP8_BLOCK_SIZE == 0)
        end = std::max(end, dispatch_areas(tokens, rows, h, h / FP8_BLOCK_SIZE, topk, ranks, nodes).end);
    end = std::max(end, combine_areas(tokens, rows, h, topk, nodes).end);
    return static_cast<int64_t>(end);
}

void Runtime::check_health() {
    require(!destroyed_, "the runtime was destroyed");
    const TimeoutRecord* record = record_.host();
    if (record->written) {
        failed_ = true;
        throw DeviceTimeout(describe_timeout(*record, static_cast<double>(timeout_ns_) / 1e9));
    }
    if (failed_)
        throw DeviceTimeout("deepep_megatron: an earlier internode operation of this buffer timed out");
}

void Runtime::require_block(size_t end, const char* what) const {
    require(end <= block_bytes_, std::string("num_rdma_bytes=") + std::to_string(block_bytes_) +
                                     " is too small for this " + what + ": it needs " + std::to_string(end) +
                                     " (deepep_megatron.backends.internode.rdma_size_hint)");
}

Group Runtime::group() const {
    Group g{};
    g.rank = rank_;
    g.num_ranks = num_ranks_;
    g.ranks_per_node = ranks_per_node_;
    g.num_nodes = num_nodes_;
    g.node = rank_ / ranks_per_node_;
    g.local = rank_ % ranks_per_node_;
    g.base = block_;
    for (int local = 0; local < ranks_per_node_; ++local) g.node_peer[local] = node_peers_[local];
    g.wait.local = &reinterpret_cast<SignalArea*>(block_)->wait;
    g.wait.record = record_.device();
    g.wait.timeout_ns = timeout_ns_;
    g.wait.rank = rank_;
    return g;
}

// The first `valid_rows` rows of one section of my receive block into `out` (contiguous).
void Runtime::copy_out(const uint8_t* source, at::Tensor& out, int64_t valid_rows,
                       cudaStream_t stream) const {
    if (out.numel() == 0 || valid_rows == 0) return;
    const size_t bytes = static_cast<size_t>(valid_rows) * (out.numel() / out.size(0)) * out.element_size();
    DEEPEP_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), source, bytes, cudaMemcpyDeviceToDevice, stream));
}

// ------------------------------------------------------------------------------------ dispatch

DispatchOutputs Runtime::dispatch(const DispatchArgs& args) {
    check_health();
    check_tensor(args.x, "x", 2);
    require(args.x.element_size() <= 2, "x must be bf16 or float8_e4m3fn");
    const int64_t num_tokens = args.x.size(0);
    const int row_bytes = static_cast<int>(args.x.size(1) * args.x.element_size());
    require(row_bytes % 4 == 0, "a row must be a multiple of 4 bytes");
    check_int_table(args.send_slot, "send_slot", num_tokens, num_ranks_);
    check_int_table(args.node_slot, "node_slot", num_tokens, num_nodes_);
    check_int_table(args.count_matrix, "count_matrix", num_ranks_, num_ranks_);
    require(args.own_node_tokens.defined() && args.own_node_tokens.is_cuda() &&
                args.own_node_tokens.scalar_type() == at::kInt,
            "own_node_tokens must be a CUDA int32 tensor");
    require(args.max_tokens >= std::max<int64_t>(num_tokens, 1), "max_tokens must cover every rank's tokens");
    require(args.num_recv_rows >= args.num_recv_tokens && args.num_recv_tokens >= 0 &&
                args.max_recv_rows >= args.num_recv_rows,
            "bad receive row counts");
    require(args.num_sms >= 1 && args.num_sms <= kMaxBlocks,
            "num_sms must be in [1, " + std::to_string(kMaxBlocks) + "]");
    const int num_scales = args.scales ? static_cast<int>(args.scales->size(1)) : 0;
    const int num_topk = args.topk_idx ? static_cast<int>(args.topk_idx->size(1)) : 0;
    require(num_topk <= MAX_TOPK, "top-k is at most " + std::to_string(MAX_TOPK));
    require(args.experts_per_rank >= 0 && args.experts_per_rank <= MAX_LOCAL_EXPERTS, "bad experts per rank");
    const DispatchAreas areas =
        dispatch_areas(static_cast<int>(args.max_tokens), static_cast<int>(args.max_recv_rows), row_bytes,
                       num_scales, num_topk, num_ranks_, num_nodes_);
    require_block(areas.end, "dispatch");

    c10::cuda::CUDAGuard guard(args.x.device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const at::Tensor x = args.x.contiguous();
    const std::optional<at::Tensor> scales =
        args.scales ? std::optional<at::Tensor>(args.scales->contiguous()) : std::nullopt;
    const std::optional<at::Tensor> topk_idx =
        args.topk_idx ? std::optional<at::Tensor>(args.topk_idx->contiguous()) : std::nullopt;
    const std::optional<at::Tensor> topk_weights =
        args.topk_weights ? std::optional<at::Tensor>(args.topk_weights->contiguous()) : std::nullopt;
    const at::Tensor send_slot = args.send_slot.contiguous(), node_slot = args.node_slot.contiguous();
    const at::Tensor count_matrix = args.count_matrix.contiguous();
    const at::Tensor own_node_tokens = args.own_node_tokens.contiguous();

    DispatchOutputs out;
    const auto options = x.options();
    out.forward_rows = at::empty({num_nodes_, args.max_tokens, ranks_per_node_}, options.dtype(at::kInt));

    DispatchParams p{};
    p.x = static_cast<const uint8_t*>(x.data_ptr());
    p.scales = scales ? scales->data_ptr<float>() : nullptr;
    p.topk_idx = topk_idx ? topk_idx->data_ptr<int64_t>() : nullptr;
    p.topk_weights = topk_weights ? topk_weights->data_ptr<float>() : nullptr;
    p.send_slot = send_slot.data_ptr<int>();
    p.node_slot = node_slot.data_ptr<int>();
    p.count_matrix = count_matrix.data_ptr<int>();
    p.own_node_tokens = own_node_tokens.data_ptr<int>();
    p.forward_rows = out.forward_rows.data_ptr<int>();
    p.num_tokens = static_cast<int>(num_tokens);
    p.row_bytes = row_bytes;
    p.num_scales = num_scales;
    p.num_topk = num_topk;
    p.experts_per_rank = num_topk > 0 ? static_cast<int>(args.experts_per_rank) : 0;
    p.max_tokens = static_cast<int>(args.max_tokens);
    copy_counts(args.records_from_node, num_nodes_, p.records_from_node, "records_from_node");
    const int my_node = rank_ / ranks_per_node_;
    require(p.records_from_node[my_node] == own_node_tokens.numel(),
            "records_from_node of my own node must count own_node_tokens");
    // Every check before the running totals move: a refusal must leave them as the peers see them.
    for (int node = 0; node < num_nodes_; ++node)
        require(p.records_from_node[node] <= args.max_tokens, "records_from_node exceeds max_tokens");
    for (int node = 0; node < num_nodes_; ++node) {
        if (node != my_node)
            dispatch_arrived_[node] += static_cast<unsigned long long>(p.records_from_node[node]);
        p.arrivals_total[node] = dispatch_arrived_[node];
    }
    p.operation = ++operation_;
    p.areas = areas;
    p.group = group();
    launch_dispatch(p, static_cast<int>(args.num_sms), stream);

    // Outputs: the received rows out of the receive block, padded to num_recv_rows.
    const int64_t rows = args.num_recv_rows, valid = args.num_recv_tokens;
    const bool padded = rows > valid;
    auto make = [&](at::IntArrayRef sizes, at::ScalarType dtype, double fill) {
        return padded ? at::full(sizes, fill, options.dtype(dtype)) : at::empty(sizes, options.dtype(dtype));
    };
    const ReceiveLayout layout = receive_layout(static_cast<int>(valid), row_bytes, num_scales, num_topk);
    const uint8_t* block = block_ + areas.receive;
    out.recv_x = make({rows, x.size(1)}, x.scalar_type(), 0);
    copy_out(block + layout.x, out.recv_x, valid, stream);
    if (scales) {
        out.recv_scales = make({rows, num_scales}, at::kFloat, 0);
        copy_out(block + layout.scales, *out.recv_scales, valid, stream);
    }
    if (topk_idx) {
        out.recv_topk_idx = make({rows, num_topk}, at::kLong, -1);
        copy_out(block + layout.topk_idx, *out.recv_topk_idx, valid, stream);
        out.recv_topk_weights = make({rows, num_topk}, at::kFloat, 0);
        copy_out(block + layout.topk_weights, *out.recv_topk_weights, valid, stream);
    }
    out.recv_src_idx = make({rows}, at::kInt, -1);
    if (valid > 0)
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(out.recv_src_idx.data_ptr(), block + layout.src_idx, valid * 4,
                                          cudaMemcpyDeviceToDevice, stream));
    return out;
}

// ------------------------------------------------------------------------------------ combine

CombineOutputs Runtime::combine(const CombineArgs& args) {
    check_health();
    check_tensor(args.x, "x", 2);
    require(args.x.scalar_type() == at::kBFloat16, "combine x must be bf16");
    const int64_t hidden = args.x.size(1), num_tokens = args.num_tokens;
    require(hidden % 2 == 0, "hidden must be even");
    require(args.num_recv_tokens >= 0 && args.num_recv_tokens <= args.x.size(0) &&
                args.x.size(0) <= args.max_recv_rows,
            "bad received row count");
    check_int_table(args.node_slot, "node_slot", num_tokens, num_nodes_);
    require(args.forward_rows.defined() && args.forward_rows.is_cuda() &&
                args.forward_rows.scalar_type() == at::kInt &&
                args.forward_rows.numel() == num_nodes_ * args.max_tokens * ranks_per_node_,
            "forward_rows does not match the dispatch");
    require(args.num_sms >= 1 && args.num_sms <= kMaxBlocks,
            "num_sms must be in [1, " + std::to_string(kMaxBlocks) + "]");
    if (args.topk_weights) {
        check_tensor(*args.topk_weights, "topk_weights", 2);
        require(
            args.topk_weights->scalar_type() == at::kFloat && args.topk_weights->size(0) == args.x.size(0),
            "topk_weights must be float32 with one row per row of x");
    }
    for (const auto* bias : {&args.bias0, &args.bias1}) {
        if (!*bias) continue;
        check_tensor(**bias, "bias", 2);
        require((*bias)->scalar_type() == at::kBFloat16 && (*bias)->size(0) == num_tokens &&
                    (*bias)->size(1) == hidden,
                "a bias must be [num_tokens, hidden] bf16");
    }
    const int num_topk = args.topk_weights ? static_cast<int>(args.topk_weights->size(1)) : 0;
    require(num_topk <= MAX_TOPK, "top-k is at most " + std::to_string(MAX_TOPK));
    CombineParams p{};
    copy_counts(args.records_from_node, num_nodes_, p.records_from_node, "records_from_node");
    copy_counts(args.tokens_to_node, num_nodes_, p.tokens_to_node, "tokens_to_node");
    for (int node = 0; node < num_nodes_; ++node)
        require(p.records_from_node[node] <= args.max_tokens && p.tokens_to_node[node] <= num_tokens,
                "per-node counts exceed the tokens");
    const CombineAreas areas =
        combine_areas(static_cast<int>(args.max_tokens), static_cast<int>(args.max_recv_rows),
                      static_cast<int>(hidden), num_topk, num_nodes_);
    require_block(areas.end, "combine");

    c10::cuda::CUDAGuard guard(args.x.device());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    // The input goes where my node's ranks read it (the previous combine's readers are done: its
    // pull kernel ended only after every rank of the node had finished reading).
    const at::Tensor x = args.x.contiguous();
    const int64_t valid = args.num_recv_tokens;
    if (valid > 0)
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(block_ + areas.input + areas.input_rows.x, x.data_ptr(),
                                          valid * hidden * 2, cudaMemcpyDeviceToDevice, stream));
    if (args.topk_weights && valid > 0) {
        const at::Tensor weights = args.topk_weights->contiguous();
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(block_ + areas.input + areas.input_rows.topk_weights,
                                          weights.data_ptr(), valid * num_topk * 4, cudaMemcpyDeviceToDevice,
                                          stream));
    }
    const std::optional<at::Tensor> bias0 =
        args.bias0 ? std::optional<at::Tensor>(args.bias0->contiguous()) : std::nullopt;
    const std::optional<at::Tensor> bias1 =
        args.bias1 ? std::optional<at::Tensor>(args.bias1->contiguous()) : std::nullopt;
    const at::Tensor forward_rows = args.forward_rows.contiguous(), node_slot = args.node_slot.contiguous();

    CombineOutputs out;
    out.combined_x = at::empty({num_tokens, hidden}, x.options());
    if (args.topk_weights)
        out.combined_weights = at::empty({num_tokens, num_topk}, x.options().dtype(at::kFloat));

    p.forward_rows = forward_rows.data_ptr<int>();
    p.node_slot = node_slot.data_ptr<int>();
    p.bias0 = bias0 ? static_cast<const uint16_t*>(bias0->data_ptr()) : nullptr;
    p.bias1 = bias1 ? static_cast<const uint16_t*>(bias1->data_ptr()) : nullptr;
    p.combined_x = static_cast<uint16_t*>(out.combined_x.data_ptr());
    p.combined_weights = out.combined_weights ? out.combined_weights->data_ptr<float>() : nullptr;
    p.num_tokens = static_cast<int>(num_tokens);
    p.hidden = static_cast<int>(hidden);
    p.num_topk = num_topk;
    p.max_tokens = static_cast<int>(args.max_tokens);
    const int my_node = rank_ / ranks_per_node_;
    for (int node = 0; node < num_nodes_; ++node) {
        if (node != my_node)
            combine_arrived_[node] += static_cast<unsigned long long>(p.tokens_to_node[node]);
        p.arrivals_total[node] = combine_arrived_[node];
    }
    p.operation = ++operation_;
    p.areas = areas;
    p.group = group();
    launch_combine(p, static_cast<int>(args.num_sms), stream);
    return out;
}

}  // namespace deepep_megatron::internode
