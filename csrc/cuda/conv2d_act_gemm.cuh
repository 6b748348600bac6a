// The tiled implicit GEMM behind mtlcore.conv2d_act's CUDA kernels (csrc/cuda/conv2d_act.cu).
//
// Problem. For each group z (blockIdx.z, with an optional split of the depth), a launch computes
//   C[row, col] = sum_{d in the block's depth range} A[row, d] * B[d, col]
// for row < m_size, col < col_size, d < depth_size. No operand exists in global memory as a
// matrix: a problem class `Gemm` (the forward, input-gradient and weight-gradient convolutions
// of conv2d_act.cu) says how to read one element of A and of B from the convolution's tensors
// and how to store one element of C. Its interface:
//   using Element = T;                         // storage dtype of A and B: __half,
//                                              // __nv_bfloat16, float or double
//   int64_t m_size, col_size, depth_size;      // per group
//   static constexpr bool kBLoadAlongCols;     // which way B is contiguous in memory
//   struct ColEntry, DepthEntry;               // plain aggregates, kept in shared memory
//   ColEntry col_entry(int64_t group, int64_t col) const;   // col < col_size
//   DepthEntry depth_entry(int64_t group, int64_t d) const; // d < depth_size
//   T a_at(int64_t row, const DepthEntry&) const;           // A[row, d]
//   T b_at(const DepthEntry&, const ColEntry&) const;       // B[d, col], zero for padding
//   void store(int64_t group_row, int64_t split, const ColEntry&, acc_t<T> value) const;
// where group_row = group * m_size + row. Index decomposition (divisions) happens once per
// column per block (the column table) and once per depth index per tile (the depth table);
// the per-element work is additions, bound checks and one load.
//
// Tiles. 256 threads per block own a kBM x kBN tile of C and walk the depth in steps of kBK,
// double-buffered in shared memory: while the tensor cores (or FMA units) multiply tile t,
// the global loads of tile t+1 are in flight in registers, then stored to the other buffer;
// one __syncthreads per step. Elements outside the matrix (rows >= m_size, cols >= col_size,
// depth >= the block's end) are stored as zeros, so partial tiles need no special case.
// Two tile maths:
//   - WmmaTileMath<T> (half, bfloat16, and float as TF32): 64 x 128 tile, 8 warps in 2 x 4,
//     each a 32 x 32 warp tile of 2 x 2 wmma 16x16 fragments with fp32 accumulators;
//     kBK = 32 (16-bit types, wmma k = 16) or 16 (TF32, wmma k = 8). The accumulators go
//     through shared memory (fp32) to the epilogue so each thread stores consecutive columns.
//   - SimtTileMath<T> (float without TF32, double): 64 x 64 tile, kBK = 16, each thread an
//     4 x 4 sub-tile (rows tm + 16 i, cols tn + 16 j) accumulated with FMA in T.
//
// Numerics. A and B enter the multiply in their storage dtype (TF32: rounded from float to
// nearest, ties away, by the wmma conversion); products are accumulated in fp32 (double for
// double) in a fixed order for a given shape, so results do not vary from run to run.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mtlcore's conv2d_act CUDA kernels need sm_80 or newer (bfloat16 and TF32 tensor cores)"
#endif

namespace mtlcore::cuda {

// The accumulation type of a storage type: double for double, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Conversions between a storage type and its accumulation type (round to nearest even).
template <typename T>
struct ElementTraits;

template <>
struct ElementTraits<float> {
  static __host__ __device__ __forceinline__ float to_acc(float v) { return v; }
  static __host__ __device__ __forceinline__ float from_acc(float v) { return v; }
  static __host__ __device__ __forceinline__ float zero() { return 0.0f; }
};

template <>
struct ElementTraits<double> {
  static __host__ __device__ __forceinline__ double to_acc(double v) { return v; }
  static __host__ __device__ __forceinline__ double from_acc(double v) { return v; }
  static __host__ __device__ __forceinline__ double zero() { return 0.0; }
};

template <>
struct ElementTraits<__half> {
  static __host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __host__ __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
  static __host__ __device__ __forceinline__ __half zero() { return __ushort_as_half(0); }
};

template <>
struct ElementTraits<__nv_bfloat16> {
  static __host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __host__ __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
  static __host__ __device__ __forceinline__ __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(0);
  }
};

