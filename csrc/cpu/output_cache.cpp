// The ops' CPU output cache (see output_cache.h).
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

namespace mtlcore::cpu {

namespace {

constexpr std::size_t kPage = 4096;
// Each block starts with a header holding its size; the data follows, 64-byte aligned.
constexpr std::size_t kHeader = 64;

// AddressSanitizer builds keep nothing, so that it sees every use after free.
#ifdef __SANITIZE_ADDRESS__
constexpr bool kCacheBuilt = false;
#else
constexpr bool kCacheBuilt = true;
#endif

struct Block {
  void* base;
  std::size_t bytes;  // data bytes (a whole number of pages)
  uint64_t freed;     // when it was kept (a counter): the smallest is evicted first
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
    const char* env = std::getenv("MTLCORE_CPU_CACHE_MB");
    int64_t mb = 256;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0 && v < (1LL << 40),
                        "MTLCORE_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", env,
                        "'");
      mb = v;
    }
    limit_.store(kCacheBuilt ? static_cast<std::size_t>(mb) << 20 : 0, std::memory_order_relaxed);
  }

  c10::DataPtr allocate(std::size_t n) override {
    const std::size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* base = nullptr;
    Totals totals;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The block of this size freed last (its pages are the likeliest to be in cache).
      std::size_t found = kept_.size();
      for (std::size_t i = 0; i < kept_.size(); ++i) {
        if (kept_[i].bytes == bytes &&
            (found == kept_.size() || kept_[i].freed > kept_[found].freed)) {
          found = i;
        }
      }
      if (found < kept_.size()) {
        base = kept_[found].base;
        kept_[found] = kept_.back();
        kept_.pop_back();
        cached_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
      allocated_ += bytes;
      totals = {allocated_, cached_};
    }
    if (base == nullptr) {
      try {
        base = c10::alloc_cpu(bytes + kHeader);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        allocated_ -= bytes;
        throw;
      }
      std::memcpy(base, &bytes, sizeof(bytes));
    }
    void* data = static_cast<char*>(base) + kHeader;
    report(data, static_cast<int64_t>(bytes), totals);
    return {data, base, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::size_t limit() const { return limit_.load(std::memory_order_relaxed); }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputCacheStats s;
    s.limit_bytes = static_cast<int64_t>(limit());
    s.cached_bytes = static_cast<int64_t>(cached_);
    s.cached_blocks = static_cast<int64_t>(kept_.size());
    s.allocated_bytes = static_cast<int64_t>(allocated_);
    s.hits = hits_;
    s.misses = misses_;
    return s;
  }

  void set_limit(std::size_t bytes) {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!kCacheBuilt) bytes = 0;
      limit_.store(bytes, std::memory_order_relaxed);
      evict_to(bytes, &dropped);
    }
    for (void* p : dropped) c10::free_cpu(p);
  }

  void clear() {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_to(0, &dropped);
    }
    for (void* p : dropped) c10::free_cpu(p);
  }

  // In a child after fork(): another thread of the parent may have held the mutex, mid-update
  // of the list. The child starts with a fresh mutex and a fresh list, leaking the old one and
  // the parent's kept blocks (untouched in the child's copy of its memory, so they cost no
  // pages).
  void reset_after_fork() {
    new (&mutex_) std::mutex();
    new (&kept_) std::vector<Block>();
    cached_ = 0;
  }

 private:
  static void release(void* base) { instance().keep(base); }

  void keep(void* base) {
    std::size_t bytes = 0;
    std::memcpy(&bytes, base, sizeof(bytes));
    std::vector<void*> dropped;
    Totals totals;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocated_ -= bytes;
      const std::size_t limit = limit_.load(std::memory_order_relaxed);
      if (bytes <= limit) {
        evict_to(limit - bytes, &dropped);
        kept_.push_back({base, bytes, ++clock_});
        cached_ += bytes;
      } else {
        dropped.push_back(base);
      }
      totals = {allocated_, cached_};
    }
    report(static_cast<char*>(base) + kHeader, -static_cast<int64_t>(bytes), totals);
    for (void* p : dropped) c10::free_cpu(p);
  }

  // Drops the blocks freed longest ago until at most `bytes` are kept; mutex_ held.
  void evict_to(std::size_t bytes, std::vector<void*>* dropped) {
    while (cached_ > bytes) {
      std::size_t oldest = 0;
      for (std::size_t i = 1; i < kept_.size(); ++i) {
        if (kept_[i].freed < kept_[oldest].freed) oldest = i;
      }
      dropped->push_back(kept_[oldest].base);
      cached_ -= kept_[oldest].bytes;
      kept_[oldest] = kept_.back();
      kept_.pop_back();
    }
  }

  struct Totals {
    std::size_t allocated = 0, cached = 0;
  };

  static void report(void* data, int64_t delta, const Totals& t) {
    c10::reportMemoryUsageToProfiler(data, delta, t.allocated, t.allocated + t.cached,
                                     c10::Device(c10::DeviceType::CPU));
  }

 public:
  static OutputCache& instance() {
    // Never destroyed: tensors may die during static destruction, after a static would be.
    static OutputCache* cache = [] {
      auto* c = new OutputCache();
      pthread_atfork(nullptr, nullptr, [] { instance().reset_after_fork(); });
      return c;
    }();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> kept_;
  std::atomic<std::size_t> limit_{0};
  std::size_t cached_ = 0;
  std::size_t allocated_ = 0;
  uint64_t clock_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const auto bytes = static_cast<std::size_t>(numel) * options.dtype().itemsize();
  if (!options.device().is_cpu() || options.pinned_memory() || bytes < kMinCachedBytes ||
      OutputCache::instance().limit() == 0) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(
      sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::typeMetaToScalarType(options.dtype()), options.memory_format_opt());
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

void empty_output_cache() { OutputCache::instance().clear(); }

void set_output_cache_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "the output cache limit must be >= 0 bytes, got ", bytes);
  OutputCache::instance().set_limit(static_cast<std::size_t>(bytes));
}

}  // namespace mtlcore::cpu
