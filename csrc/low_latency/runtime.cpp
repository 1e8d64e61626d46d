#include "low_latency/runtime.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

#include "low_latency/launch.h"

namespace deepep_megatron {
namespace low_latency {

namespace {

void require(bool condition, const std::string& message) {
    if (!condition) throw std::invalid_argument("deepep_megatron low-latency: " + message);
}

void cuda_check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("deepep_megatron low-latency: ") + what + ": " +
                                 cudaGetErrorString(status));
}

const char* phase_name(int phase) {
    switch (phase) {
        case kWaitDispatchRelease:
            return "low_latency_dispatch send (waiting for the receiver to release the bank)";
        case kWaitDispatchCount:
            return "low_latency_dispatch receive (token count)";
        case kWaitDispatchData:
            return "low_latency_dispatch receive (token data)";
        case kWaitCombineRelease:
            return "low_latency_combine send (waiting for the token owner to release the bank)";
        case kWaitCombineData:
            return "low_latency_combine receive (expert outputs)";
        default:
            return "an unknown phase";
    }
}

void check_cuda_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
    require(t.is_cuda(), std::string(name) + " must be a CUDA tensor");
    require(t.scalar_type() == dtype, std::string(name) + " has the wrong dtype");
    require(t.dim() == dim, std::string(name) + " has the wrong number of dimensions");
}

// Kernels read inputs with 16-byte loads: contiguous and aligned, copied if not.
at::Tensor aligned_contiguous(const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
    return c;
}

}  // namespace

LowLatencyRuntime::LowLatencyRuntime(int rank, int num_ranks, int64_t block_address, int64_t block_bytes,
                                     const std::vector<int64_t>& peer_bases, double timeout_seconds)
    : rank_(rank),
      num_ranks_(num_ranks),
      block_(reinterpret_cast<uint8_t*>(block_address)),
      block_bytes_(static_cast<size_t>(block_bytes)),
      timeout_ns_(static_cast<long long>(timeout_seconds * 1e9)) {
    require(num_ranks >= 1 && rank >= 0 && rank < num_ranks, "rank out of range");
    require(static_cast<int>(peer_bases.size()) == num_ranks, "one peer base per rank expected");
    require(block_ != nullptr && block_bytes_ >= data_start(num_ranks), "the symmetric block is too small");
    require(peer_bases[rank] == block_address, "this rank must reach its own block through its mapping");
    cuda_check(cudaGetDevice(&device_), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&max_shared_bytes_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_),
               "cudaDeviceGetAttribute");
    cuda_check(cudaMalloc(&peer_bases_device_, sizeof(uint64_t) * num_ranks), "cudaMalloc");
    std::vector<uint64_t> bases(peer_bases.begin(), peer_bases.end());
    cuda_check(
        cudaMemcpy(peer_bases_device_, bases.data(), sizeof(uint64_t) * num_ranks, cudaMemcpyHostToDevice),
        "cudaMemcpy");
    void* record = nullptr;
    cuda_check(cudaHostAlloc(&record, sizeof(TimeoutRecord), cudaHostAllocMapped), "cudaHostAlloc");
    std::memset(record, 0, sizeof(TimeoutRecord));
    record_ = static_cast<TimeoutRecord*>(record);
    void* record_device = nullptr;
    cuda_check(cudaHostGetDevicePointer(&record_device, record, 0), "cudaHostGetDevicePointer");
    record_device_ = static_cast<TimeoutRecord*>(record_device);
    // Control and signals start at zero: sequence numbers, tickets and counters all count from 0.
    cuda_check(cudaMemset(block_, 0, data_start(num_ranks)), "cudaMemset");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

LowLatencyRuntime::~LowLatencyRuntime() {
    try {
        destroy();
    } catch (...) {
    }
}

