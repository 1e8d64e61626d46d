// Error checking for CUDA runtime calls on the host.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace deepep_megatron {

inline void cuda_check(cudaError_t status, const char* what, const char* file, int line) {
    if (status != cudaSuccess) {
        throw std::runtime_error(std::string("deepep_megatron: ") + what + " failed at " + file + ":" +
                                 std::to_string(line) + ": " + cudaGetErrorString(status));
    }
}

}  // namespace deepep_megatron

#define DEEPEP_CUDA_CHECK(call) ::deepep_megatron::cuda_check((call), #call, __FILE__, __LINE__)