// a * b + c with one rounding, whatever the contraction flags (host versions for tests that
// run the problem classes' index arithmetic on the host).
__host__ __device__ __forceinline__ float fused_multiply_add(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
__host__ __device__ __forceinline__ double fused_multiply_add(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

inline constexpr int kGemmThreads = 256;
inline constexpr int kGemmMinBlocksPerSm = 2;  // caps registers at 128 per thread

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// Tensor-core tile: wmma fragments, fp32 accumulators.
// ---------------------------------------------------------------------------------------

template <typename T>  // __half, __nv_bfloat16, or float (multiplied as TF32)
struct WmmaTileMath {
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  static constexpr int kBM = 64;
  static constexpr int kBN = 128;
  static constexpr int kBK = kTf32 ? 16 : 32;
  static constexpr int kFragK = kTf32 ? 8 : 16;  // wmma k of the element type
  static constexpr int kWarpsN = 4;              // warps laid out 2 (rows) x 4 (cols)
  static constexpr int kWarpTile = 32;           // each warp: 32 x 32 = 2 x 2 fragments
  // Row pitches padded by 16 bytes (fewer bank conflicts); every fragment pointer stays
  // 32-byte aligned and every pitch a multiple of 16 bytes, as wmma requires.
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kALd = kBK + kPad;  // A tile: [kBM][kALd], row-major
  static constexpr int kBLd = kBN + kPad;  // B tile: [kBK][kBLd], row-major
  static constexpr int kCLd = kBN + 4;     // C staging: [kBM][kCLd] floats
  static constexpr size_t kABytes = size_t{kBM} * kALd * sizeof(T);
  static constexpr size_t kBBytes = size_t{kBK} * kBLd * sizeof(T);
  static constexpr size_t kCBytes = size_t{kBM} * kCLd * sizeof(float);
  // Two A and two B buffers during the main loop; the C staging reuses them afterwards.
  static constexpr size_t kSmemBytes = std::max(2 * (kABytes + kBBytes), kCBytes);
  static_assert(kABytes % 32 == 0 && kBBytes % 32 == 0, "wmma needs 32-byte aligned tiles");
  static_assert((kALd * sizeof(T)) % 16 == 0 && (kBLd * sizeof(T)) % 16 == 0,
                "wmma needs 16-byte multiples as leading dimensions");

  using FragElement = std::conditional_t<kTf32, nvcuda::wmma::precision::tf32, T>;
  using AFragment = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kFragK, FragElement,
                                           nvcuda::wmma::row_major>;
  using BFragment = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kFragK, FragElement,
                                           nvcuda::wmma::row_major>;
  using CFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float>;

  unsigned char* smem;
  int warp_row;  // first tile row of this warp
  int warp_col;  // first tile column of this warp
  CFragment acc[2][2];

  __device__ WmmaTileMath(unsigned char* tile_smem, int tid)
      : smem(tile_smem),
        warp_row((tid / 32) / kWarpsN * kWarpTile),
        warp_col((tid / 32) % kWarpsN * kWarpTile) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }

  __device__ T* a_tile(int buf) const { return reinterpret_cast<T*>(smem + buf * kABytes); }
  __device__ T* b_tile(int buf) const {
    return reinterpret_cast<T*>(smem + 2 * kABytes + buf * kBBytes);
  }
  __device__ void store_a(int buf, int row, int d, T v) const { a_tile(buf)[row * kALd + d] = v; }
  __device__ void store_b(int buf, int d, int col, T v) const { b_tile(buf)[d * kBLd + col] = v; }

  template <typename Fragment>
  static __device__ void round_to_tf32(Fragment& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
  }

  __device__ void multiply(int buf) {
    const T* a = a_tile(buf);
    const T* b = b_tile(buf);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += kFragK) {
      AFragment a_frag[2];
      BFragment b_frag[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        nvcuda::wmma::load_matrix_sync(a_frag[i], a + (warp_row + 16 * i) * kALd + kk, kALd);
        round_to_tf32(a_frag[i]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::load_matrix_sync(b_frag[j], b + kk * kBLd + warp_col + 16 * j, kBLd);
        round_to_tf32(b_frag[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          nvcuda::wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
        }
      }
    }
  }

  // Stores the block's C tile through gemm.store. Called by all threads after the main loop's
  // last __syncthreads (the staging area overwrites the A/B buffers).
  template <class Gemm>
  __device__ void epilogue(const Gemm& gemm, const typename Gemm::ColEntry* col_table, int64_t row0,
                           int64_t col0, int64_t group, int64_t split, int tid) const {
    float* staging = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::store_matrix_sync(staging + (warp_row + 16 * i) * kCLd + warp_col + 16 * j,
                                        acc[i][j], kCLd, nvcuda::wmma::mem_row_major);
      }
    }
    __syncthreads();
    // Consecutive threads take consecutive columns (coalesced stores).
#pragma unroll 4
    for (int e = tid; e < kBM * kBN; e += kGemmThreads) {
      const int r = e / kBN;
      const int c = e % kBN;
      const int64_t row = row0 + r;
      const int64_t col = col0 + c;
      if (row < gemm.m_size && col < gemm.col_size) {
        gemm.store(group * gemm.m_size + row, split, col_table[c], staging[r * kCLd + c]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// CUDA-core tile: FMA in T (float or double).
// ---------------------------------------------------------------------------------------

template <typename T>  // float or double
struct SimtTileMath {
  static constexpr int kBM = 64;
  static constexpr int kBN = 64;
  static constexpr int kBK = 16;
  static constexpr int kPerThread = 4;  // 4 x 4 outputs per thread, 16 x 16 threads
  static constexpr int kThreadsN = kBN / kPerThread;
  static constexpr int kLd = kBM + 1;  // A stored transposed [kBK][kLd], B [kBK][kLd]
  static_assert(kBM == kBN, "A and B tiles share one pitch");
  static constexpr size_t kTileBytes = size_t{kBK} * kLd * sizeof(T);
  static constexpr size_t kSmemBytes = 4 * kTileBytes;  // two A and two B buffers

  unsigned char* smem;
  int thread_row;  // rows thread_row + 16 i
  int thread_col;  // cols thread_col + 16 j
  T acc[kPerThread][kPerThread];

  __device__ SimtTileMath(unsigned char* tile_smem, int tid)
      : smem(tile_smem), thread_row(tid / kThreadsN), thread_col(tid % kThreadsN) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] = T(0);
    }
  }

  __device__ T* a_tile(int buf) const { return reinterpret_cast<T*>(smem + buf * kTileBytes); }
  __device__ T* b_tile(int buf) const {
    return reinterpret_cast<T*>(smem + (2 + buf) * kTileBytes);
  }
  __device__ void store_a(int buf, int row, int d, T v) const { a_tile(buf)[d * kLd + row] = v; }
  __device__ void store_b(int buf, int d, int col, T v) const { b_tile(buf)[d * kLd + col] = v; }

  __device__ void multiply(int buf) {
    const T* a = a_tile(buf);
    const T* b = b_tile(buf);
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      T a_val[kPerThread];
      T b_val[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a_val[i] = a[kk * kLd + thread_row + kThreadsN * i];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b_val[j] = b[kk * kLd + thread_col + kThreadsN * j];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
          acc[i][j] = fused_multiply_add(a_val[i], b_val[j], acc[i][j]);
      }
    }
  }

  template <class Gemm>
  __device__ void epilogue(const Gemm& gemm, const typename Gemm::ColEntry* col_table, int64_t row0,
                           int64_t col0, int64_t group, int64_t split, int /*tid*/) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t row = row0 + thread_row + kThreadsN * i;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int c = thread_col + kThreadsN * j;
        if (row < gemm.m_size && col0 + c < gemm.col_size) {
          gemm.store(group * gemm.m_size + row, split, col_table[c], acc[i][j]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// The kernel: grid (col tiles, row tiles, groups * splits) of one launch, whose first row tile
// and first group are first_row_tile and first_group (see launch_implicit_gemm).
// ---------------------------------------------------------------------------------------

template <class Gemm, class Math>
__global__ void __launch_bounds__(kGemmThreads, kGemmMinBlocksPerSm)
    implicit_gemm_kernel(const Gemm gemm, int64_t splits, int64_t depth_chunk,
                         int64_t first_row_tile, int64_t first_group) {
  using T = typename Gemm::Element;
  using ColEntry = typename Gemm::ColEntry;
  using DepthEntry = typename Gemm::DepthEntry;
  constexpr int kBM = Math::kBM;
  constexpr int kBN = Math::kBN;
  constexpr int kBK = Math::kBK;
  constexpr int kAPerThread = kBM * kBK / kGemmThreads;
  constexpr int kBPerThread = kBK * kBN / kGemmThreads;
  static_assert(kAPerThread * kGemmThreads == kBM * kBK, "A tile must split evenly");
  static_assert(kBPerThread * kGemmThreads == kBK * kBN, "B tile must split evenly");
  static_assert(kBN <= kGemmThreads && kBK <= kGemmThreads, "one table entry per thread");

  __shared__ __align__(128) unsigned char tile_smem[Math::kSmemBytes];
  __shared__ ColEntry col_table[kBN];
  __shared__ DepthEntry depth_table[2][kBK];  // tile t uses depth_table[t & 1]

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t row0 = (first_row_tile + blockIdx.y) * kBM;
  const int64_t group = first_group + blockIdx.z / splits;
  const int64_t split = static_cast<int64_t>(blockIdx.z) % splits;
  const int64_t depth_begin = split * depth_chunk;
  const int64_t depth_end = min(gemm.depth_size, depth_begin + depth_chunk);
  const int64_t num_tiles = depth_end > depth_begin ? ceil_div(depth_end - depth_begin, kBK) : 0;

  auto fill_depth_table = [&](int buf, int64_t tile) {
    const int64_t d = depth_begin + tile * kBK + tid;
    if (tid < kBK && d < depth_end) depth_table[buf][tid] = gemm.depth_entry(group, d);
  };

  // The tile elements this thread loads. A: one depth index a_d and rows a_row + i * kARowStep,
  // so consecutive threads read consecutive depth. B along the columns: one column b_fixed and
  // depth indices b_first + i * kBStep; B along the depth: the depth index b_fixed (= a_d) and
  // columns b_first + i * kBStep. Either way consecutive threads read consecutive memory.
  constexpr bool kAlongCols = Gemm::kBLoadAlongCols;
  constexpr int kARowStep = kGemmThreads / kBK;
  constexpr int kBFixedExtent = kAlongCols ? kBN : kBK;
  constexpr int kBStep = kGemmThreads / kBFixedExtent;
  static_assert(kGemmThreads % kBK == 0 && kGemmThreads % kBN == 0, "threads must tile evenly");
  static_assert(kAPerThread * kARowStep == kBM, "A rows covered once");
  static_assert(kBPerThread * kBStep == (kAlongCols ? kBK : kBN), "B elements covered once");
  const int a_d = tid % kBK;
  const int a_row = tid / kBK;
  const int b_fixed = tid % kBFixedExtent;
  const int b_first = tid / kBFixedExtent;
  const int64_t rows_left = gemm.m_size - row0;
  const int64_t cols_left = gemm.col_size - col0;
  const bool b_col_ok = !kAlongCols || b_fixed < cols_left;
  ColEntry b_col_entry{};  // B along the columns: this thread's column, read once

  T a_regs[kAPerThread];
  T b_regs[kBPerThread];
  auto load_tile = [&](int64_t tile) {
    const int buf = static_cast<int>(tile & 1);
    const int64_t depth_left = depth_end - (depth_begin + tile * kBK);
    const bool a_depth_ok = a_d < depth_left;
    DepthEntry a_entry{};
    if (a_depth_ok) a_entry = depth_table[buf][a_d];
#pragma unroll
    for (int i = 0; i < kAPerThread; ++i) {
      const int r = a_row + i * kARowStep;
      a_regs[i] =
          a_depth_ok && r < rows_left ? gemm.a_at(row0 + r, a_entry) : ElementTraits<T>::zero();
    }
#pragma unroll
    for (int i = 0; i < kBPerThread; ++i) {
      if constexpr (kAlongCols) {
        const int d = b_first + i * kBStep;
        b_regs[i] = b_col_ok && d < depth_left ? gemm.b_at(depth_table[buf][d], b_col_entry)
                                               : ElementTraits<T>::zero();
      } else {
        const int c = b_first + i * kBStep;
        b_regs[i] = a_depth_ok && c < cols_left ? gemm.b_at(a_entry, col_table[c])
                                                : ElementTraits<T>::zero();
      }
    }
  };
  Math math(tile_smem, tid);
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < kAPerThread; ++i) math.store_a(buf, a_row + i * kARowStep, a_d, a_regs[i]);
#pragma unroll
    for (int i = 0; i < kBPerThread; ++i) {
      if constexpr (kAlongCols) {
        math.store_b(buf, b_first + i * kBStep, b_fixed, b_regs[i]);
      } else {
        math.store_b(buf, b_fixed, b_first + i * kBStep, b_regs[i]);
      }
    }
  };

  if (tid < kBN && col0 + tid < gemm.col_size) {
    col_table[tid] = gemm.col_entry(group, col0 + tid);
  }
  fill_depth_table(0, 0);
  __syncthreads();
  if (kAlongCols && b_col_ok) b_col_entry = col_table[b_fixed];
  if (num_tiles > 0) {
    load_tile(0);
    store_tile(0);
    if (num_tiles > 1) fill_depth_table(1, 1);
  }
  __syncthreads();

  for (int64_t t = 0; t < num_tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < num_tiles) load_tile(t + 1);  // global loads in flight during the multiply
    math.multiply(cur);
    if (t + 1 < num_tiles) store_tile(cur ^ 1);
    // depth_table[cur] was last read by load_tile(t), before the previous __syncthreads.
    if (t + 2 < num_tiles) fill_depth_table(cur, t + 2);
    __syncthreads();
  }

  math.epilogue(gemm, col_table, row0, col0, group, split, tid);
}

// Launches the kernel for `groups` groups, each with its depth cut into `splits` ranges of
// depth_chunk (a multiple of Math::kBK; every range non-empty). gridDim.y and gridDim.z are at
// most 65535, so a problem with more row tiles, or more groups * splits, than that is covered by
// several launches, each over a contiguous range of row tiles and of groups (every output
// element is still computed by exactly one block, in the same order). `op` names the op in
// errors.
template <class Math, class Gemm>
void launch_implicit_gemm(const char* op, const Gemm& gemm, int64_t groups, int64_t splits,
                          int64_t depth_chunk, cudaStream_t stream) {
  constexpr int64_t kMaxGridYZ = 65535;
  if (gemm.m_size == 0 || gemm.col_size == 0 || groups == 0) return;
  const int64_t col_tiles = ceil_div(gemm.col_size, Math::kBN);
  const int64_t row_tiles = ceil_div(gemm.m_size, Math::kBM);
  TORCH_CHECK_VALUE(col_tiles <= INT32_MAX, op, ": problem too large for the CUDA kernel (",
                    gemm.col_size, " GEMM columns, at most ", int64_t{INT32_MAX} * Math::kBN, ")");
  TORCH_INTERNAL_ASSERT(splits >= 1 && splits <= kMaxGridYZ, op, ": bad depth split ", splits);
  const int64_t groups_per_launch = kMaxGridYZ / splits;
  for (int64_t g0 = 0; g0 < groups; g0 += groups_per_launch) {
    const int64_t launch_groups = std::min(groups_per_launch, groups - g0);
    for (int64_t r0 = 0; r0 < row_tiles; r0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned>(col_tiles),
                      static_cast<unsigned>(std::min(kMaxGridYZ, row_tiles - r0)),
                      static_cast<unsigned>(launch_groups * splits));
      // A host program (tests/host/conv2d_act_host.cpp) defines MTLCORE_HOST_LAUNCH to run
      // the blocks on the host instead. (clang-format would split the launch's >>> in a
      // preprocessor branch.)
      // clang-format off
#ifdef MTLCORE_HOST_LAUNCH
      MTLCORE_HOST_LAUNCH(grid, kGemmThreads, (implicit_gemm_kernel<Gemm, Math>), gemm, splits,
                          depth_chunk, r0, g0);
#else
      implicit_gemm_kernel<Gemm, Math>
          <<<grid, kGemmThreads, 0, stream>>>(gemm, splits, depth_chunk, r0, g0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
      // clang-format on
    }
  }
}

}  // namespace mtlcore::cuda
