// Per-thread scratch buffers kept between op calls (see scratch.h).
#include "cpu/scratch.h"

#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <array>

namespace mtlcore::cpu {

namespace {

constexpr int kSlots = static_cast<int>(ScratchSlot::kCount);

// c10::alloc_cpu: 64-byte aligned, and a clear error when the memory is not there.
void* allocate(std::size_t bytes) { return c10::alloc_cpu(std::max<std::size_t>(bytes, 64)); }

struct Retained {
  void* data = nullptr;
  std::size_t capacity = 0;
  bool busy = false;
};

// The calling thread's buffers, freed when it exits.
struct ThreadScratch {
  std::array<Retained, kSlots> slots{};
  ~ThreadScratch() {
    for (Retained& r : slots) c10::free_cpu(r.data);
  }
};

ThreadScratch& thread_scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

}  // namespace

RawScratch::RawScratch(ScratchSlot slot, std::size_t bytes) {
  const int index = static_cast<int>(slot);
  Retained& r = thread_scratch().slots[index];
  if (bytes > kMaxRetainedBytes || r.busy) {
    owned_ = allocate(bytes);
    data_ = owned_;
    return;
  }
  if (r.capacity < bytes) {
    // Grow to the request (no headroom: the sizes an op asks for repeat from call to call).
    void* fresh = allocate(bytes);
    c10::free_cpu(r.data);
    r.data = fresh;
    r.capacity = bytes;
  }
  r.busy = true;
  slot_ = index;
  data_ = r.data;
}

RawScratch::~RawScratch() {
  if (slot_ >= 0) {
    thread_scratch().slots[slot_].busy = false;
  } else {
    c10::free_cpu(owned_);
  }
}

}  // namespace mtlcore::cpu
