// DEEPEP_HOST_DEVICE marks functions that host code and kernels both call (a no-op for the host
// compiler).
#pragma once

#ifdef __CUDACC__
#define DEEPEP_HOST_DEVICE __host__ __device__
#else
#define DEEPEP_HOST_DEVICE
#endif
