// The per-token FP8 cast of deepep_megatron/fp8.py, bit for bit: per 128 channels
// amax = max(max|x|, 1e-4), scale = amax / 448 (IEEE division), optionally rounded up to a power
// of two on the float bits, then e4m3(x / scale) with round-to-nearest-even (|x / scale| <= 448,
// so saturation never changes a value).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace deepep_megatron {
namespace low_latency {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxMin = 1e-4f;

__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&out)[8]) {
    const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                               static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float abs_max8(const float (&v)[8]) {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(v[i]));
    return m;
}

// Max over the 16 lanes of a half warp (one 128-channel block when each lane holds 8 channels).
__device__ __forceinline__ float half_warp_max(float value) {
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// The dequantisation scale of a block with absolute maximum `amax`.
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
    const float scale = __fdiv_rn(fmaxf(amax, kAmaxMin), kFp8Max);
    if (!round_scale) return scale;
    // 2^ceil(log2(scale)) from the bits (positive, normal): bump the exponent if any mantissa bit.
    const uint32_t bits = __float_as_uint(scale);
    const uint32_t exponent = (bits >> 23) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
    return __uint_as_float(exponent << 23);
}

__device__ __forceinline__ uint32_t ue8m0_byte(float pow2_scale) {
    return (__float_as_uint(pow2_scale) >> 23) & 0xffu;
}

// Eight channels to eight e4m3 bytes (channel 0 in the lowest byte).
__device__ __forceinline__ uint2 quantize8(const float (&v)[8], float scale) {
    uint32_t words[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        uint32_t word = 0;
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
            const int i = 4 * w + 2 * pair;
            const float2 scaled = make_float2(__fdiv_rn(v[i], scale), __fdiv_rn(v[i + 1], scale));
            const uint32_t two = __nv_cvt_float2_to_fp8x2(scaled, __NV_SATFINITE, __NV_E4M3);
            word |= (two & 0xffffu) << (16 * pair);
        }
        words[w] = word;
    }
    return make_uint2(words[0], words[1]);
}

}  // namespace low_latency
}  // namespace deepep_megatron
