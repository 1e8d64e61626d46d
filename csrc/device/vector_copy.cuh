// Vector types and loads/stores used by the data-moving kernels.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace deepep_megatron {

// Kernels are instantiated for two access widths: int4 (16 bytes) when row sizes and bases are
// 16-byte aligned, otherwise int (4 bytes: any even BF16 hidden size, any scale count).

// Input rows are read once and never written during the kernel: read-only path, no L1 allocate.
__device__ __forceinline__ int4 load_streaming(const int4* address) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
}
__device__ __forceinline__ int load_streaming(const int* address) {
    int v;
    asm volatile("ld.global.nc.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(address));
    return v;
}

// Rows that another rank produced (combine inputs): coherent loads that skip L1.
__device__ __forceinline__ int4 load_peer(const int4* address) {
    int4 v;
    asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
}
__device__ __forceinline__ int load_peer(const int* address) {
    int v;
    asm volatile("ld.global.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(address));
    return v;
}

// bf16 <-> fp32 for packed words. The reduction adds in fp32 and rounds once at the end
// (round-to-nearest-even, like torch's .to(torch.bfloat16)).
__device__ __forceinline__ void accumulate_bf16(float* acc, const int4& v) {
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                               static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[2 * i] += __uint_as_float(words[i] << 16);
        acc[2 * i + 1] += __uint_as_float(words[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void accumulate_bf16(float* acc, const int& v) {
    const uint32_t word = static_cast<uint32_t>(v);
    acc[0] += __uint_as_float(word << 16);
    acc[1] += __uint_as_float(word & 0xffff0000u);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(low));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(high));
    return lo | (hi << 16);
}
__device__ __forceinline__ int4 pack_bf16(const float* acc, int4*) {
    return make_int4(
        static_cast<int>(pack_bf16x2(acc[0], acc[1])), static_cast<int>(pack_bf16x2(acc[2], acc[3])),
        static_cast<int>(pack_bf16x2(acc[4], acc[5])), static_cast<int>(pack_bf16x2(acc[6], acc[7])));
}
__device__ __forceinline__ int pack_bf16(const float* acc, int*) {
    return static_cast<int>(pack_bf16x2(acc[0], acc[1]));
}

}  // namespace deepep_megatron
