// Scratch memory for the CPU kernels' temporaries (padded copies of images, the convolution
// backward's G, per-thread workspaces), kept between op calls instead of allocated anew.
//
// Why. A temporary of a few megabytes allocated on every call comes from fresh pages most of
// the time: glibc maps large blocks and trims the top of its heap as they are freed, so each
// call pays a page fault per 4 kB page written (about 2,000 per training step of the small
// CNN, 5-9 ms of system time on our 2-core machine). A buffer kept by the thread is faulted in
// once.
// What is kept. Each thread keeps one buffer per slot (ScratchSlot), grown to the largest size
// requested and never shrunk, freed when the thread exits. Requests above kMaxRetainedBytes,
// and requests for a slot that is already in use on the thread, get their own allocation,
// freed with the ScratchBuffer. So the memory kept per thread is at most the largest
// temporaries the ops have needed there, each at most kMaxRetainedBytes.
// Threads. Slots are per thread, so concurrent op calls from several threads never share a
// buffer; the contents are undefined on return (like at::empty's).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mtlcore::cpu {

// Requests larger than this are allocated per call and not kept.
inline constexpr std::size_t kMaxRetainedBytes = std::size_t{256} << 20;

// One slot per temporary that can be alive at the same time on one thread. Slots used inside
// parallel regions (kWorker*) are distinct from those of the calling op, whose thread takes
// part in the region.
enum class ScratchSlot : int {
  kConvPaddedInput = 0,  // the forward's zero-padded input copy
  kConvGrad,             // the backward's G = grad_output * act'(saved)
  kConvPaddedGrad,       // G zero-padded, for a unit-stride input gradient
  kConvGradT,            // G transposed into channel panels, for the direct weight gradient
  kWorkerWorkspace,      // a parallel job's micro-kernel workspace
  kWorkerColumns,        // input gradient by columns: a block of columns
  kWorkerImage,          // input gradient by columns: the padded image gradient
  kWorkerGradBlock,      // weight gradient without G in memory: a block of G's rows
  kCount,
};

// A 64-byte aligned buffer of at least `bytes` bytes, valid while the object lives.
class RawScratch {
 public:
  RawScratch(ScratchSlot slot, std::size_t bytes);
  ~RawScratch();
  RawScratch(RawScratch&& other) noexcept
      : data_(other.data_), owned_(other.owned_), slot_(other.slot_) {
    other.data_ = other.owned_ = nullptr;
    other.slot_ = -1;
  }
  RawScratch(const RawScratch&) = delete;
  RawScratch& operator=(const RawScratch&) = delete;
  RawScratch& operator=(RawScratch&&) = delete;
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  void* owned_ = nullptr;  // set when the buffer is not the thread's retained one
  int slot_ = -1;          // the retained slot in use, or -1
};

// `count` elements of T (count >= 0) from `slot`; contents undefined.
template <typename T>
class ScratchBuffer {
 public:
  ScratchBuffer(ScratchSlot slot, int64_t count)
      : raw_(slot, static_cast<std::size_t>(count) * sizeof(T)) {}
  T* data() const { return static_cast<T*>(raw_.data()); }

 private:
  RawScratch raw_;
};

}  // namespace mtlcore::cpu