void LowLatencyRuntime::destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    if (failed_ || (record_ != nullptr && record_->flag)) {
        // A peer or a not-yet-resident block of a failed call may still write the record or
        // read the peer table: keep both until the process ends (see intranode::Runtime::destroy).
        record_ = nullptr;
        peer_bases_device_ = nullptr;
        block_ = nullptr;
        return;
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    if (peer_bases_device_ != nullptr) cudaFree(peer_bases_device_);
    if (record_ != nullptr) cudaFreeHost(record_);
    peer_bases_device_ = nullptr;
    record_ = nullptr;
    block_ = nullptr;  // the block itself belongs to the caller (NVSHMEM allocation)
}

int64_t LowLatencyRuntime::required_bytes(int64_t max_tokens, int64_t hidden, int64_t num_ranks,
                                          int64_t num_experts) {
    return static_cast<int64_t>(
        low_latency::required_bytes(static_cast<int>(max_tokens), static_cast<int>(hidden),
                                    static_cast<int>(num_ranks), static_cast<int>(num_experts)));
}

Symmetric LowLatencyRuntime::symmetric(int bank, int max_tokens, int hidden, int num_experts) const {
    Symmetric sym{};
    sym.base = block_;
    sym.peer_base = peer_bases_device_;
    sym.signals = signal_layout(num_ranks_);
    sym.data = data_layout(max_tokens, hidden, num_experts);
    sym.signal_offset = signal_bank_offset(num_ranks_, bank);
    sym.data_offset = data_bank_offset(num_ranks_, max_tokens, hidden, num_experts, bank);
    return sym;
}

WaitContext LowLatencyRuntime::wait_context() const {
    return WaitContext{reinterpret_cast<int*>(block_), record_device_, timeout_ns_, rank_};
}

void LowLatencyRuntime::check_sizes(int64_t max_tokens, int64_t hidden, int64_t num_experts,
                                    int64_t num_sms) const {
    require(!destroyed_, "the runtime was destroyed");
    require(max_tokens >= 1 && hidden >= 2 && hidden % 2 == 0, "bad token count or hidden size");
    require(num_experts >= num_ranks_ && num_experts % num_ranks_ == 0,
            "num_experts must be a multiple of the ranks");
    require(num_experts / num_ranks_ <= kMaxLocalExperts, "too many experts per rank");
    require(num_sms >= 1, "num_sms must be positive");
    const size_t needed = low_latency::required_bytes(static_cast<int>(max_tokens), static_cast<int>(hidden),
                                                      num_ranks_, static_cast<int>(num_experts));
    require(needed <= block_bytes_, "the buffer holds " + std::to_string(block_bytes_) +
                                        " bytes, these sizes need " + std::to_string(needed) +
                                        " (Buffer.get_low_latency_rdma_size_hint)");
}

std::string LowLatencyRuntime::describe_timeout() const {
    // One reading of the host-mapped record.
    const int rank = record_->rank, peer = record_->peer, phase = record_->phase;
    const long long expected = record_->expected, seen = record_->seen;
    return "deepep_megatron: rank " + std::to_string(rank) + " timed out after " +
           seconds_text(static_cast<double>(timeout_ns_) / 1e9) + " in " + phase_name(phase) +
           " waiting for rank " + std::to_string(peer) + " (expected " + std::to_string(expected) + ", saw " +
           std::to_string(seen) + "). Did every rank of the group make the same low-latency calls?";
}

void LowLatencyRuntime::check_health() {
    require(!destroyed_, "the runtime was destroyed");
    if (record_->flag) {
        failed_ = true;
        throw DeviceTimeout(describe_timeout());
    }
    if (failed_) throw DeviceTimeout("deepep_megatron: an earlier low-latency call of this buffer timed out");
}

