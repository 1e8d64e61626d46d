// Where everything of the low-latency family lies in a rank's symmetric (NVSHMEM) block.
//
// Every rank allocates the same block with nvshmem_malloc, so an offset names the same place on
// every rank: a peer in the same node is reached at peer_base + offset, a peer in another node by
// a put to my_base + offset on its PE.
//
//   [ control (abort flag) | bank 0 signals | bank 1 signals | bank 0 data | bank 1 data ]
//
// Signals depend only on the rank count, so they stay put when a call changes the token count,
// hidden size or expert count; data areas are laid out per call from (T, H, E):
//
//   dispatch_landing  [E_local][R][T] messages: slot (e, src, j) holds src's j-th token for e
//   dispatch_staging  [T] messages: this rank's cast tokens, the source of puts to other nodes
//   dispatch_headers  [T][kMaxTopk] 16-byte headers (token, top-k slot), the source of header puts
//   combine_landing   [T][kMaxTopk][H] bf16: the row expert-rank r returns for (token, top-k slot)
//   combine_staging   [E_local][R * T][H] bf16: the zero-copy combine buffer, source of puts
//
// A message is a 16-byte header followed by one chunk per part of kPartChannels channels:
// [scales of the part's 128-channel blocks, padded to 16 bytes][payload] (FP8), or [payload]
// (BF16). Parts are the unit of work and of arrival counting: a message counts num_parts + 1
// arrivals (its parts and its header).
//
// Python mirrors bank_bytes in Buffer.get_low_latency_rdma_size_hint; a GPU test checks they agree.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define LL_HOST_DEVICE __host__ __device__
#else
#define LL_HOST_DEVICE
#endif

