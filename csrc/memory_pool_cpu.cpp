// A pool for the memory of large CPU tensors, installed as c10's CPU allocator.
//
// torch's default CPU allocator calls malloc, and glibc serves the large blocks from the same heap
// as the small objects that autograd keeps from the forward to the backward (graph nodes, tensor
// metadata): its mmap threshold rises to the size of each mapped block freed, up to 32 MiB, so
// after the first iteration activations come from that heap too. The small long-lived objects
// settle among freed activations, the heap can neither give those holes back nor fit the next
// large tensors into them, and it grows: resident memory ends far above the tensors alive
// (benchmarks/RESULTS.md: a recomputing second-order iteration held 2.6 times its live tensors).
// Returning large blocks to the kernel at once (a fixed mmap threshold) keeps resident memory at
// the live tensors, but every allocation then faults in zeroed pages: iterations took twice as long.
//
// The pool keeps blocks of kMinPooled bytes or more apart from the small objects, in segments
// mapped from the kernel (pages become resident when first touched), and reuses freed blocks
// without new page faults. A request takes the first free block large enough in the order the
// segments were mapped, then by address, so that tensors crowd into the memory touched already;
// a block larger than asked for is split, and a freed block merges with free neighbours. On
// allocation traces of meta-iterations this touched 3 to 6% more pages than the peak of the
// tensors alive (best fit up to 10%, best fit by address up to 25% as mmap hands out segments at
// ever lower addresses, 64 MiB segments up to 18%). Smaller requests go to the allocator that was
// installed before. Segments stay mapped until release_memory_pool() unmaps the wholly free ones.
// Once installed the pool stays: memory it handed out may be freed at any later time.

