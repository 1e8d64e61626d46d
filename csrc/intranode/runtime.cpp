#include "intranode/runtime.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/check.h"
#include "common/diagnostics.h"
#include "intranode/launch.h"

namespace deepep_megatron::intranode {

namespace {

// Bytes of the whole region: [ signal area | staging | arena ], each region-aligned.
size_t region_bytes(int64_t staging_bytes, int64_t arena_bytes) {
    require(staging_bytes > 0 && arena_bytes >= 0, "region sizes must be positive");
    return kSignalAreaBytes + align_region(static_cast<size_t>(staging_bytes)) +
           align_region(static_cast<size_t>(arena_bytes));
}

// How long the host waits for the count exchange beyond the device-side timeout: the kernel starts
// after the host begins to wait (launch latency, work queued before it on the stream), and its
// own waits time out first, with a better message.
constexpr auto kHostWaitMargin = std::chrono::seconds(5);

}  // namespace

Runtime::Runtime(int rank, int num_ranks, int64_t staging_bytes, int64_t arena_bytes, double timeout_seconds)
    : rank_(rank),
      num_ranks_(num_ranks),
      region_(rank, num_ranks, region_bytes(staging_bytes, arena_bytes), kSignalAreaBytes),
      staging_offset_(kSignalAreaBytes),
      staging_bytes_(align_region(static_cast<size_t>(staging_bytes))),
      arena_(std::make_shared<Arena>(staging_offset_ + staging_bytes_,
                                     region_bytes(staging_bytes, arena_bytes), region_.device(),
                                     region_.owner())),
      timeout_ns_(static_cast<long long>(timeout_seconds * 1e9)) {}

Runtime::~Runtime() {
    try {
        destroy();
    } catch (...) {
    }
}

void Runtime::destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    if (failed_ || mailbox_.host()->timeout.written) {
        // After a timeout, peers that gave up at another moment, and blocks of this rank or theirs
        // that were not yet resident, may still write into this region and mailbox. Freeing them
        // would fault the GPU context (under MPS: every rank sharing the GPU), so a failed buffer
        // keeps its memory until the process ends.
        mailbox_.abandon();
        region_.abandon();
        return;
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(region_.device()));
    mailbox_.reset();
    arena_.reset();  // the region is freed when the last arena tensor viewing it is gone
    region_.close();
}

// ------------------------------------------------------------------------------------- checks

void Runtime::fail(const std::string& message) {
    failed_ = true;
    throw DeviceTimeout(message);
}

void Runtime::check_health() {
    require(!destroyed_, "the runtime was destroyed");
    require(region_.peers_open(), "open_peers() was not called");
    Mailbox* mailbox = mailbox_.host();
    if (mailbox->timeout.written)
        fail(describe_timeout(mailbox->timeout, static_cast<double>(timeout_ns_) / 1e9));
    if (failed_) throw DeviceTimeout("deepep_megatron: an earlier operation of this buffer timed out");
    if (mailbox->overflow_rows > 0) {
        const int rows = mailbox->overflow_rows;
        mailbox->overflow_rows = 0;
        throw std::runtime_error("deepep_megatron: a dispatch with num_worst_tokens sent a token to row " +
                                 std::to_string(rows - 1) +
                                 ", past num_worst_tokens; those tokens were dropped");
    }
}

void Runtime::check_launch(int64_t num_sms) {
    check_health();
    require(num_sms >= 1 && num_sms <= kMaxBlocks,
            "num_sms must be in [1, " + std::to_string(kMaxBlocks) + "], got " + std::to_string(num_sms));
}

GroupParams Runtime::group_params() const {
    GroupParams group{};
    group.peers = region_.peer_table();
    group.signals = reinterpret_cast<NvlinkSignalArea*>(region_.base());
    group.mailbox = mailbox_.device();
    group.wait.local = &group.signals->wait;
    group.wait.record = &mailbox_.device()->timeout;
    group.wait.timeout_ns = timeout_ns_;
    group.wait.rank = rank_;
    return group;
}

