#include "common/diagnostics.h"

#include <map>
#include <mutex>
#include <sstream>

namespace deepep_megatron {

namespace {

struct PhaseRegistry {
    std::mutex mutex;
    std::map<int, std::string> families;  // family -> name
    std::map<int, std::string> phases;    // wait_phase(family, step) -> "family step"
};

// Function-local so that families may register from static initialisers in any order.
PhaseRegistry& registry() {
    static PhaseRegistry instance;
    return instance;
}

}  // namespace

void register_wait_phases(int family, const std::string& family_name,
                          const std::vector<std::pair<int, std::string>>& phases) {
    PhaseRegistry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto [known, inserted] = r.families.emplace(family, family_name);
    if (!inserted && known->second != family_name)
        throw std::logic_error("deepep_megatron: wait-phase family " + std::to_string(family) + " is both '" +
                               known->second + "' and '" + family_name + "'");
    for (const auto& [phase, name] : phases) {
        if ((phase >> 16) != family)
            throw std::logic_error("deepep_megatron: wait phase " + name + " is not of family " +
                                   family_name);
        r.phases[phase] = family_name + " " + name;
    }
}

std::string wait_phase_name(int phase) {
    PhaseRegistry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto found = r.phases.find(phase);
    if (found != r.phases.end()) return found->second;
    auto family = r.families.find(phase >> 16);
    const std::string family_name =
        family != r.families.end() ? family->second : "family " + std::to_string(phase >> 16);
    return family_name + " step " + std::to_string(phase & 0xffff);
}

std::string describe_timeout(const TimeoutRecord& record, double timeout_seconds) {
    std::ostringstream message;
    message << "deepep_megatron: rank " << record.rank;
    const bool timed_out_here = record.timed_out_rank == record.rank;
    if (timed_out_here)
        message << " timed out after " << timeout_seconds << " s in ";
    else
        message << " gave up " << (record.peer < 0 ? "at the start of " : "in ");
    message << wait_phase_name(record.phase);
    if (record.peer >= 0)
        message << " waiting for rank " << record.peer << " (expected epoch " << record.expected << ", saw "
                << record.seen << ")";
    if (!timed_out_here)
        message << " because rank " << record.timed_out_rank << " timed out after " << timeout_seconds
                << " s and aborted the group";
    message << ". Did every rank of the group make the same call? The buffer cannot be used any more.";
    return message.str();
}

}  // namespace deepep_megatron
