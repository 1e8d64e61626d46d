#include "transport/ipc_region.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstring>

#include "common/check.h"

namespace deepep_megatron {

IpcRegion::IpcRegion(int rank, int num_ranks, size_t bytes, size_t zeroed_bytes)
    : rank_(rank), num_ranks_(num_ranks) {
    require(num_ranks >= 1 && num_ranks <= MAX_RANKS_PER_NODE,
            "a CUDA IPC group takes 1 to " + std::to_string(MAX_RANKS_PER_NODE) + " ranks");
    require(rank >= 0 && rank < num_ranks, "rank out of range");
    DEEPEP_CUDA_CHECK(cudaGetDevice(&device_));
    void* region = nullptr;
    DEEPEP_CUDA_CHECK(cudaMalloc(&region, bytes));
    const int device = device_;
    owner_ = std::shared_ptr<void>(region, [device](void* pointer) {
        c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        cudaFree(pointer);
    });
    DEEPEP_CUDA_CHECK(cudaMemset(region, 0, zeroed_bytes));
    base_ = static_cast<uint8_t*>(region);
    peer_bases_.assign(num_ranks_, nullptr);
    peer_bases_[rank_] = base_;
}

IpcRegion::~IpcRegion() {
    try {
        close();
    } catch (...) {
    }
}

std::string IpcRegion::export_handle() const {
    cudaIpcMemHandle_t handle;
    DEEPEP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, base_));
    return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IpcRegion::open_peers(const std::vector<std::string>& handles) {
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

void IpcRegion::close() {
    if (!owner_) return;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer != rank_ && peer_bases_[peer] != nullptr) cudaIpcCloseMemHandle(peer_bases_[peer]);
        peer_bases_[peer] = nullptr;
    }
    peers_open_ = false;
    owner_.reset();  // the allocation lives on while arena tensors still view it
}

void IpcRegion::abandon() {
    if (!owner_) return;
    new std::shared_ptr<void>(std::move(owner_));  // deliberately leaked: the deleter never runs
    peer_bases_.assign(num_ranks_, nullptr);
    peers_open_ = false;
}

PeerRegions IpcRegion::peer_table() const {
    PeerRegions peers{};
    for (int peer = 0; peer < num_ranks_; ++peer) peers.base[peer] = peer_bases_[peer];
    return peers;
}

}  // namespace deepep_megatron
