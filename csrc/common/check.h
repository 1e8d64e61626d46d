// Host-side checks: CUDA runtime calls and arguments.
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

// An argument check: raises std::invalid_argument (a Python ValueError) with `message`.
inline void require(bool condition, const std::string& message) {
    if (!condition) throw std::invalid_argument("deepep_megatron: " + message);
}

}  // namespace deepep_megatron

#define DEEPEP_CUDA_CHECK(call) ::deepep_megatron::cuda_check((call), #call, __FILE__, __LINE__)
