// The NVSHMEM runtime of this process, shared by the NVSHMEM families (low-latency now,
// internode next): bootstrap from a unique id that the caller exchanges (Python sends it over the
// Buffer's torch.distributed group, so torchrun, SLURM and several PEs per GPU under MPS all work
// alike), symmetric allocations, peer mappings and teardown.
//
// Only NVSHMEM's public API is used. The device state that kernels read is the one of *this*
// module (libnvshmem_device.a is linked in with its symbols hidden, so torch's own
// libtorch_nvshmem.so cannot take its place); `probe` checks it from a kernel after init.
#pragma once

#include <cstdint>
#include <string>

namespace deepep_megatron {
namespace nvshmem_transport {

// 128 opaque bytes that every rank must pass to `init`; created by one rank.
std::string create_unique_id();

// Collective: join the job as PE `rank` of `num_ranks`. Environment variables NVSHMEM reads
// (heap size, transports) must be set before the first call.
void init(const std::string& unique_id, int rank, int num_ranks);

bool initialized();
int my_pe();
int num_pes();

// Collective: a symmetric allocation of `bytes` (same offset on every PE), or an exception.
int64_t allocate(int64_t bytes);
// Collective.
void release(int64_t address);
// `address` (a symmetric address of mine) as PE `pe`'s memory mapped into my address space, or 0
// when the PE cannot be reached by loads and stores.
int64_t peer_address(int64_t address, int pe);

// Collective: tears NVSHMEM down (every allocation must have been released).
void finalize();

// Runs a kernel that reads this module's NVSHMEM device state: returns "" when it sees this PE,
// the PE count and a mapping of `symmetric_address`, else what it saw instead.
std::string probe(int64_t symmetric_address);

}  // namespace nvshmem_transport
}  // namespace deepep_megatron
