// The CPU memory pool of a RIM call: see cpu_pool.h.
#include "cpu_pool.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rim_fast {
namespace cpu_pool {
namespace {

// one page: smaller requests come from malloc's bins, which hardly fault. Between a page and glibc's 128 KiB mmap
// threshold too: malloc serves those from the top of its heap, which it trims as soon as 128 KiB lie free there
constexpr size_t kMinBytes = 4096;
constexpr size_t kPage = 4096;

struct Block {
  c10::DataPtr base;  // the replaced allocator's allocation; destroying it frees the memory
  size_t bytes;
  uint64_t call = 0;  // the call (outermost open) in which it was last listed
};

class Pool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) {
      return base_allocator()->allocate(n);
    }
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    std::unique_ptr<Block> block;
    c10::Allocator* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (depth_ > 0 && it != free_.end() && !it->second.empty()) {
        block.reset(it->second.back());
        it->second.pop_back();
        listed_bytes_ -= bytes;
        --listed_;
        ++hits_;
      } else {
        base = base_or_default();
      }
    }
    if (!block) {
      block.reset(new Block{base->allocate(bytes), bytes, 0});  // outside the lock: the replaced allocator allocates
    }
    void* ptr = block->base.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (base != nullptr) {
        ++misses_;
      }
      live_.emplace(ptr, block.release());
    }
    return {ptr, ptr, &Pool::free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Pool::free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool open() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) {
        base_ = current;
      }
      c10::SetCPUAllocator(this, 0);
      if (c10::GetCPUAllocator() != this) {
        return false;  // an allocator registered with a higher priority stays
      }
    }
    ++depth_;
    return true;
  }

  // ``keep``: the blocks listed since the previous call opened stay listed (those listed before it and not reused
  // since are freed); else every listed block is freed
  void close(bool keep) {
    std::vector<Block*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (depth_ == 0) {
        return;
      }
      if (--depth_ == 0) {
        c10::SetCPUAllocator(base_, 0);
        take_listed(keep ? (call_ > 0 ? call_ - 1 : 0) : UINT64_MAX, release);
        ++call_;
      }
    }
    for (Block* block : release) {
      delete block;  // outside the lock: the replaced allocator frees
    }
  }

  // frees every listed block (none while the pool is open)
  void release_all() {
    std::vector<Block*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (depth_ > 0) {
        return;
      }
      take_listed(UINT64_MAX, release);
    }
    for (Block* block : release) {
      delete block;
    }
  }

  void stats(int64_t out[6]) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = depth_;
    out[1] = listed_;
    out[2] = static_cast<int64_t>(listed_bytes_);
    out[3] = hits_;
    out[4] = misses_;
    out[5] = static_cast<int64_t>(live_.size());
  }

  static Pool& instance() {
    // never destroyed: tensors allocated here may be freed at interpreter exit, after static destructors
    static Pool* pool = [] {
      Pool* created = new Pool();
      // fork (DataLoader workers) while another thread holds the lock would leave the child's copy locked for
      // ever: the forking thread takes it first, and both sides release it (in the child it is that thread's).
      // Lock order: this lock, then malloc's (the lock is held around malloc; glibc takes its own after these)
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return created;
    }();
    return *pool;
  }

 private:
  // moves the listed blocks listed before call ``keep_from`` opened (after call ``keep_from - 1`` closed) to
  // ``out``: all of them for UINT64_MAX (with the lock held)
  void take_listed(uint64_t keep_from, std::vector<Block*>& out) {
    for (auto it = free_.begin(); it != free_.end();) {
      auto& blocks = it->second;
      size_t kept = 0;
      for (Block* block : blocks) {
        if (block->call >= keep_from) {
          blocks[kept++] = block;
        } else {
          out.push_back(block);
          listed_bytes_ -= block->bytes;
          --listed_;
        }
      }
      blocks.resize(kept);
      it = blocks.empty() ? free_.erase(it) : std::next(it);
    }
  }

  c10::Allocator* base_or_default() const { return base_ != nullptr ? base_ : c10::GetDefaultCPUAllocator(); }

  c10::Allocator* base_allocator() {
    std::lock_guard<std::mutex> lock(mutex_);
    return base_or_default();
  }

  static void free_block(void* ptr) {
    Pool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      auto it = pool.live_.find(ptr);
      if (it == pool.live_.end()) {
        return;  // not ours: cannot happen (only our DataPtrs carry this deleter)
      }
      Block* block = it->second;
      pool.live_.erase(it);
      // listed while open and while closed alike: a training step's gradients and activations are freed by the
      // optimizer and the backward pass, outside the RIM call, and its next call reuses them
      block->call = pool.call_;
      pool.free_[block->bytes].push_back(block);
      pool.listed_bytes_ += block->bytes;
      ++pool.listed_;
    }
  }

  std::mutex mutex_;
  c10::Allocator* base_ = nullptr;  // the allocator the pool replaced (kept after close: it allocates misses)
  int64_t depth_ = 0;
  uint64_t call_ = 0;  // outermost opens so far
  std::unordered_map<size_t, std::vector<Block*>> free_;  // listed blocks by size
  std::unordered_map<void*, Block*> live_;                // handed-out blocks by data pointer
  int64_t listed_ = 0;
  size_t listed_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

bool open() { return Pool::instance().open(); }

void close(bool keep) { Pool::instance().close(keep); }

void release() { Pool::instance().release_all(); }

void stats(int64_t out[6]) { Pool::instance().stats(out); }

}  // namespace cpu_pool
}  // namespace rim_fast
