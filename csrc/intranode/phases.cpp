#include "intranode/phases.h"

namespace deepep_megatron::intranode {

namespace {

// Registered when the extension loads.
const bool kPhasesRegistered = [] {
    register_wait_phases(kFamily, "intranode",
                         {
                             {kPhaseNotifyStart, "dispatch (count exchange)"},
                             {kPhaseNotifyCounts, "dispatch (count exchange)"},
                             {kPhaseDispatchStart, "dispatch"},
                             {kPhaseDispatchOffsets, "dispatch (receive-block address)"},
                             {kPhaseDispatchData, "dispatch (data completion)"},
                             {kPhaseCombineStart, "combine"},
                             {kPhaseCombineOffsets, "combine (input address)"},
                             {kPhaseCombineDone, "combine (read completion)"},
                         });
    return true;
}();

}  // namespace

}  // namespace deepep_megatron::intranode
