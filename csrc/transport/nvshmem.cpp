#include "transport/nvshmem.hpp"

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>

namespace deepep_megatron {
namespace nvshmem_transport {

namespace {

bool g_initialized = false;

void require(bool condition, const std::string& message) {
    if (!condition) throw std::runtime_error("deepep_megatron NVSHMEM: " + message);
}

}  // namespace

// Defined in nvshmem_probe.cu (device code).
void launch_probe(void* symmetric_address, int* out, cudaStream_t stream);

std::string create_unique_id() {
    nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
    require(nvshmemx_get_uniqueid(&id) == 0, "nvshmemx_get_uniqueid failed");
    return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void init(const std::string& unique_id, int rank, int num_ranks) {
    require(!g_initialized, "already initialised in this process");
    require(unique_id.size() == sizeof(nvshmemx_uniqueid_t), "malformed unique id");
    require(rank >= 0 && rank < num_ranks, "rank out of range");
    nvshmemx_uniqueid_t id;
    std::memcpy(&id, unique_id.data(), sizeof(id));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    require(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) == 0,
            "nvshmemx_set_attr_uniqueid_args failed");
    require(nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) == 0, "nvshmemx_init_attr failed");
    g_initialized = true;
    require(nvshmem_my_pe() == rank && nvshmem_n_pes() == num_ranks,
            "NVSHMEM reports PE " + std::to_string(nvshmem_my_pe()) + " of " +
                std::to_string(nvshmem_n_pes()) + ", expected " + std::to_string(rank) + " of " +
                std::to_string(num_ranks));
}

bool initialized() {
    return g_initialized;
}

int my_pe() {
    require(g_initialized, "not initialised");
    return nvshmem_my_pe();
}

int num_pes() {
    require(g_initialized, "not initialised");
    return nvshmem_n_pes();
}

int64_t allocate(int64_t bytes) {
    require(g_initialized, "not initialised");
    require(bytes > 0, "allocation size must be positive");
    void* address = nvshmem_malloc(static_cast<size_t>(bytes));
    require(address != nullptr,
            "nvshmem_malloc(" + std::to_string(bytes) +
                ") failed: the symmetric heap is too small (NVSHMEM_SYMMETRIC_SIZE) or the "
                "GPU is out of memory");
    return reinterpret_cast<int64_t>(address);
}

void release(int64_t address) {
    require(g_initialized, "not initialised");
    nvshmem_free(reinterpret_cast<void*>(address));
}

int64_t peer_address(int64_t address, int pe) {
    require(g_initialized, "not initialised");
    return reinterpret_cast<int64_t>(nvshmem_ptr(reinterpret_cast<void*>(address), pe));
}

void finalize() {
    if (!g_initialized) return;
    nvshmem_finalize();
    g_initialized = false;
}

std::string probe(int64_t symmetric_address) {
    require(g_initialized, "not initialised");
    int* device_out = nullptr;
    require(cudaMalloc(&device_out, 3 * sizeof(int)) == cudaSuccess, "cudaMalloc failed");
    int host_out[3] = {-1, -1, -1};
    launch_probe(reinterpret_cast<void*>(symmetric_address), device_out, nullptr);
    cudaError_t status = cudaDeviceSynchronize();
    if (status == cudaSuccess)
        status = cudaMemcpy(host_out, device_out, sizeof(host_out), cudaMemcpyDeviceToHost);
    cudaFree(device_out);
    require(status == cudaSuccess, std::string("probe kernel failed: ") + cudaGetErrorString(status));
    const int pe = nvshmem_my_pe(), pes = nvshmem_n_pes();
    if (host_out[0] == pe && host_out[1] == pes && host_out[2] == 1) return "";
    return "the kernels see PE " + std::to_string(host_out[0]) + " of " + std::to_string(host_out[1]) +
           (host_out[2] == 1 ? "" : " and no mapping of the symmetric heap") + " (the host sees PE " +
           std::to_string(pe) + " of " + std::to_string(pes) +
           "): the device state is not this module's (another NVSHMEM copy, e.g. torch's, took its place)";
}

}  // namespace nvshmem_transport
}  // namespace deepep_megatron