std::shared_ptr<DispatchCall> LowLatencyRuntime::dispatch(
    const at::Tensor& x, const at::Tensor& topk_idx, int64_t max_tokens, int64_t num_experts, bool use_fp8,
    bool round_scale, bool use_ue8m0, int64_t bank, int64_t num_sms, bool receive,
    const std::optional<at::Tensor>& cumulative_recv_stats,
    const std::optional<at::Tensor>& wait_recv_stats) {
    check_health();
    check_cuda_tensor(x, "x", at::kBFloat16, 2);
    check_cuda_tensor(topk_idx, "topk_idx", at::kLong, 2);
    const int64_t num_tokens = x.size(0), hidden = x.size(1), num_topk = topk_idx.size(1);
    check_sizes(max_tokens, hidden, num_experts, num_sms);
    require(topk_idx.size(0) == num_tokens && num_tokens <= max_tokens, "token count mismatch");
    require(num_topk >= 1 && num_topk <= kMaxTopk, "top-k out of range");
    require(!use_fp8 || hidden % kScaleBlock == 0, "FP8 needs hidden % 128 == 0");
    require(bank == 0 || bank == 1, "bank must be 0 or 1");
    const size_t shared =
        dispatch_shared_bytes(static_cast<int>(num_experts), static_cast<int>(num_experts / num_ranks_),
                              num_ranks_, static_cast<int>(num_tokens * num_topk));
    require(shared <= static_cast<size_t>(max_shared_bytes_),
            "too many experts for the kernels' shared memory");
    c10::cuda::CUDAGuard guard(x.device());

    auto call = std::make_shared<DispatchCall>();
    const int64_t experts = num_experts / num_ranks_, capacity = num_ranks_ * max_tokens;
    const auto on_device = x.options();
    call->x = aligned_contiguous(x);
    call->topk_idx = topk_idx.contiguous();
    call->recv_x =
        at::empty({experts, capacity, hidden}, on_device.dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
    if (use_fp8) {
        const int64_t num_scales = hidden / kScaleBlock;
        const int64_t columns = use_ue8m0 ? (num_scales + 3) / 4 : num_scales;
        call->recv_scales =
            at::empty({experts, columns, capacity}, on_device.dtype(use_ue8m0 ? at::kInt : at::kFloat))
                .transpose(1, 2);
    }
    call->recv_count = at::empty({experts}, on_device.dtype(at::kInt));
    call->recv_src_info = at::empty({experts, capacity}, on_device.dtype(at::kInt));
    call->recv_route = at::empty({experts, capacity}, on_device.dtype(at::kInt));
    call->recv_layout_range = at::empty({experts, num_ranks_}, on_device.dtype(at::kLong));
    call->cumulative_recv_stats = cumulative_recv_stats;
    call->wait_recv_stats = wait_recv_stats;

    DispatchParams& p = call->params;
    p.x = reinterpret_cast<const uint16_t*>(call->x.data_ptr());
    p.topk_idx = call->topk_idx.data_ptr<int64_t>();
    p.num_tokens = static_cast<int>(num_tokens);
    p.hidden = static_cast<int>(hidden);
    p.num_topk = static_cast<int>(num_topk);
    p.num_experts = static_cast<int>(num_experts);
    p.experts_per_rank = static_cast<int>(experts);
    p.max_tokens = static_cast<int>(max_tokens);
    p.num_ranks = num_ranks_;
    p.rank = rank_;
    p.fp8 = use_fp8;
    p.round_scale = round_scale || use_ue8m0;
    p.ue8m0 = use_ue8m0;
    p.sym = symmetric(static_cast<int>(bank), p.max_tokens, p.hidden, p.num_experts);
    p.recv_x = static_cast<uint8_t*>(call->recv_x.data_ptr());
    p.recv_scales = call->recv_scales ? call->recv_scales->data_ptr() : nullptr;
    p.recv_count = call->recv_count.data_ptr<int>();
    p.recv_src_info = call->recv_src_info.data_ptr<int>();
    p.recv_route = call->recv_route.data_ptr<int>();
    p.recv_layout_range = call->recv_layout_range.data_ptr<int64_t>();
    p.cumulative_recv_stats = cumulative_recv_stats ? cumulative_recv_stats->data_ptr<int>() : nullptr;
    p.wait_recv_stats = wait_recv_stats ? wait_recv_stats->data_ptr<int64_t>() : nullptr;
    p.wait = wait_context();
    p.phases = kPhaseSend | (receive ? kPhaseReceive : 0);
    call->num_blocks = static_cast<int>(num_sms);
    launch_dispatch(p, call->num_blocks, at::cuda::getCurrentCUDAStream());
    call->received = receive;
    return call;
}

void LowLatencyRuntime::dispatch_receive(DispatchCall& call) {
    check_health();
    require(!call.received, "this dispatch has already been received (a hook runs once)");
    c10::cuda::CUDAGuard guard(call.recv_x.device());
    DispatchParams p = call.params;
    p.phases = kPhaseReceive;
    launch_dispatch(p, call.num_blocks, at::cuda::getCurrentCUDAStream());
    call.received = true;
}

std::shared_ptr<CombineCall> LowLatencyRuntime::combine(
    const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
    const at::Tensor& recv_count, const at::Tensor& recv_src_info, const at::Tensor& recv_route,
    int64_t max_tokens, int64_t num_experts, int64_t bank, bool zero_copy,
    const std::optional<at::Tensor>& out, int64_t num_sms, bool receive,
    const std::optional<at::Tensor>& wait_recv_stats) {
    check_health();
    check_cuda_tensor(x, "x", at::kBFloat16, 3);
    check_cuda_tensor(topk_idx, "topk_idx", at::kLong, 2);
    check_cuda_tensor(topk_weights, "topk_weights", at::kFloat, 2);
    const int64_t hidden = x.size(2), num_tokens = topk_idx.size(0), num_topk = topk_idx.size(1);
    check_sizes(max_tokens, hidden, num_experts, num_sms);
    const int64_t experts = num_experts / num_ranks_, capacity = num_ranks_ * max_tokens;
    require(x.size(0) == experts && x.size(1) == capacity, "x must be [E_local, R * T, H]");
    require(num_tokens <= max_tokens && num_topk >= 1 && num_topk <= kMaxTopk, "top-k shape out of range");
    require(topk_weights.sizes() == topk_idx.sizes(), "topk_weights and topk_idx differ in shape");
    require(bank == 0 || bank == 1, "bank must be 0 or 1");
    require(
        combine_shared_bytes(static_cast<int>(experts), num_ranks_) <= static_cast<size_t>(max_shared_bytes_),
        "too many experts for the kernels' shared memory");
    c10::cuda::CUDAGuard guard(x.device());

    auto call = std::make_shared<CombineCall>();
    const Symmetric sym = symmetric(static_cast<int>(bank), static_cast<int>(max_tokens),
                                    static_cast<int>(hidden), static_cast<int>(num_experts));
    if (zero_copy) {
        const uint8_t* staging = sym.base + sym.data_offset + sym.data.combine_staging;
        require(x.is_contiguous() && static_cast<const void*>(x.data_ptr()) == staging,
                "zero_copy: x must be this bank's combine buffer (get_next_low_latency_combine_buffer)");
        call->x = x;
    } else {
        call->x = aligned_contiguous(x);
    }
    call->topk_idx = topk_idx.contiguous();
    call->topk_weights = topk_weights.contiguous();
    call->recv_count = recv_count.contiguous();
    call->recv_src_info = recv_src_info.contiguous();
    call->recv_route = recv_route.contiguous();
    if (out) {
        check_cuda_tensor(*out, "out", at::kBFloat16, 2);
        require(out->size(0) == num_tokens && out->size(1) == hidden && out->is_contiguous() &&
                    reinterpret_cast<uintptr_t>(out->data_ptr()) % 16 == 0,
                "out must be a contiguous, 16-byte aligned [N, H] bf16 tensor");
        call->combined_x = *out;
    } else {
        call->combined_x = at::empty({num_tokens, hidden}, x.options());
    }
    call->wait_recv_stats = wait_recv_stats;

    CombineParams& p = call->params;
    p.x = reinterpret_cast<const uint16_t*>(call->x.data_ptr());
    p.topk_idx = call->topk_idx.data_ptr<int64_t>();
    p.topk_weights = call->topk_weights.data_ptr<float>();
    p.recv_count = call->recv_count.data_ptr<int>();
    p.recv_src_info = call->recv_src_info.data_ptr<int>();
    p.recv_route = call->recv_route.data_ptr<int>();
    p.combined_x = reinterpret_cast<uint16_t*>(call->combined_x.data_ptr());
    p.wait_recv_stats = wait_recv_stats ? wait_recv_stats->data_ptr<int64_t>() : nullptr;
    p.num_tokens = static_cast<int>(num_tokens);
    p.hidden = static_cast<int>(hidden);
    p.num_topk = static_cast<int>(num_topk);
    p.num_experts = static_cast<int>(num_experts);
    p.experts_per_rank = static_cast<int>(experts);
    p.max_tokens = static_cast<int>(max_tokens);
    p.num_ranks = num_ranks_;
    p.rank = rank_;
    p.zero_copy = zero_copy;
    p.sym = sym;
    p.wait = wait_context();
    p.phases = kPhaseSend | (receive ? kPhaseReceive : 0);
    call->num_blocks = static_cast<int>(num_sms);
    launch_combine(p, call->num_blocks, at::cuda::getCurrentCUDAStream());
    call->received = receive;
    return call;
}

void LowLatencyRuntime::combine_receive(CombineCall& call) {
    check_health();
    require(!call.received, "this combine has already been received (a hook runs once)");
    c10::cuda::CUDAGuard guard(call.combined_x.device());
    CombineParams p = call.params;
    p.phases = kPhaseReceive;
    launch_combine(p, call.num_blocks, at::cuda::getCurrentCUDAStream());
    call.received = true;
}

at::Tensor LowLatencyRuntime::combine_buffer(int64_t bank, int64_t max_tokens, int64_t hidden,
                                             int64_t num_experts) {
    check_sizes(max_tokens, hidden, num_experts, 1);
    require(bank == 0 || bank == 1, "bank must be 0 or 1");
    const Symmetric sym = symmetric(static_cast<int>(bank), static_cast<int>(max_tokens),
                                    static_cast<int>(hidden), static_cast<int>(num_experts));
    const int64_t experts = num_experts / num_ranks_;
    auto options = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA, device_);
    // A view of the symmetric block: valid while the Buffer lives (the block outlives no Buffer).
    return at::from_blob(sym.base + sym.data_offset + sym.data.combine_staging,
                         {experts, num_ranks_ * max_tokens, hidden}, options);
}

void LowLatencyRuntime::clean(int64_t max_tokens, int64_t hidden, int64_t num_experts) {
    check_sizes(max_tokens, hidden, num_experts, 1);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    auto stream = at::cuda::getCurrentCUDAStream();
    // Keep the abort flag: a failed buffer stays failed.
    cuda_check(cudaMemsetAsync(block_ + kControlBytes, 0, data_start(num_ranks_) - kControlBytes, stream),
               "cudaMemsetAsync");
    const DataLayout data =
        data_layout(static_cast<int>(max_tokens), static_cast<int>(hidden), static_cast<int>(num_experts));
    for (int bank = 0; bank < 2; ++bank) {
        const size_t offset =
            data_bank_offset(num_ranks_, static_cast<int>(max_tokens), static_cast<int>(hidden),
                             static_cast<int>(num_experts), bank) +
            data.combine_staging;
        cuda_check(cudaMemsetAsync(block_ + offset, 0,
                                   static_cast<size_t>(num_experts) * max_tokens * hidden * 2, stream),
                   "cudaMemsetAsync");
    }
}

}  // namespace low_latency
}  // namespace deepep_megatron
