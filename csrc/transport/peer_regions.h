// Base addresses of every rank's registered region in this process's address space, as kernels
// receive them (by value, in their parameters). Index = rank within the NVLink domain.
#pragma once

#include <cstdint>

#include "common/limits.h"

namespace deepep_megatron {

struct PeerRegions {
    uint8_t* base[MAX_RANKS_PER_NODE];
};

}  // namespace deepep_megatron
