#include "runtime.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <sstream>
#include <thread>

#include "kernels/check.h"
#include "kernels/launch.h"

namespace deepep_megatron {

namespace {

void require(bool condition, const std::string& message) {
    if (!condition) throw std::invalid_argument("deepep_megatron: " + message);
}

const char* phase_name(int phase) {
    switch (phase) {
        case kPhaseNotifyCounts: return "dispatch (count exchange)";
        case kPhaseDispatchOffsets: return "dispatch (receive-block address)";
        case kPhaseDispatchData: return "dispatch (data completion)";
        case kPhaseCombineOffsets: return "combine (input address)";
        case kPhaseCombineDone: return "combine (read completion)";
        default: return "unknown phase";
    }
}

void check_grid(int64_t num_sms) {
    require(num_sms >= 1 && num_sms <= kMaxBlocks,
            "num_sms must be in [1, " + std::to_string(kMaxBlocks) + "], got " + std::to_string(num_sms));
}

}  // namespace

IntranodeRuntime::IntranodeRuntime(int rank, int num_ranks, int64_t staging_bytes, int64_t arena_bytes,
                                   double timeout_seconds)
    : rank_(rank), num_ranks_(num_ranks), timeout_ns_(static_cast<long long>(timeout_seconds * 1e9)) {
    require(num_ranks >= 1 && num_ranks <= kMaxRanks, "intranode kernels take 1 to 8 ranks");
    require(rank >= 0 && rank < num_ranks, "rank out of range");
    require(staging_bytes > 0 && arena_bytes >= 0, "region sizes must be positive");
    DEEPEP_CUDA_CHECK(cudaGetDevice(&device_));
    staging_offset_ = kSignalAreaBytes;
    staging_bytes_ = align_region(static_cast<size_t>(staging_bytes));
    arena_offset_ = staging_offset_ + staging_bytes_;
    const size_t total = arena_offset_ + align_region(static_cast<size_t>(arena_bytes));

    // Plain cudaMalloc (not the caching allocator): IPC handles need a whole allocation.
    void* region = nullptr;
    DEEPEP_CUDA_CHECK(cudaMalloc(&region, total));
    DEEPEP_CUDA_CHECK(cudaMemset(region, 0, kSignalAreaBytes));
    region_ = static_cast<uint8_t*>(region);
    const int device = device_;
    region_owner_ = std::shared_ptr<void>(region, [device](void* pointer) {
        c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        cudaFree(pointer);
    });
    arena_ = std::make_shared<Arena>(arena_offset_, total, device_, region_owner_);

    void* mailbox = nullptr;
    DEEPEP_CUDA_CHECK(cudaHostAlloc(&mailbox, sizeof(HostMailbox), cudaHostAllocMapped));
    std::memset(mailbox, 0, sizeof(HostMailbox));
    mailbox_ = static_cast<HostMailbox*>(mailbox);
    void* mailbox_device = nullptr;
    DEEPEP_CUDA_CHECK(cudaHostGetDevicePointer(&mailbox_device, mailbox, 0));
    mailbox_device_ = static_cast<HostMailbox*>(mailbox_device);
    peer_bases_.assign(num_ranks_, nullptr);
    peer_bases_[rank_] = region_;
}

IntranodeRuntime::~IntranodeRuntime() {
    try {
        destroy();
    } catch (...) {
    }
}

void IntranodeRuntime::destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer != rank_ && peer_bases_[peer] != nullptr) cudaIpcCloseMemHandle(peer_bases_[peer]);
    }
    if (mailbox_ != nullptr) cudaFreeHost(mailbox_);
    mailbox_ = nullptr;
    // The region itself is freed when the last arena tensor viewing it is gone.
    arena_.reset();
    region_owner_.reset();
}

std::string IntranodeRuntime::ipc_handle() const {
    cudaIpcMemHandle_t handle;
    DEEPEP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, region_));
    return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IntranodeRuntime::open_peers(const std::vector<std::string>& handles) {
    require(static_cast<int>(handles.size()) == num_ranks_, "one IPC handle per rank expected");
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer == rank_) continue;
        require(handles[peer].size() == sizeof(cudaIpcMemHandle_t), "malformed IPC handle");
        cudaIpcMemHandle_t handle;
        std::memcpy(&handle, handles[peer].data(), sizeof(handle));
        void* base = nullptr;
        DEEPEP_CUDA_CHECK(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess));
        peer_bases_[peer] = static_cast<uint8_t*>(base);
    }
    peers_open_ = true;
}

