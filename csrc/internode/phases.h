// The wait phases of the internode family (names in phases.cpp, registered with
// common/diagnostics so that timeout messages can name them).
#pragma once

#include "common/diagnostics.h"

namespace deepep_megatron::internode {

// This family's number in wait_phase(family, step); unique among families (intranode is 1).
constexpr int kFamily = 3;

constexpr int kPhaseDispatchStart = wait_phase(kFamily, 1);
constexpr int kPhaseLandingCredit = wait_phase(kFamily, 2);
constexpr int kPhaseRecords = wait_phase(kFamily, 3);
constexpr int kPhaseReceiveCredit = wait_phase(kFamily, 4);
constexpr int kPhaseForwardDone = wait_phase(kFamily, 5);
constexpr int kPhaseCombineStart = wait_phase(kFamily, 6);
constexpr int kPhaseCombineInput = wait_phase(kFamily, 7);
constexpr int kPhasePartialCredit = wait_phase(kFamily, 8);
constexpr int kPhasePullDone = wait_phase(kFamily, 9);
constexpr int kPhasePartials = wait_phase(kFamily, 10);

}  // namespace deepep_megatron::internode