#include "memory_pool.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <set>
#include <unordered_map>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#ifndef _WIN32
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace mamlfast::cpu {

#ifdef _WIN32

bool enable_memory_pool() { return false; }
MemoryPoolStats memory_pool_stats() { return {}; }
size_t release_memory_pool() { return 0; }

#else

namespace {

constexpr size_t kMinPooled = size_t{256} << 10;  // smaller requests: the previous allocator
constexpr size_t kPage = 4096;                     // block sizes and addresses: whole pages
constexpr size_t kSegment = size_t{32} << 20;      // smallest segment mapped
constexpr size_t kLargeSegmentStep = size_t{2} << 20;
constexpr size_t kMaxPooled = size_t{1} << 48;     // larger: the previous allocator refuses them, no rounding overflows

size_t round_up(size_t n, size_t step) { return (n + step - 1) / step * step; }

// A run of pages in a segment, free or handed out; its neighbours in the segment by address.
struct Block {
  size_t segment;  // the segments' serial numbers, in the order they were mapped
  char* address;
  size_t size;
  Block* before = nullptr;
  Block* after = nullptr;
  bool free = true;
};

// A block handed out or given back, and the pool's totals after it, for torch's memory profiler.
struct Change {
  char* address;  // null: no segment of ``bytes`` could be mapped
  int64_t bytes;  // negative: given back
  size_t allocated, reserved;
};

// Outside the pool's lock: the profiler may allocate.
void report(const Change& change) {
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(change.address, change.bytes, change.allocated, change.reserved,
                                     c10::Device(c10::DeviceType::CPU));
  }
}

struct FirstFit {
  bool operator()(const Block* a, const Block* b) const {
    return a->segment != b->segment ? a->segment < b->segment : a->address < b->address;
  }
};

class MemoryPool final : public c10::Allocator {
 public:
  explicit MemoryPool(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinPooled || nbytes > kMaxPooled) return fallback_->allocate(nbytes);
    const Change change = take(round_up(nbytes, kPage));
    if (change.address == nullptr) {
      c10::reportOutOfMemoryToProfiler(static_cast<int64_t>(nbytes), change.allocated, change.reserved,
                                       c10::Device(c10::DeviceType::CPU));
      TORCH_CHECK_WITH(OutOfMemoryError, false, "mamlfast: the CPU memory pool could not map ", change.bytes,
                       " bytes more (", change.reserved, " bytes mapped already)");
    }
    report(change);
    return {change.address, change.address, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_deallocate may be handed memory of the previous allocator, from before the pool was installed.
  c10::DeleterFnPtr raw_deleter() const override { return &delete_raw; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  MemoryPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {reserved_, allocated_, segments_};
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t released = 0;
    for (auto it = free_.begin(); it != free_.end();) {
      Block* block = *it;
      if (block->before || block->after) {  // part of a segment that holds other blocks
        ++it;
        continue;
      }
      it = free_.erase(it);
      TORCH_CHECK(munmap(block->address, block->size) == 0, "mamlfast: munmap failed on the CPU memory pool");
      released += block->size;
      reserved_ -= block->size;
      --segments_;
      delete block;
    }
    return released;
  }

  // Around fork(): the child inherits the pool unlocked, whatever another thread was doing.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  Change take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto fit = std::find_if(free_.begin(), free_.end(), [size](const Block* block) { return block->size >= size; });
    Block* block;
    if (fit != free_.end()) {
      block = *fit;
      free_.erase(fit);
    } else {
      const size_t bytes = std::max(kSegment, round_up(size, kLargeSegmentStep));
      block = map_segment(bytes);
      if (block == nullptr) return {nullptr, static_cast<int64_t>(bytes), allocated_, reserved_};
    }
    if (block->size - size >= kMinPooled) {  // a smaller rest stays with the block
      auto* rest = new Block{block->segment, block->address + size, block->size - size, block, block->after};
      if (block->after) block->after->before = rest;
      block->after = rest;
      block->size = size;
      free_.insert(rest);
    }
    block->free = false;
    used_.emplace(block->address, block);
    allocated_ += block->size;
    return {block->address, static_cast<int64_t>(block->size), allocated_, reserved_};
  }

  // A new segment as one free block, or null where the kernel refuses.
  Block* map_segment(size_t bytes) {
    void* address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (address == MAP_FAILED) return nullptr;
    reserved_ += bytes;
    ++segments_;
    return new Block{serial_++, static_cast<char*>(address), bytes};
  }

  // Whether ``address`` was handed out by the pool; if so, it is free again.
  bool give_back(void* address) {
    Change change{};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = used_.find(address);
      if (found == used_.end()) return false;
      Block* block = found->second;
      used_.erase(found);
      allocated_ -= block->size;
      change = Change{block->address, -static_cast<int64_t>(block->size), allocated_, reserved_};
      block->free = true;
      if (block->before && block->before->free) block = merge(block->before, block);
      if (block->after && block->after->free) block = merge(block, block->after);
      free_.insert(block);
    }
    report(change);
    return true;
  }

  // ``second`` into ``first``, its neighbour before it; either may be in the free set.
  Block* merge(Block* first, Block* second) {
    free_.erase(first);
    free_.erase(second);
    first->size += second->size;
    first->after = second->after;
    if (second->after) second->after->before = first;
    delete second;
    return first;
  }

  static void delete_block(void* address);
  static void delete_raw(void* address);

  c10::Allocator* const fallback_;
  std::mutex mutex_;
  std::set<Block*, FirstFit> free_;
  std::unordered_map<void*, Block*> used_;
  size_t reserved_ = 0, allocated_ = 0, segments_ = 0, serial_ = 0;
};

MemoryPool* pool = nullptr;  // set once, never freed: blocks may be returned until the process exits

void MemoryPool::delete_block(void* address) {
  TORCH_INTERNAL_ASSERT(pool->give_back(address), "mamlfast: freeing memory the CPU memory pool did not hand out");
}

void MemoryPool::delete_raw(void* address) {
  if (pool->give_back(address)) return;
  const c10::DeleterFnPtr fallback = pool->fallback_->raw_deleter();
  TORCH_INTERNAL_ASSERT(fallback, "mamlfast: raw memory of an allocator without a raw deleter");
  fallback(address);
}

}  // namespace

bool enable_memory_pool() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    pool = new MemoryPool(c10::GetCPUAllocator());
    pthread_atfork([] { pool->lock(); }, [] { pool->unlock(); }, [] { pool->unlock(); });
    c10::SetCPUAllocator(pool, /*priority=*/0);
  });
  return c10::GetCPUAllocator() == pool;  // an allocator set with a higher priority stays
}

MemoryPoolStats memory_pool_stats() { return pool ? pool->stats() : MemoryPoolStats{}; }

size_t release_memory_pool() { return pool ? pool->release() : 0; }

#endif

}  // namespace mamlfast::cpu
