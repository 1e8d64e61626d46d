// A development aid: with DEEPEP_MEGATRON_CRASH_REPORT set, a SIGSEGV or SIGBUS prints the faulting
// address and the native stack to stderr before the handler that was there (Python's faulthandler,
// which prints the Python stack, or the default) runs. The GPU test pools set it: a rank that dies
// in native code then says where.
#pragma once

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace deepep_megatron {

namespace crash_report_detail {

inline struct sigaction previous_handlers[2];  // SIGSEGV, SIGBUS

inline void report(int signal_number, siginfo_t* info, void*) {
    char line[160];
    const int length = std::snprintf(
        line, sizeof(line), "deepep_megatron: signal %d (%s) at address %p, native stack:\n", signal_number,
        signal_number == SIGSEGV ? "SIGSEGV" : "SIGBUS", info != nullptr ? info->si_addr : nullptr);
    if (length > 0) (void)!write(STDERR_FILENO, line, static_cast<size_t>(length));
    void* frames[64];
    backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
    sigaction(signal_number, &previous_handlers[signal_number == SIGSEGV ? 0 : 1], nullptr);
    raise(signal_number);
}

}  // namespace crash_report_detail

// Installs the report if DEEPEP_MEGATRON_CRASH_REPORT is set; call once per process (one module).
inline void install_crash_report() {
    if (std::getenv("DEEPEP_MEGATRON_CRASH_REPORT") == nullptr) return;
    struct sigaction action{};
    action.sa_sigaction = crash_report_detail::report;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &crash_report_detail::previous_handlers[0]);
    sigaction(SIGBUS, &action, &crash_report_detail::previous_handlers[1]);
}

}  // namespace deepep_megatron
