// The limits every family shares: the one C++ declaration of the numbers in
// deepep_megatron/limits.py, with the same names and values. bindings.cpp exports them as module
// attributes and deepep_megatron/backends/extension.py refuses an extension whose numbers differ,
// so the two declarations cannot drift apart unnoticed.
#pragma once

#include <cstddef>

namespace deepep_megatron {

// Channels per FP8 scale: one float32 scale per 128 e4m3 values of a row.
inline constexpr int FP8_BLOCK_SIZE = 128;
// Largest top-k a dispatch takes.
inline constexpr int MAX_TOPK = 16;
// Largest NVLink domain (ranks that map each other's memory); sizes the per-peer tables.
inline constexpr int MAX_RANKS_PER_NODE = 8;
// Largest number of nodes of the internode kernels (per-node signal words and row tables).
inline constexpr int MAX_NODES = 16;
// Largest number of experts per rank (per-expert counts travel in fixed slots).
inline constexpr int MAX_LOCAL_EXPERTS = 1024;
// Alignment in bytes of every sub-array of a registered region (16-byte vector stores, TMA).
inline constexpr int REGION_ALIGNMENT = 256;

// C++ only (not part of the Python contract):
// Most blocks a kernel grid may have: at least the SM count of any Hopper part (132), since the
// per-block completion flags of the signal area are sized by it.
inline constexpr int kMaxBlocks = 160;

inline size_t align_region(size_t bytes) {
    return (bytes + REGION_ALIGNMENT - 1) / REGION_ALIGNMENT * REGION_ALIGNMENT;
}

}  // namespace deepep_megatron
