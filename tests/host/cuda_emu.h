// A host emulation of the little of CUDA that mtlcore's convolution and loss kernels use, so
// that a host compiler can run the unmodified kernel code (csrc/cuda/conv2d_act_gemm.cuh,
// conv2d_act_problems.cuh and multitask_loss_kernels.cuh): include this first, then the
// kernel headers, in a program built with g++ (tests/test_cuda_host.py).
//
// A launch (emu::launch; MTLCORE_HOST_LAUNCH, which the conv header's launcher calls when it
// is defined) runs the grid's blocks one after another; a block's threads run as std::threads
// (kept for the next block) with a std::barrier for __syncthreads. __shared__ variables become
// function-local statics: shared by the threads of the running block, as on a device. nvcuda::wmma
// is modelled with each thread holding its warp's whole fragment (the layout inside a fragment is
// opaque to the kernel), products summed in float; load/store abort on a pointer that is not
// 32-byte aligned or a leading dimension that is not a multiple of 16 bytes, as wmma requires.
// Full-warp shuffles (__shfl_down_sync, __shfl_sync) exchange through the warp's slots. A launch
// aborts on a grid beyond CUDA's limits, a block that does not finish (a barrier or shuffle that
// not every thread reaches) after 60 s instead of hanging. A failed CUDA_KERNEL_ASSERT is counted
// in emu::device_asserts (a device would report it at the next synchronisation) and the thread
// goes on. Not modelled: partial-warp masks, atomics, streams.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Before the redefinition of CUDA_KERNEL_ASSERT below (its include guard keeps it).
#include <c10/macros/Macros.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

namespace emu {

inline int64_t blocks_run = 0;
inline std::atomic<int64_t> device_asserts{0};

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}

// One warp's shuffle exchange: each lane's value, and the warp's barrier.
struct Warp {
  std::barrier<> barrier{32};
  uint64_t slot[32] = {};
};

// The threads of one block, kept between blocks and launches: each waits for a block, runs
// the job and counts itself done. `sync` is the block's __syncthreads barrier. A block whose
// threads do not all finish within 60 s (a __syncthreads or a shuffle that not every thread
// reaches: undefined behaviour on a device, a hang here) aborts the program.
class BlockThreads {
 public:
  explicit BlockThreads(int threads)
      : threads_(threads), start_(threads + 1), sync(threads), warps(threads / 32) {
    if (threads % 32 != 0) die("blocks of a multiple of 32 threads only");
    for (int t = 0; t < threads; ++t) {
      workers_.emplace_back([this, t] {
        threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
        for (;;) {
          start_.arrive_and_wait();
          if (stop_) return;
          (*job_)();
          const std::lock_guard<std::mutex> lock(mutex_);
          if (++finished_ == threads_) all_finished_.notify_one();
        }
      });
    }
  }
  ~BlockThreads() {
    stop_ = true;
    start_.arrive_and_wait();
    for (std::thread& w : workers_) w.join();
  }
  // Runs job on every thread of the block; returns when all are done.
  void run(const std::function<void()>& job) {
    job_ = &job;
    finished_ = 0;
    start_.arrive_and_wait();
    std::unique_lock<std::mutex> lock(mutex_);
    if (!all_finished_.wait_for(lock, std::chrono::seconds(60),
                                [&] { return finished_ == threads_; })) {
      die("a block did not finish: a __syncthreads or shuffle not every thread reaches?");
    }
  }

 private:
  const int threads_;
  std::barrier<> start_;
  std::vector<std::thread> workers_;
  const std::function<void()>* job_ = nullptr;
  bool stop_ = false;
  std::mutex mutex_;
  std::condition_variable all_finished_;
  int finished_ = 0;

 public:
  std::barrier<> sync;
  std::vector<Warp> warps;
};

inline BlockThreads* current_block = nullptr;

inline BlockThreads& block_threads(int threads) {
  static std::map<int, std::unique_ptr<BlockThreads>> pools;
  std::unique_ptr<BlockThreads>& pool = pools[threads];
  if (!pool) pool = std::make_unique<BlockThreads>(threads);
  return *pool;
}

// Runs kernel(args...) as a CUDA launch of `grid` blocks of `threads` threads.
template <class Kernel, class... Args>
void launch(dim3 grid, int threads, Kernel kernel, const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u ||
      grid.z > 65535u || threads < 1 || threads > 1024) {
    die("launch configuration beyond CUDA's limits");
  }
  gridDim = grid;
  blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  BlockThreads& block = block_threads(threads);
  current_block = &block;
  const std::function<void()> job = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = make_uint3(x, y, z);
        block.run(job);
        ++blocks_run;
      }
    }
  }
}

}  // namespace emu

#define MTLCORE_HOST_LAUNCH(grid, threads, kernel, ...) \
  ::emu::launch(grid, threads, kernel, __VA_ARGS__)

inline void __syncthreads() { emu::current_block->sync.arrive_and_wait(); }

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                     \
  do {                                               \
    if (!(cond)) ::emu::device_asserts.fetch_add(1); \
  } while (0)

namespace emu {

// value of lane `source(lane)` of this thread's warp; every lane of the warp must take part.
template <class T, class Source>
T shuffle(unsigned mask, T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) die("only full-warp shuffles are modelled");
  Warp& warp = current_block->warps[threadIdx.x / 32];
  const int lane = static_cast<int>(threadIdx.x % 32);
  std::memcpy(&warp.slot[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result = value;
  const int from = source(lane);
  if (from >= 0) std::memcpy(&result, &warp.slot[from], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

}  // namespace emu

template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return emu::shuffle(mask, value, [delta](int lane) {
    return lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : -1;
  });
}

template <class T>
T __shfl_sync(unsigned mask, T value, int source_lane) {
  return emu::shuffle(mask, value, [source_lane](int) { return source_lane & 31; });
}

template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  typename storage<T>::type x[rows * cols];
};

// Rounds to TF32 (10 mantissa bits), ties away from zero; inf and NaN unchanged.
inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void check_operand(const void* p, unsigned ldm, size_t elem_size) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem_size) % 16 != 0) {
    emu::die("wmma operand not 32-byte aligned or leading dimension not a multiple of 16 bytes");
  }
}

template <class F, class V>
void fill_fragment(F& f, V v) {
  for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}

template <class F, class P>
void load_matrix_sync(F& f, const P* p, unsigned ldm) {
  check_operand(p, ldm, sizeof(P));
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = p[static_cast<size_t>(r) * ldm + c];
  }
}

// Every lane holds the whole tile: lane 0 stores it.
template <class F>
void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm, sizeof(float));
  if (layout != mem_row_major) emu::die("only mem_row_major stores are modelled");
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) p[static_cast<size_t>(r) * ldm + c] = f.x[r * F::cols + c];
  }
}

template <class D, class A, class B, class C>
void mma_sync(D& d, const A& a, const B& b, const C& c) {
  constexpr int kM = A::rows, kK = A::cols, kN = B::cols;
  float out[kM * kN];
  for (int i = 0; i < kM; ++i) {
    for (int j = 0; j < kN; ++j) {
      float s = c.x[i * kN + j];
      for (int k = 0; k < kK; ++k) s += to_float(a.x[i * kK + k]) * to_float(b.x[k * kN + j]);
      out[i * kN + j] = s;
    }
  }
  for (int i = 0; i < kM * kN; ++i) d.x[i] = out[i];
}

}  // namespace nvcuda::wmma