WaitContext IntranodeRuntime::wait_context() const {
    return WaitContext{reinterpret_cast<SignalArea*>(region_), mailbox_device_, timeout_ns_, rank_};
}

PeerRegions IntranodeRuntime::peer_regions() const {
    PeerRegions peers{};
    for (int peer = 0; peer < num_ranks_; ++peer) peers.base[peer] = peer_bases_[peer];
    return peers;
}

std::string IntranodeRuntime::describe_timeout() const {
    std::ostringstream message;
    message << "deepep_megatron: rank " << mailbox_->timeout_rank << " timed out after "
            << static_cast<double>(timeout_ns_) / 1e9 << " s in " << phase_name(mailbox_->timeout_phase)
            << " waiting for rank " << mailbox_->timeout_peer << " (expected epoch " << mailbox_->timeout_expected
            << ", saw " << mailbox_->timeout_seen << "). Did every rank of the group make the same call?";
    return message.str();
}

void IntranodeRuntime::check_health() {
    require(!destroyed_, "the runtime was destroyed");
    require(peers_open_, "open_peers() was not called");
    if (mailbox_->timeout_flag) {
        failed_ = true;
        throw DeviceTimeout(describe_timeout());
    }
    if (failed_) throw DeviceTimeout("deepep_megatron: an earlier operation of this buffer timed out");
    if (mailbox_->overflow_rows > 0) {
        const int rows = mailbox_->overflow_rows;
        mailbox_->overflow_rows = 0;
        throw std::runtime_error("deepep_megatron: a dispatch with num_worst_tokens sent a token to row " +
                                 std::to_string(rows - 1) + ", past num_worst_tokens; those tokens were dropped");
    }
}

void IntranodeRuntime::wait_for_notify(int ticket) {
    // The device-side waits time out first; the host allows a margin for queued work.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(timeout_ns_) + std::chrono::seconds(5);
    while (mailbox_->notify_ticket != ticket) {
        if (mailbox_->timeout_flag) {
            failed_ = true;
            throw DeviceTimeout(describe_timeout());
        }
        if (std::chrono::steady_clock::now() > deadline) {
            failed_ = true;
            throw DeviceTimeout("deepep_megatron: rank " + std::to_string(rank_) +
                                ": the count exchange did not finish in time (is the stream blocked?)");
        }
        std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_acquire);
}

at::Tensor IntranodeRuntime::view_in_region(std::shared_ptr<ArenaBlock> block, size_t offset, at::IntArrayRef sizes,
                                            at::ScalarType dtype) const {
    auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA, device_);
    return at::from_blob(region_ + offset, sizes, [block](void*) {}, options);
}

