#include "common/diagnostics.h"

#include <cstdio>
#include <map>
#include <mutex>

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

std::string seconds_text(double seconds) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g s", seconds);
    return text;
}

std::string describe_timeout(const TimeoutRecord& record, double timeout_seconds) {
    // Copied out of the host-mapped record once, so the message is built from one reading.
    const int rank = record.rank, peer = record.peer, timed_out_rank = record.timed_out_rank;
    const int expected = record.expected, seen = record.seen, phase = record.phase;
    const bool timed_out_here = timed_out_rank == rank;
    std::string message = "deepep_megatron: rank " + std::to_string(rank);
    if (timed_out_here)
        message += " timed out after " + seconds_text(timeout_seconds) + " in ";
    else
        message += peer < 0 ? " gave up at the start of " : " gave up in ";
    message += wait_phase_name(phase);
    if (peer >= 0)
        message += " waiting for rank " + std::to_string(peer) + " (expected epoch " +
                   std::to_string(expected) + ", saw " + std::to_string(seen) + ")";
    if (!timed_out_here)
        message += " because rank " + std::to_string(timed_out_rank) + " timed out after " +
                   seconds_text(timeout_seconds) + " and aborted the group";
    return message + ". Did every rank of the group make the same call? The buffer cannot be used any more.";
}

}  // namespace deepep_megatron