namespace deepep_megatron {
namespace low_latency {

constexpr int kPartChannels = 1024;  // channels per unit of work (8 FP8 scale blocks)
constexpr int kScaleBlock = 128;     // channels per FP8 scale
constexpr int kMaxTopk = 16;
constexpr int kMaxLocalExperts = 1024;
constexpr int kHeaderBytes = 16;
constexpr size_t kSectionAlignment = 256;
constexpr size_t kControlBytes = 256;

LL_HOST_DEVICE inline size_t align_up(size_t value, size_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

LL_HOST_DEVICE inline int num_parts(int hidden) {
    return (hidden + kPartChannels - 1) / kPartChannels;
}

LL_HOST_DEVICE inline int part_channels(int hidden, int part) {
    const int rest = hidden - part * kPartChannels;
    return rest < kPartChannels ? rest : kPartChannels;
}

// Bytes of the scale prefix of a part's FP8 chunk (0 for BF16).
LL_HOST_DEVICE inline size_t part_scale_bytes(int channels, bool fp8) {
    return fp8 ? align_up(static_cast<size_t>(channels / kScaleBlock) * 4, 16) : 0;
}

LL_HOST_DEVICE inline size_t part_chunk_bytes(int channels, bool fp8) {
    return align_up(part_scale_bytes(channels, fp8) + static_cast<size_t>(channels) * (fp8 ? 1 : 2), 16);
}

// Offset of part `part` inside a message: the header, then full parts before it.
LL_HOST_DEVICE inline size_t part_offset(int part, bool fp8) {
    return kHeaderBytes + static_cast<size_t>(part) * part_chunk_bytes(kPartChannels, fp8);
}

LL_HOST_DEVICE inline size_t message_bytes(int hidden, bool fp8) {
    const int last = num_parts(hidden) - 1;
    return part_offset(last, fp8) + part_chunk_bytes(part_channels(hidden, last), fp8);
}

// A landing slot holds either kind of message.
LL_HOST_DEVICE inline size_t slot_bytes(int hidden) {
    const size_t bf16 = message_bytes(hidden, false);
    const size_t fp8 = hidden % kScaleBlock == 0 ? message_bytes(hidden, true) : 0;
    return bf16 > fp8 ? bf16 : fp8;
}

// ------------------------------------------------------------------------------------ signals
// Per bank; words written by peers first, then words only this rank touches.
struct SignalLayout {
    size_t dispatch_count;     // [kMaxLocalExperts][R] u64: (seq << 32) | tokens src sends to e
    size_t dispatch_arrival;   // [kMaxLocalExperts][R] u64: cumulative arrivals (parts + headers)
    size_t combine_arrival;    // [R] u64: cumulative parts returned by expert rank r
    size_t dispatch_released;  // [R] u64: seq of the last dispatch receiver r finished on this bank
    size_t combine_released;   // [R] u64: same for combine
    size_t dispatch_expected;  // [kMaxLocalExperts][R] u64 (local): arrivals consumed so far
    size_t combine_expected;   // [R] u64 (local)
    size_t counters;           // BankCounters (local)
    size_t total;              // bytes of one bank's signals, section-aligned
};

// Sequence numbers and end-of-phase tickets of one bank (local; graph replays advance them).
struct BankCounters {
    unsigned int dispatch_send_seq, dispatch_recv_seq, combine_send_seq, combine_recv_seq;
    int dispatch_send_ticket, dispatch_recv_ticket, combine_send_ticket, combine_recv_ticket;
};

LL_HOST_DEVICE inline SignalLayout signal_layout(int num_ranks) {
    SignalLayout layout{};
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
        const size_t offset = cursor;
        cursor += align_up(bytes, kSectionAlignment);
        return offset;
    };
    const size_t pairs = static_cast<size_t>(kMaxLocalExperts) * num_ranks;
    layout.dispatch_count = take(pairs * 8);
    layout.dispatch_arrival = take(pairs * 8);
    layout.combine_arrival = take(static_cast<size_t>(num_ranks) * 8);
    layout.dispatch_released = take(static_cast<size_t>(num_ranks) * 8);
    layout.combine_released = take(static_cast<size_t>(num_ranks) * 8);
    layout.dispatch_expected = take(pairs * 8);
    layout.combine_expected = take(static_cast<size_t>(num_ranks) * 8);
    layout.counters = take(sizeof(BankCounters));
    layout.total = cursor;
    return layout;
}

// Offset of the first data byte (after control and both banks' signals).
LL_HOST_DEVICE inline size_t data_start(int num_ranks) {
    return kControlBytes + 2 * signal_layout(num_ranks).total;
}

LL_HOST_DEVICE inline size_t signal_bank_offset(int num_ranks, int bank) {
    return kControlBytes + static_cast<size_t>(bank) * signal_layout(num_ranks).total;
}

// ------------------------------------------------------------------------------------ data
struct DataLayout {
    size_t dispatch_landing, dispatch_staging, dispatch_headers, combine_landing, combine_staging;
    size_t slot;   // bytes of one landing slot
    size_t total;  // bytes of one bank's data, section-aligned
};

LL_HOST_DEVICE inline DataLayout data_layout(int max_tokens, int hidden, int num_experts) {
    DataLayout layout{};
    size_t cursor = 0;
    auto take = [&cursor](size_t bytes) {
        const size_t offset = cursor;
        cursor += align_up(bytes, kSectionAlignment);
        return offset;
    };
    const size_t tokens = static_cast<size_t>(max_tokens), experts = static_cast<size_t>(num_experts);
    const size_t row = static_cast<size_t>(hidden) * 2;
    layout.slot = slot_bytes(hidden);
    layout.dispatch_landing = take(experts * tokens * layout.slot);
    layout.dispatch_staging = take(tokens * layout.slot);
    layout.dispatch_headers = take(tokens * kMaxTopk * kHeaderBytes);
    layout.combine_landing = take(tokens * kMaxTopk * row);
    layout.combine_staging = take(experts * tokens * row);
    layout.total = cursor;
    return layout;
}

LL_HOST_DEVICE inline size_t data_bank_offset(int num_ranks, int max_tokens, int hidden, int num_experts,
                                              int bank) {
    return data_start(num_ranks) +
           static_cast<size_t>(bank) * data_layout(max_tokens, hidden, num_experts).total;
}

// Bytes a block needs for calls of these sizes (what Buffer.get_low_latency_rdma_size_hint gives).
inline size_t required_bytes(int max_tokens, int hidden, int num_ranks, int num_experts) {
    return data_start(num_ranks) + 2 * data_layout(max_tokens, hidden, num_experts).total;
}

}  // namespace low_latency
}  // namespace deepep_megatron
