// The GPU's global nanosecond clock, which every bounded wait measures against.
#pragma once

namespace deepep_megatron {

__device__ __forceinline__ long long global_time_ns() {
    long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

}  // namespace deepep_megatron
