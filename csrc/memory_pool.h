// The CPU memory pool for large tensors (memory_pool_cpu.cpp), as library.cpp's module exposes it.
#pragma once

#include <cstddef>

namespace mamlfast::cpu {

struct MemoryPoolStats {
  size_t reserved = 0;   // bytes mapped in segments
  size_t allocated = 0;  // bytes of them in blocks handed out
  size_t segments = 0;
};

// Installs the pool as c10's CPU allocator (once; later calls do nothing). Whether it is the
// allocator now: not where the platform has no mmap, nor where another allocator was set with a
// higher priority.
bool enable_memory_pool();

MemoryPoolStats memory_pool_stats();

// Unmaps the segments that hold no tensor; the bytes unmapped.
size_t release_memory_pool();

}  // namespace mamlfast::cpu
