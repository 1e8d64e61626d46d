// Timeout diagnostics shared by every family.
//
// A bounded wait that gives up leaves one record in host-mapped memory (TimeoutRecord): which rank
// gave up, in which wait phase, waiting for which peer, which epoch it expected and which it saw,
// and which rank's wait timed out first (itself, or the peer whose abort ended this wait). The
// host turns the record into the message of a DeviceTimeout, which Python sees as TimeoutError.
//
// Wait phases form an open registry: a phase is (family, step), packed in one int so that device
// code can carry it; each family declares its steps and names them on the host with
// `register_wait_phases`, so a new family adds phases without editing anyone else's list.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace deepep_megatron {

// Host-mapped; written by the device, read by the host. The first wait of a rank that gives up
// claims the record (with an atomic in device memory: WaitControl::record_claimed), fills it, then
// sets `written` after a system fence, so the host never reads a half-written record.
struct TimeoutRecord {
    volatile int written;         // 1 once the fields below are complete
    volatile int rank;            // the rank that gave up
    volatile int peer;            // the rank it waited for; -1 when it gave up before waiting
    volatile int phase;           // wait_phase(family, step)
    volatile int expected;        // epoch it waited for
    volatile int seen;            // epoch it saw last
    volatile int timed_out_rank;  // the rank whose wait timed out first (== rank: this one did)
};

// A wait phase: the family's number in the high half, the family's step in the low half.
// (constexpr: kernels use the phases as compile-time constants.)
constexpr int wait_phase(int family, int step) {
    return (family << 16) | step;
}

// Raised (as a Python TimeoutError) when a device-side wait or a host-side wait times out.
class DeviceTimeout : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// "3 s", "0.5 s": a duration for messages.
std::string seconds_text(double seconds);

// Declares the wait phases of one family: `family` is its number (unique: registering a number
// twice under another name throws), `phases` names each of its wait_phase(family, step) values
// ("dispatch (count exchange)").
void register_wait_phases(int family, const std::string& family_name,
                          const std::vector<std::pair<int, std::string>>& phases);

// "intranode dispatch (count exchange)", or a generic name for an unregistered phase.
std::string wait_phase_name(int phase);

// The message of the DeviceTimeout for a written record.
std::string describe_timeout(const TimeoutRecord& record, double timeout_seconds);

}  // namespace deepep_megatron
