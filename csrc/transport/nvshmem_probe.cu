// A kernel that reads this module's NVSHMEM device state (see nvshmem.hpp: `probe`).
#include <nvshmem.h>

namespace deepep_megatron {
namespace nvshmem_transport {

namespace {

__global__ void probe_kernel(const void* symmetric_address, int* out) {
    out[0] = nvshmem_my_pe();
    out[1] = nvshmem_n_pes();
    out[2] = nvshmem_ptr(symmetric_address, nvshmem_my_pe()) != nullptr ? 1 : 0;
}

}  // namespace

void launch_probe(void* symmetric_address, int* out, cudaStream_t stream) {
    probe_kernel<<<1, 1, 0, stream>>>(symmetric_address, out);
}

}  // namespace nvshmem_transport
}  // namespace deepep_megatron