// ------------------------------------------------------------------------------------- layout

std::tuple<at::Tensor, at::Tensor, at::Tensor> Runtime::layout(const at::Tensor& topk_idx,
                                                               int64_t num_experts) {
    check_health();
    const int64_t num_tokens = topk_idx.size(0);
    auto int_options = topk_idx.options().dtype(at::kInt);
    auto num_tokens_per_rank = at::zeros({num_ranks_}, int_options);
    auto num_tokens_per_expert = at::zeros({num_experts}, int_options);
    auto is_token_in_rank = at::empty({num_tokens, num_ranks_}, topk_idx.options().dtype(at::kBool));
    auto topk = topk_idx.contiguous();
    LayoutParams params{topk.data_ptr<int64_t>(),
                        num_tokens_per_rank.data_ptr<int>(),
                        num_tokens_per_expert.data_ptr<int>(),
                        is_token_in_rank.data_ptr<bool>(),
                        static_cast<int>(num_tokens),
                        static_cast<int>(topk.size(1)),
                        num_ranks_,
                        static_cast<int>(num_experts)};
    launch_layout(params, at::cuda::getCurrentCUDAStream().stream());
    return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

// ------------------------------------------------------------------------------------- dispatch

DispatchOutputs Runtime::dispatch_fresh(const FreshDispatchArgs& args) {
    check_launch(args.num_sms);
    require(args.x.defined() && args.is_token_in_rank.defined() && args.num_tokens_per_expert.defined(),
            "a fresh dispatch needs x, is_token_in_rank and num_tokens_per_expert");
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    DispatchInputs in{args.x.contiguous()};
    if (args.scales) in.scales = args.scales->contiguous();
    if (args.topk_idx) in.topk_idx = args.topk_idx->contiguous();
    if (args.topk_weights) in.topk_weights = args.topk_weights->contiguous();
    in.num_worst_tokens = args.num_worst_tokens;
    in.num_sms = args.num_sms;

    const int experts_per_rank = static_cast<int>(args.num_tokens_per_expert.numel() / num_ranks_);
    require(experts_per_rank <= MAX_LOCAL_EXPERTS,
            "at most " + std::to_string(MAX_LOCAL_EXPERTS) + " experts per rank");
    in.experts_per_rank = in.topk_idx ? experts_per_rank : 0;
    DispatchOutputs out;
    auto int_options = args.x.options().dtype(at::kInt);
    out.count_matrix = at::empty({num_ranks_, num_ranks_}, int_options);
    out.send_slot = at::empty({args.x.size(0), num_ranks_}, int_options);
    launch_count_exchange(args, out.send_slot, out.count_matrix, experts_per_rank, stream);

    // Rows of this rank's receive block: exact after the host sync, else the worst case.
    in.num_rows = args.num_worst_tokens;
    if (args.num_worst_tokens == 0) {
        wait_for_count_exchange();
        read_receive_counts(experts_per_rank, args.expert_alignment, out);
        in.num_rows = out.num_recv_tokens;
    }
    return run_dispatch(in, std::move(out), stream);
}

DispatchOutputs Runtime::dispatch_cached(const CachedDispatchArgs& args) {
    check_launch(args.num_sms);
    require(args.x.defined() && args.count_matrix.defined() && args.send_slot.defined(),
            "a cached dispatch needs x and the handle's count_matrix and send_slot");
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    DispatchInputs in{args.x.contiguous()};
    if (args.scales) in.scales = args.scales->contiguous();
    in.num_rows = args.num_recv_rows;  // the handle knows it: no host sync
    in.num_worst_tokens = args.num_worst_tokens;
    in.num_sms = args.num_sms;
    DispatchOutputs out;
    out.count_matrix = args.count_matrix;
    out.send_slot = args.send_slot;
    return run_dispatch(in, std::move(out), stream);
}

// notify: numbers the tokens per destination (send_slot [N, R]) and exchanges counts
// (count_matrix [R, R]); the receive counts go to the mailbox with ticket `host_ticket_`.
void Runtime::launch_count_exchange(const FreshDispatchArgs& args, const at::Tensor& send_slot,
                                    const at::Tensor& count_matrix, int experts_per_rank,
                                    cudaStream_t stream) {
    auto in_rank = args.is_token_in_rank.contiguous();
    auto per_expert = args.num_tokens_per_expert.contiguous();
    NotifyParams notify{in_rank.data_ptr<bool>(),
                        per_expert.data_ptr<int>(),
                        send_slot.data_ptr<int>(),
                        count_matrix.data_ptr<int>(),
                        static_cast<int>(args.x.size(0)),
                        num_ranks_,
                        experts_per_rank,
                        ++host_ticket_,
                        group_params()};
    launch_notify(notify, stream);
}

// The one host sync of a fresh dispatch. Bounded by the device-side timeout plus a margin (see
// device/wait.cuh for why the whole call then ends in time); a device-side record wins.
void Runtime::wait_for_count_exchange() {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::nanoseconds(timeout_ns_) + kHostWaitMargin;
    Mailbox* mailbox = mailbox_.host();
    while (mailbox->notify_ticket != host_ticket_) {
        if (mailbox->timeout.written)
            fail(describe_timeout(mailbox->timeout, static_cast<double>(timeout_ns_) / 1e9));
        if (std::chrono::steady_clock::now() > deadline) {
            fail("deepep_megatron: rank " + std::to_string(rank_) + " timed out after " +
                 seconds_text(std::chrono::duration<double>(deadline - start).count()) +
                 " on the host waiting for the count exchange of a dispatch (did its kernel start? is the "
                 "stream blocked?)");
        }
        std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_acquire);
}

void Runtime::read_receive_counts(int experts_per_rank, int64_t expert_alignment,
                                  DispatchOutputs& out) const {
    const Mailbox* mailbox = mailbox_.host();
    out.num_recv_tokens = mailbox->num_recv_tokens;
    for (int expert = 0; expert < experts_per_rank; ++expert) {
        const int64_t count = mailbox->tokens_per_local_expert[expert];
        out.num_recv_tokens_per_expert.push_back((count + expert_alignment - 1) / expert_alignment *
                                                 expert_alignment);
    }
}

DispatchOutputs Runtime::run_dispatch(const DispatchInputs& in, DispatchOutputs out, cudaStream_t stream) {
    const int num_scales = in.scales ? static_cast<int>(in.scales->size(1)) : 0;
    const int num_topk = in.topk_idx ? static_cast<int>(in.topk_idx->size(1)) : 0;
    require(num_topk <= MAX_TOPK, "top-k is at most " + std::to_string(MAX_TOPK));
    const int row_bytes = static_cast<int>(in.x.size(1) * in.x.element_size());
    const ReceiveBlock block = take_receive_block(
        recv_block_layout(static_cast<int>(in.num_rows), row_bytes, num_scales, num_topk), stream);
    out.zero_copy = block.arena_block != nullptr;
    if (in.num_worst_tokens > 0) mark_rows_unused(block, in.num_rows, num_topk, stream);
    launch_dispatch_kernel(in, out, block.offset, stream);
    hand_out_outputs(in, block, out, stream);
    return out;
}

Runtime::ReceiveBlock Runtime::take_receive_block(const RecvBlockLayout& layout, cudaStream_t stream) {
    std::optional<size_t> arena_offset = arena_->allocate(layout.total_bytes, stream);
    if (arena_offset)
        return {*arena_offset, layout,
                std::make_shared<ArenaBlock>(arena_, *arena_offset, layout.total_bytes)};
    require(layout.total_bytes <= staging_bytes_,
            "the dispatch output does not fit the buffer; size num_nvl_bytes with "
            "Config.get_nvl_buffer_size_hint");
    return {staging_offset_, layout, nullptr};
}

// Rows past those received must read as "no expert" (-1 ids, zero weights, -1 source).
void Runtime::mark_rows_unused(const ReceiveBlock& block, int64_t num_rows, int num_topk,
                               cudaStream_t stream) const {
    uint8_t* base = region_.base() + block.offset;
    if (num_topk > 0) {
        DEEPEP_CUDA_CHECK(
            cudaMemsetAsync(base + block.layout.topk_idx_offset, 0xff, num_rows * num_topk * 8, stream));
        DEEPEP_CUDA_CHECK(
            cudaMemsetAsync(base + block.layout.topk_weights_offset, 0, num_rows * num_topk * 4, stream));
    }
    DEEPEP_CUDA_CHECK(cudaMemsetAsync(base + block.layout.src_idx_offset, 0xff, num_rows * 4, stream));
}

void Runtime::launch_dispatch_kernel(const DispatchInputs& in, const DispatchOutputs& out,
                                     size_t block_offset, cudaStream_t stream) {
    DispatchParams params{};
    params.x = static_cast<const uint8_t*>(in.x.data_ptr());
    params.scales = in.scales ? static_cast<const uint8_t*>(in.scales->data_ptr()) : nullptr;
    params.topk_idx = in.topk_idx ? in.topk_idx->data_ptr<int64_t>() : nullptr;
    params.topk_weights = in.topk_weights ? in.topk_weights->data_ptr<float>() : nullptr;
    params.send_slot = out.send_slot.data_ptr<int>();
    params.count_matrix = out.count_matrix.data_ptr<int>();
    params.num_tokens = static_cast<int>(in.x.size(0));
    params.row_bytes = static_cast<int>(in.x.size(1) * in.x.element_size());
    params.num_scales = in.scales ? static_cast<int>(in.scales->size(1)) : 0;
    params.num_topk = in.topk_idx ? static_cast<int>(in.topk_idx->size(1)) : 0;
    params.num_ranks = num_ranks_;
    params.experts_per_rank = in.experts_per_rank;
    params.num_worst_tokens = static_cast<int>(in.num_worst_tokens);
    params.my_recv_offset = block_offset;
    params.group = group_params();
    launch_dispatch(params, static_cast<int>(in.num_sms), stream);
}

// Outputs: views of the arena block (zero copy), or copies out of staging.
void Runtime::hand_out_outputs(const DispatchInputs& in, const ReceiveBlock& block, DispatchOutputs& out,
                               cudaStream_t stream) const {
    const int64_t rows = in.num_rows;
    const auto options = in.x.options();
    const RecvBlockLayout& layout = block.layout;
    out.recv_x =
        take_output(block, layout.x_offset, {rows, in.x.size(1)}, in.x.scalar_type(), options, stream);
    if (in.scales)
        out.recv_scales =
            take_output(block, layout.scales_offset, {rows, in.scales->size(1)}, at::kFloat, options, stream);
    if (in.topk_idx) {
        const int64_t num_topk = in.topk_idx->size(1);
        out.recv_topk_idx =
            take_output(block, layout.topk_idx_offset, {rows, num_topk}, at::kLong, options, stream);
        if (in.topk_weights)
            out.recv_topk_weights =
                take_output(block, layout.topk_weights_offset, {rows, num_topk}, at::kFloat, options, stream);
    }
    out.recv_src_idx = take_output(block, layout.src_idx_offset, {rows}, at::kInt, options, stream);
}

// One output array of the receive block: a view that keeps the arena block alive, or a copy.
at::Tensor Runtime::take_output(const ReceiveBlock& block, size_t offset, at::IntArrayRef sizes,
                                at::ScalarType dtype, const at::TensorOptions& options,
                                cudaStream_t stream) const {
    uint8_t* data = region_.base() + block.offset + offset;
    if (block.arena_block) {
        auto owner = block.arena_block;
        return at::from_blob(data, sizes, [owner](void*) {}, options.dtype(dtype));
    }
    auto copy = at::empty(sizes, options.dtype(dtype));
    const size_t bytes = static_cast<size_t>(copy.numel()) * copy.element_size();
    if (bytes > 0)
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(copy.data_ptr(), data, bytes, cudaMemcpyDeviceToDevice, stream));
    return copy;
}