size_t IntranodeRuntime::place_in_region(const at::Tensor& tensor, size_t staging_offset, cudaStream_t stream) {
    const auto address = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const auto base = reinterpret_cast<uintptr_t>(region_);
    if (tensor.is_contiguous() && address >= base) {
        const size_t offset = address - base;
        if (arena_->contains(offset) && offset % kRegionAlignment == 0) return offset;
    }
    const size_t bytes = static_cast<size_t>(tensor.numel()) * tensor.element_size();
    require(staging_offset + bytes <= staging_offset_ + staging_bytes_, "combine input does not fit the staging area");
    auto contiguous = tensor.contiguous();
    if (bytes > 0)
        DEEPEP_CUDA_CHECK(cudaMemcpyAsync(region_ + staging_offset, contiguous.data_ptr(), bytes,
                                          cudaMemcpyDeviceToDevice, stream));
    return staging_offset;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> IntranodeRuntime::layout(const at::Tensor& topk_idx,
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

DispatchOutputs IntranodeRuntime::dispatch(const at::Tensor& x, const std::optional<at::Tensor>& scales,
                                           const std::optional<at::Tensor>& topk_idx,
                                           const std::optional<at::Tensor>& topk_weights,
                                           const std::optional<at::Tensor>& is_token_in_rank,
                                           const std::optional<at::Tensor>& num_tokens_per_expert,
                                           const std::optional<at::Tensor>& cached_count_matrix,
                                           const std::optional<at::Tensor>& cached_send_slot,
                                           int64_t cached_num_rows, int64_t num_worst_tokens,
                                           int64_t expert_alignment, int64_t num_sms) {
    check_health();
    check_grid(num_sms);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const bool cached = cached_count_matrix.has_value();
    const int num_tokens = static_cast<int>(x.size(0));
    const int row_bytes = static_cast<int>(x.size(1) * x.element_size());
    const int num_scales = scales ? static_cast<int>(scales->size(1)) : 0;
    const int num_topk = topk_idx ? static_cast<int>(topk_idx->size(1)) : 0;
    auto int_options = x.options().dtype(at::kInt);
    auto x_contiguous = x.contiguous();
    std::optional<at::Tensor> scales_contiguous, topk_contiguous, weights_contiguous;
    if (scales) scales_contiguous = scales->contiguous();
    if (topk_idx) topk_contiguous = topk_idx->contiguous();
    if (topk_weights) weights_contiguous = topk_weights->contiguous();

    DispatchOutputs out;
    int experts_per_rank = 0;
    if (cached) {
        out.count_matrix = *cached_count_matrix;
        out.send_slot = *cached_send_slot;
    } else {
        experts_per_rank = static_cast<int>(num_tokens_per_expert->numel() / num_ranks_);
        require(experts_per_rank <= kMaxLocalExperts, "at most " + std::to_string(kMaxLocalExperts) + " experts per rank");
        out.count_matrix = at::empty({num_ranks_, num_ranks_}, int_options);
        out.send_slot = at::empty({num_tokens, num_ranks_}, int_options);
        auto in_rank = is_token_in_rank->contiguous();
        auto per_expert = num_tokens_per_expert->contiguous();
        NotifyParams notify{in_rank.data_ptr<bool>(), per_expert.data_ptr<int>(), out.send_slot.data_ptr<int>(),
                            out.count_matrix.data_ptr<int>(), num_tokens, num_ranks_, experts_per_rank,
                            ++host_ticket_, peer_regions(), wait_context()};
        launch_notify(notify, stream);
    }

    // Rows of this rank's receive block: exact after the host sync, else the worst case.
    int64_t num_rows = num_worst_tokens;
    out.num_recv_tokens = -1;
    if (!cached && num_worst_tokens == 0) {
        wait_for_notify(host_ticket_);
        out.num_recv_tokens = mailbox_->num_recv_tokens;
        num_rows = out.num_recv_tokens;
        for (int expert = 0; expert < experts_per_rank; ++expert) {
            const int64_t count = mailbox_->tokens_per_local_expert[expert];
            out.num_recv_tokens_per_expert.push_back((count + expert_alignment - 1) / expert_alignment * expert_alignment);
        }
    }
    if (cached) num_rows = cached_num_rows;  // the handle knows it: no host sync

    const RecvBlockLayout block_layout = recv_block_layout(static_cast<int>(num_rows), row_bytes, num_scales, num_topk);
    std::optional<size_t> arena_offset = arena_->allocate(block_layout.total_bytes, stream);
    out.zero_copy = arena_offset.has_value();
    const size_t block_offset = out.zero_copy ? *arena_offset : staging_offset_;
    require(out.zero_copy || block_layout.total_bytes <= staging_bytes_,
            "the dispatch output does not fit the buffer; size num_nvl_bytes with Config.get_nvl_buffer_size_hint");
    uint8_t* block = region_ + block_offset;
    if (num_worst_tokens > 0) {
        // Rows past those received must read as "no expert" (-1 ids, zero weights, -1 source).
        if (num_topk > 0) {
            DEEPEP_CUDA_CHECK(cudaMemsetAsync(block + block_layout.topk_idx_offset, 0xff, num_rows * num_topk * 8, stream));
            DEEPEP_CUDA_CHECK(cudaMemsetAsync(block + block_layout.topk_weights_offset, 0, num_rows * num_topk * 4, stream));
        }
        DEEPEP_CUDA_CHECK(cudaMemsetAsync(block + block_layout.src_idx_offset, 0xff, num_rows * 4, stream));
    }

    DispatchParams params{};
    params.x = static_cast<const uint8_t*>(x_contiguous.data_ptr());
    params.scales = scales_contiguous ? static_cast<const uint8_t*>(scales_contiguous->data_ptr()) : nullptr;
    params.topk_idx = topk_contiguous ? topk_contiguous->data_ptr<int64_t>() : nullptr;
    params.topk_weights = weights_contiguous ? weights_contiguous->data_ptr<float>() : nullptr;
    params.send_slot = out.send_slot.data_ptr<int>();
    params.count_matrix = out.count_matrix.data_ptr<int>();
    params.num_tokens = num_tokens;
    params.row_bytes = row_bytes;
    params.num_scales = num_scales;
    params.num_topk = num_topk;
    params.num_ranks = num_ranks_;
    params.experts_per_rank = topk_idx ? experts_per_rank : 0;
    params.num_worst_tokens = static_cast<int>(num_worst_tokens);
    params.my_recv_offset = block_offset;
    params.peers = peer_regions();
    params.wait = wait_context();
    launch_dispatch(params, static_cast<int>(num_sms), stream);

    // Outputs: views of the arena block (zero copy), or copies out of staging.
    const int64_t rows = num_rows;
    std::shared_ptr<ArenaBlock> owner;
    if (out.zero_copy) owner = std::make_shared<ArenaBlock>(arena_, block_offset, block_layout.total_bytes);
    auto take = [&](size_t offset, at::IntArrayRef sizes, at::ScalarType dtype) {
        if (out.zero_copy) return view_in_region(owner, block_offset + offset, sizes, dtype);
        auto copy = at::empty(sizes, x.options().dtype(dtype));
        const size_t bytes = static_cast<size_t>(copy.numel()) * copy.element_size();
        if (bytes > 0)
            DEEPEP_CUDA_CHECK(cudaMemcpyAsync(copy.data_ptr(), block + offset, bytes, cudaMemcpyDeviceToDevice, stream));
        return copy;
    };
    out.recv_x = take(block_layout.x_offset, {rows, x.size(1)}, x.scalar_type());
    if (scales) out.recv_scales = take(block_layout.scales_offset, {rows, num_scales}, at::kFloat);
    if (topk_idx) out.recv_topk_idx = take(block_layout.topk_idx_offset, {rows, num_topk}, at::kLong);
    if (topk_idx && topk_weights) out.recv_topk_weights = take(block_layout.topk_weights_offset, {rows, num_topk}, at::kFloat);
    out.recv_src_idx = take(block_layout.src_idx_offset, {rows}, at::kInt);
    return out;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> IntranodeRuntime::combine(
    const at::Tensor& x, const std::optional<at::Tensor>& topk_weights, const std::optional<at::Tensor>& bias0,
    const std::optional<at::Tensor>& bias1, const at::Tensor& send_slot, const at::Tensor& count_matrix,
    int64_t num_tokens, int64_t num_sms) {
    check_health();
    check_grid(num_sms);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const int64_t hidden = x.size(1);
    const size_t x_offset = place_in_region(x, staging_offset_, stream);
    size_t w_offset = 0;
    if (topk_weights) {
        const size_t after_x = x_offset == staging_offset_
                                   ? staging_offset_ + align_region(static_cast<size_t>(x.numel()) * x.element_size())
                                   : staging_offset_;
        w_offset = place_in_region(*topk_weights, after_x, stream);
    }
    auto combined_x = at::empty({num_tokens, hidden}, x.options());
    std::optional<at::Tensor> combined_weights;
    if (topk_weights) combined_weights = at::empty({num_tokens, topk_weights->size(1)}, topk_weights->options());
    std::optional<at::Tensor> b0, b1;
    if (bias0) b0 = bias0->contiguous();
    if (bias1) b1 = bias1->contiguous();

    CombineParams params{};
    params.send_slot = send_slot.data_ptr<int>();
    params.count_matrix = count_matrix.data_ptr<int>();
    params.bias0 = b0 ? static_cast<const uint16_t*>(b0->data_ptr()) : nullptr;
    params.bias1 = b1 ? static_cast<const uint16_t*>(b1->data_ptr()) : nullptr;
    params.combined_x = static_cast<uint16_t*>(combined_x.data_ptr());
    params.combined_weights = combined_weights ? combined_weights->data_ptr<float>() : nullptr;
    params.num_tokens = static_cast<int>(num_tokens);
    params.hidden = static_cast<int>(hidden);
    params.num_topk = topk_weights ? static_cast<int>(topk_weights->size(1)) : 0;
    params.num_ranks = num_ranks_;
    params.my_x_offset = x_offset;
    params.my_w_offset = w_offset;
    params.peers = peer_regions();
    params.wait = wait_context();
    launch_combine(params, static_cast<int>(num_sms), stream);
    return {combined_x, combined_weights};
}

}  // namespace deepep_megatron
