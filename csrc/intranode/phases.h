// The wait phases of the intranode family (names in phases.cpp, registered with
// common/diagnostics so that timeout messages can name them).
#pragma once

#include "common/diagnostics.h"

namespace deepep_megatron::intranode {

// This family's number in wait_phase(family, step); unique among families.
constexpr int kFamily = 1;

constexpr int kPhaseNotifyStart = wait_phase(kFamily, 1);
constexpr int kPhaseNotifyCounts = wait_phase(kFamily, 2);
constexpr int kPhaseDispatchStart = wait_phase(kFamily, 3);
constexpr int kPhaseDispatchOffsets = wait_phase(kFamily, 4);
constexpr int kPhaseDispatchData = wait_phase(kFamily, 5);
constexpr int kPhaseCombineStart = wait_phase(kFamily, 6);
constexpr int kPhaseCombineOffsets = wait_phase(kFamily, 7);
constexpr int kPhaseCombineDone = wait_phase(kFamily, 8);

}  // namespace deepep_megatron::intranode
