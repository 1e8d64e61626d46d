// One rank's registered region and its peers' mappings of theirs, over CUDA IPC: the memory that
// the ranks of one NVLink domain (or of one GPU under MPS) read and write directly.
//
// The region is one plain cudaMalloc (not the caching allocator: an IPC handle exports a whole
// allocation). Every rank exports a handle, the handles are exchanged out of band (Python's
// all_gather_object), and every rank opens its peers'. The allocation is freed when the last
// owner lets go: the region itself and whatever still views it (arena tensors share `owner()`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/peer_regions.h"

namespace deepep_megatron {

class IpcRegion {
  public:
    // Allocates `bytes` on the current device and zeroes the first `zeroed_bytes`.
    IpcRegion(int rank, int num_ranks, size_t bytes, size_t zeroed_bytes);
    ~IpcRegion();
    IpcRegion(const IpcRegion&) = delete;
    IpcRegion& operator=(const IpcRegion&) = delete;

    // This rank's IPC handle, as bytes for the exchange.
    std::string export_handle() const;
    // Maps every peer's region; `handles[r]` is rank r's exported handle (this rank's is ignored).
    void open_peers(const std::vector<std::string>& handles);
    // Unmaps the peers and drops this object's ownership of the allocation. Idempotent.
    void close();
    // Gives the allocation and the peers' mappings up without freeing or unmapping them: for a
    // group that failed, where a peer's kernel may still write here after this rank is done.
    void abandon();

    bool peers_open() const { return peers_open_; }
    int device() const { return device_; }
    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    uint8_t* base() const { return base_; }
    uint8_t* peer_base(int rank) const { return peer_bases_[rank]; }
    // The table kernels receive; entries past num_ranks are null.
    PeerRegions peer_table() const;
    // Shared ownership of the allocation (it is freed when the last owner is gone).
    const std::shared_ptr<void>& owner() const { return owner_; }

  private:
    int rank_, num_ranks_, device_ = 0;
    uint8_t* base_ = nullptr;
    std::shared_ptr<void> owner_;
    std::vector<uint8_t*> peer_bases_;  // [rank]; this rank's entry is base_
    bool peers_open_ = false;
};

}  // namespace deepep_megatron
