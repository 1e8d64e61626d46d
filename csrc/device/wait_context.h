// The plain structs of the bounded waits (device/wait.cuh), shared by host code that fills them
// and kernels that use them.
#pragma once

#include "common/diagnostics.h"
#include "common/limits.h"

namespace deepep_megatron {

// The words of a rank's signal area that bounded waits use; every family's signal area holds one.
struct WaitControl {
    int abort;           // 0, or 1 + this rank once one of its waits timed out; never cleared
    int record_claimed;  // 1 once a wait of this rank owns the TimeoutRecord; never cleared
    // (epoch << 32) | start of the operation's first wait that had to spin, in 2^20 ns units.
    unsigned long long operation_clock;
};

// Everything the waits of a kernel need to time out cleanly, say why, and stop this rank's blocks.
struct WaitContext {
    WaitControl* local;     // this rank's
    TimeoutRecord* record;  // this rank's, host-mapped
    long long timeout_ns;
    int rank;
};

}  // namespace deepep_megatron
