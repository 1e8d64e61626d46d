// Bounded waits: every wait on a flag another rank writes ends, met or not, within the configured
// timeout of the operation, and a wait that gives up says why in the rank's TimeoutRecord.
//
// Why a wait that cannot be met always ends in time (the hardening rule):
// - One deadline per operation, not per wait. Each rank's signal area holds an operation clock
//   (WaitControl::operation_clock): the first wait of an operation that has to spin stamps it
//   with the operation's epoch and the time; every later wait of that operation (later phases,
//   blocks that start late because not all blocks fit on the GPU at once, the dispatch kernel
//   after its count exchange) measures from that stamp. So waits in sequence share one timeout
//   instead of adding up, and a block that starts late gets no fresh one.
// - A timeout ends the rank's operation: the wait that times out sets the abort word in this
//   rank's own signal area, so this rank's other blocks (those running and those that start late)
//   give up at once instead of each waiting out the deadline. Peers are not written: a wait times
//   out precisely when a peer may be gone, and a store into a departed peer's freed region faults
//   the GPU context (under MPS that tears the process down). Every rank's waits are bounded by
//   its own operation deadline, so the group still ends within one timeout.
// - The abort word is never cleared. Blocks that start after it was set, and kernels queued
//   behind the failed one on the stream, see it before their first wait and exit at once; the
//   host refuses every later call of the buffer (it reads the record before it launches).
// - The host's own wait (the dispatch count exchange) has its own deadline, the timeout plus a
//   margin for launch and queueing, so it ends even when the kernel it waits for never starts.
// What remains unbounded is work, not waiting: an operation ends within the timeout plus the time
// its kernels spend moving data before their first wait that blocks.
#pragma once

#include "common/diagnostics.h"
#include "common/limits.h"
#include "device/clock.cuh"
#include "device/memory_order.cuh"
#include "device/wait_context.h"

namespace deepep_megatron {

// Flags are epochs compared as "reached", never reset, so wrap-around is harmless.
__device__ __forceinline__ bool epoch_reached(int flag, int epoch) {
    return static_cast<int>(flag - epoch) >= 0;
}

// Claims this rank's record for the first wait that gives up and fills it.
__device__ __forceinline__ void record_give_up(const WaitContext& ctx, int phase, int peer, int expected,
                                               int seen, int timed_out_rank) {
    if (atomicCAS(&ctx.local->record_claimed, 0, 1) != 0) return;
    ctx.record->rank = ctx.rank;
    ctx.record->peer = peer;
    ctx.record->phase = phase;
    ctx.record->expected = expected;
    ctx.record->seen = seen;
    ctx.record->timed_out_rank = timed_out_rank;
    __threadfence_system();  // the fields before `written`, for the host
    ctx.record->written = 1;
    __threadfence_system();
}

// The rank whose wait timed out first, or -1 while nothing has.
__device__ __forceinline__ int aborted_by(const WaitContext& ctx) {
    return load_volatile(&ctx.local->abort) - 1;
}

// A wait of this rank timed out: record it and tell this rank's other blocks to give up.
__device__ __forceinline__ void report_timeout(const WaitContext& ctx, int phase, int peer, int expected,
                                               int seen) {
    record_give_up(ctx, phase, peer, expected, seen, ctx.rank);
    store_release_system(&ctx.local->abort, ctx.rank + 1);
}

// Called by one thread of a block before the block's first wait: true when the group has already
// given up this operation (the caller's block then skips its work); records that it did.
__device__ __forceinline__ bool abort_seen_at_start(const WaitContext& ctx, int phase) {
    const int culprit = aborted_by(ctx);
    if (culprit < 0) return false;
    record_give_up(ctx, phase, -1, 0, 0, culprit);
    return true;
}

constexpr int kClockShift = 20;  // operation clock units of 2^20 ns (~1 ms); 32 bits last 52 days

// The start of the current operation (epoch) in clock units: stamped by the first caller.
__device__ __forceinline__ unsigned operation_start(const WaitContext& ctx, int epoch, long long now) {
    unsigned long long* clock = &ctx.local->operation_clock;
    unsigned long long word = *reinterpret_cast<volatile unsigned long long*>(clock);
    if (static_cast<int>(word >> 32) != epoch) {
        const unsigned long long stamp =
            (static_cast<unsigned long long>(static_cast<unsigned>(epoch)) << 32) |
            static_cast<unsigned>(now >> kClockShift);
        const unsigned long long previous = atomicCAS(clock, word, stamp);
        word = previous == word ? stamp : previous;  // another block of this operation stamped first
    }
    return static_cast<unsigned>(word);
}

// Spins on `poll` (returns true once the wait is met and stores the value it saw in `seen`) until
// it is met (true), the group aborts or the operation's deadline passes (false, recorded).
template <typename Poll>
__device__ __forceinline__ bool bounded_wait(const WaitContext& ctx, int epoch, int phase, int peer,
                                             Poll poll) {
    bool started = false;
    unsigned start = 0;
    while (true) {
        int seen;
        if (poll(seen)) return true;
        const int culprit = aborted_by(ctx);
        if (culprit >= 0) {
            record_give_up(ctx, phase, peer, epoch, seen, culprit);
            return false;
        }
        const long long now = global_time_ns();
        if (!started) {
            start = operation_start(ctx, epoch, now);
            started = true;
        }
        const unsigned elapsed = static_cast<unsigned>(now >> kClockShift) - start;
        if ((static_cast<long long>(elapsed) << kClockShift) > ctx.timeout_ns) {
            report_timeout(ctx, phase, peer, epoch, seen);
            return false;
        }
    }
}

// Spins until `*flag` reaches `epoch`.
__device__ __forceinline__ bool wait_epoch(const int* flag, int epoch, const WaitContext& ctx, int phase,
                                           int peer) {
    return bounded_wait(ctx, epoch, phase, peer, [&](int& seen) {
        seen = load_acquire_system(flag);
        return epoch_reached(seen, epoch);
    });
}

}  // namespace deepep_megatron
