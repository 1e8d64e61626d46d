#include "common/arena.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/limits.h"

namespace deepep_megatron {

Arena::Arena(size_t begin, size_t end, int device, std::shared_ptr<void> owner)
    : begin_(begin), end_(end), device_(device), owner_(std::move(owner)) {
    if (end_ > begin_) free_blocks_[begin_] = end_ - begin_;
}

Arena::~Arena() {
    for (cudaEvent_t event : pending_frees_) cudaEventDestroy(event);
}

void Arena::wait_for_pending_frees(cudaStream_t stream) {
    std::vector<cudaEvent_t> still_pending;
    for (cudaEvent_t event : pending_frees_) {
        if (cudaEventQuery(event) == cudaSuccess) {
            cudaEventDestroy(event);
        } else {
            cudaStreamWaitEvent(stream, event, 0);
            still_pending.push_back(event);
        }
    }
    cudaGetLastError();  // a not-ready query is not an error
    pending_frees_.swap(still_pending);
}

std::optional<size_t> Arena::allocate(size_t bytes, cudaStream_t stream) {
    bytes = align_region(bytes == 0 ? 1 : bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_blocks_.begin(); it != free_blocks_.end(); ++it) {
        if (it->second < bytes) continue;
        const size_t offset = it->first, remaining = it->second - bytes;
        free_blocks_.erase(it);
        if (remaining > 0) free_blocks_[offset + bytes] = remaining;
        wait_for_pending_frees(stream);
        return offset;
    }
    return std::nullopt;
}

void Arena::release(size_t offset, size_t bytes) {
    bytes = align_region(bytes == 0 ? 1 : bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    // Kernels queued on the current stream may still read this memory.
    cudaEvent_t event = nullptr;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) == cudaSuccess) {
        if (cudaEventRecord(event, c10::cuda::getCurrentCUDAStream(device_).stream()) == cudaSuccess)
            pending_frees_.push_back(event);
        else
            cudaEventDestroy(event);
    }
    cudaGetLastError();  // at interpreter shutdown the context may be gone; nothing to wait for then
    auto next = free_blocks_.lower_bound(offset);
    if (next != free_blocks_.end() && offset + bytes == next->first) {
        bytes += next->second;
        next = free_blocks_.erase(next);
    }
    if (next != free_blocks_.begin()) {
        auto previous = std::prev(next);
        if (previous->first + previous->second == offset) {
            previous->second += bytes;
            return;
        }
    }
    free_blocks_[offset] = bytes;
}

size_t Arena::bytes_in_use() const {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t free_bytes = 0;
    for (const auto& [offset, size] : free_blocks_) free_bytes += size;
    return (end_ - begin_) - free_bytes;
}

}  // namespace deepep_megatron
