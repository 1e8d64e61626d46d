// A first-fit allocator over the part of the registered region that holds dispatch outputs.
//
// Dispatch results are handed to the user as ordinary tensors whose storage lies inside the
// region, so that senders can write every row at its final place (one copy). A block returns to
// the arena when the last tensor viewing it is freed; an event recorded on the then-current
// stream makes the next user of that memory wait for kernels still reading it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace deepep_megatron {

class Arena : public std::enable_shared_from_this<Arena> {
  public:
    // `owner` keeps the region alive while any block is in use.
    Arena(size_t begin, size_t end, int device, std::shared_ptr<void> owner);
    ~Arena();

    // Offset of a free block of `bytes` (rounded to the region alignment), or nothing if none
    // fits. `stream` is made to wait for the last users of recently freed memory.
    std::optional<size_t> allocate(size_t bytes, cudaStream_t stream);
    void release(size_t offset, size_t bytes);

    bool contains(size_t offset) const { return offset >= begin_ && offset < end_; }
    size_t bytes_in_use() const;

  private:
    void wait_for_pending_frees(cudaStream_t stream);

    size_t begin_, end_;
    int device_;
    std::shared_ptr<void> owner_;
    std::map<size_t, size_t> free_blocks_;  // offset -> size, coalesced
    std::vector<cudaEvent_t> pending_frees_;
    mutable std::mutex mutex_;
};

// One allocation; tensors viewing it share ownership through a shared_ptr to this object.
class ArenaBlock {
  public:
    ArenaBlock(std::shared_ptr<Arena> arena, size_t offset, size_t bytes)
        : arena_(std::move(arena)), offset_(offset), bytes_(bytes) {}
    ~ArenaBlock() { arena_->release(offset_, bytes_); }
    // A copy would release the block twice.
    ArenaBlock(const ArenaBlock&) = delete;
    ArenaBlock& operator=(const ArenaBlock&) = delete;

  private:
    std::shared_ptr<Arena> arena_;
    size_t offset_, bytes_;
};

}  // namespace deepep_megatron
