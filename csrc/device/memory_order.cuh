// Memory-ordering primitives for flags and data that other ranks read or write over NVLink (or, on
// the one-GPU harness, through IPC mappings of the same device memory).
//
// The rule every family follows:
//   producer: plain data stores; `fence_system()` in every thread that stored; a block barrier;
//             then one thread publishes the flag with `store_release_system`.
//   consumer: polls the flag with `load_acquire_system`; a block barrier; then plain data loads.
// System scope, because the other side is another process (another GPU, or another MPS client).
#pragma once

#include <cstdint>
#include <type_traits>

namespace deepep_megatron {

__device__ __forceinline__ int load_acquire_system(const int* address) {
    int value;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

// 64-bit words: `unsigned long long`, or `uint64_t` (`unsigned long`) where a word is also an
// NVSHMEM signal.
template <typename Word>
using Word64 = std::enable_if_t<sizeof(Word) == 8 && std::is_unsigned_v<Word>, Word>;

template <typename Word>
__device__ __forceinline__ Word64<Word> load_acquire_system(const Word* address) {
    Word value;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void store_release_system(int* address, int value) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

template <typename Word>
__device__ __forceinline__ void store_release_system(Word* address, Word64<Word> value) {
    asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// Adds to a counter another rank polls; orders this thread's earlier stores before the addition.
template <typename Word>
__device__ __forceinline__ void add_release_system(Word* address, Word64<Word> value) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// Orders this thread's earlier stores (and loads) before its later ones, for every observer.
__device__ __forceinline__ void fence_system() {
    asm volatile("fence.acq_rel.sys;" ::: "memory");
}

// A read that is never cached, for words another block or rank may change at any time (flags
// polled without ordering the data behind them: abort, bookkeeping).
__device__ __forceinline__ int load_volatile(const int* address) {
    return *reinterpret_cast<const volatile int*>(address);
}

}  // namespace deepep_megatron
