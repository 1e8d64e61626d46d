#include "internode/phases.h"

namespace deepep_megatron::internode {

namespace {

// Registered when the module loads. Waits on arrival counters report counts of this operation as
// "epochs" (expected: records or partial sums the peer sends; seen: how many had arrived).
const bool kPhasesRegistered = [] {
    register_wait_phases(
        kFamily, "internode",
        {
            {kPhaseDispatchStart, "dispatch"},
            {kPhaseLandingCredit, "dispatch (landing space at the same-index rank of a node)"},
            {kPhaseRecords, "dispatch (records from the same-index rank of a node; counts)"},
            {kPhaseReceiveCredit, "dispatch (receive block of a rank of this node)"},
            {kPhaseForwardDone, "dispatch (forwarding by a rank of this node)"},
            {kPhaseCombineStart, "combine"},
            {kPhaseCombineInput, "combine (input of a rank of this node)"},
            {kPhasePartialCredit, "combine (partial-sum space at the same-index rank of a node)"},
            {kPhasePullDone, "combine (reads by a rank of this node)"},
            {kPhasePartials, "combine (partial sums from the same-index rank of a node; counts)"},
        });
    return true;
}();

}  // namespace

}  // namespace deepep_megatron::internode
