// Memory for the ops' large CPU outputs (activations, gradients), kept when their tensors die
// and handed to the next output of the same size.
//
// Why. A training step allocates the same multi-megabyte outputs every step, and glibc hands
// them out as fresh pages whenever it has returned the previous ones to the system (it maps
// large blocks and trims the top of its heap as they are freed): each 4 kB page written then
// costs a fault, 3-4 microseconds on our 2-core machine, about 1,000 per step of the small CNN
// (scratch.h keeps the kernels' temporaries; this keeps their outputs).
// What is kept. Requests of at least kMinCachedBytes are rounded up to whole 4 kB pages. When
// such a tensor dies, its block is kept while the blocks kept total at most the limit,
// evicting the blocks freed longest ago first; a request takes a kept block of exactly its
// rounded size, the one freed last. The limit is MTLCORE_CPU_CACHE_MB megabytes (read at the
// first request; default 256; 0 turns the cache off) or set_output_cache_limit's; it is 0 in
// AddressSanitizer builds, so that the sanitizer sees every use after free. Smaller requests,
// and all requests while the limit is 0, go to at::empty (c10's CPU allocator).
// Threads. One mutex guards the kept blocks: a tensor may die on any thread. The contents of a
// new output are undefined, as at::empty's.
// Profiler. Allocations and releases are reported to torch.profiler's memory profiling, as the
// default CPU allocator's are.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace mtlcore::cpu {

// Requests below this size go to c10's CPU allocator.
inline constexpr std::size_t kMinCachedBytes = std::size_t{64} << 10;

// A new tensor of `sizes` with `options` (dtype, device and memory format; contents
// undefined). CPU tensors come from the output cache, others from at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheStats {
  int64_t limit_bytes = 0;      // most bytes kept
  int64_t cached_bytes = 0;     // bytes kept now
  int64_t cached_blocks = 0;    // blocks kept now
  int64_t allocated_bytes = 0;  // bytes of live tensors from the cache
  int64_t hits = 0;             // requests served from kept blocks
  int64_t misses = 0;           // requests that allocated
};

OutputCacheStats output_cache_stats();

// Frees every kept block (live tensors are not affected).
void empty_output_cache();

// Sets the most bytes kept (0 turns the cache off), freeing kept blocks above it.
void set_output_cache_limit(int64_t bytes);

}  // namespace mtlcore::cpu
