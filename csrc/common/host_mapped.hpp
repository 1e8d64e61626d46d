// A zeroed object in page-locked host memory that kernels read and write through its device
// mapping: how kernels hand results (counts for the host sync, timeout records) to the host
// without a copy.
#pragma once

#include <cuda_runtime.h>

#include <cstring>

#include "common/check.h"

namespace deepep_megatron {

template <typename T>
class HostMapped {
  public:
    HostMapped() {
        void* host = nullptr;
        DEEPEP_CUDA_CHECK(cudaHostAlloc(&host, sizeof(T), cudaHostAllocMapped));
        std::memset(host, 0, sizeof(T));
        host_ = static_cast<T*>(host);
        void* device = nullptr;
        DEEPEP_CUDA_CHECK(cudaHostGetDevicePointer(&device, host, 0));
        device_ = static_cast<T*>(device);
    }
    ~HostMapped() { reset(); }
    HostMapped(const HostMapped&) = delete;
    HostMapped& operator=(const HostMapped&) = delete;

    // Frees the memory; kernels must no longer write it. Idempotent.
    void reset() {
        if (host_ != nullptr) cudaFreeHost(host_);
        host_ = nullptr;
        device_ = nullptr;
    }

    // Forgets the memory without freeing it: a kernel that can still run (a block of a failed
    // operation not yet resident) may write here later.
    void abandon() {
        host_ = nullptr;
        device_ = nullptr;
    }

    T* host() const { return host_; }      // for the host
    T* device() const { return device_; }  // for kernel parameters

  private:
    T* host_ = nullptr;
    T* device_ = nullptr;
};

}  // namespace deepep_megatron