// ------------------------------------------------------------------------------------- combine

// The region offset where `tensor` can be read by peers: where it already lies (an arena output),
// or `staging_offset` after a copy there.
size_t Runtime::place_in_region(const at::Tensor& tensor, size_t staging_offset, cudaStream_t stream) {
    const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const auto base = reinterpret_cast<uintptr_t>(region_.base());
    if (tensor.is_contiguous() && address >= base) {
        const size_t offset = address - base;
        if (arena_->contains(offset) && offset % REGION_ALIGNMENT == 0) return offset;
    }
    const size_t bytes = static_cast<size_t>(tensor.numel()) * tensor.element_size();
    require(staging_offset + bytes <= staging_offset_ + staging_bytes_,
            "combine input does not fit the staging area");
    auto contiguous = tensor.contiguous();
    if (bytes > 0)
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(region_.base() + staging_offset, contiguous.data_ptr(), bytes,
                                          cudaMemcpyDeviceToDevice, stream));
    return staging_offset;
}

CombineOutputs Runtime::combine(const CombineArgs& args) {
    check_launch(args.num_sms);
    require(args.x.defined() && args.send_slot.defined() && args.count_matrix.defined(),
            "a combine needs x and the handle's send_slot and count_matrix");
    require(!args.topk_weights || args.topk_weights->size(1) <= MAX_TOPK,
            "top-k is at most " + std::to_string(MAX_TOPK));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const at::Tensor& x = args.x;
    const int64_t hidden = x.size(1);
    const size_t x_offset = place_in_region(x, staging_offset_, stream);
    size_t w_offset = 0;
    if (args.topk_weights) {
        // After x in staging when x was copied there, else at the start of staging.
        const size_t after_x =
            x_offset == staging_offset_
                ? staging_offset_ + align_region(static_cast<size_t>(x.numel()) * x.element_size())
                : staging_offset_;
        w_offset = place_in_region(*args.topk_weights, after_x, stream);
    }
    CombineOutputs out;
    out.combined_x = at::empty({args.num_tokens, hidden}, x.options());
    if (args.topk_weights)
        out.combined_weights =
            at::empty({args.num_tokens, args.topk_weights->size(1)}, args.topk_weights->options());
    std::optional<at::Tensor> bias0, bias1;
    if (args.bias0) bias0 = args.bias0->contiguous();
    if (args.bias1) bias1 = args.bias1->contiguous();

    CombineParams params{};
    params.send_slot = args.send_slot.data_ptr<int>();
    params.count_matrix = args.count_matrix.data_ptr<int>();
    params.bias0 = bias0 ? static_cast<const uint16_t*>(bias0->data_ptr()) : nullptr;
    params.bias1 = bias1 ? static_cast<const uint16_t*>(bias1->data_ptr()) : nullptr;
    params.combined_x = static_cast<uint16_t*>(out.combined_x.data_ptr());
    params.combined_weights = out.combined_weights ? out.combined_weights->data_ptr<float>() : nullptr;
    params.num_tokens = static_cast<int>(args.num_tokens);
    params.hidden = static_cast<int>(hidden);
    params.num_topk = args.topk_weights ? static_cast<int>(args.topk_weights->size(1)) : 0;
    params.num_ranks = num_ranks_;
    params.my_x_offset = x_offset;
    params.my_w_offset = w_offset;
    params.group = group_params();
    launch_combine(params, static_cast<int>(args.num_sms), stream);
    return out;
}

}  // namespace deepep_megatron::intranode
