// Multi-tensor apply: one CUDA launch updates many tensors (the optimizer's parameter groups).
//
// Data layout. The caller describes each group (one index i of the op's parallel lists) as D
// dense arrays of one dtype with a common element count (params[i], grads[i], states[i]...)
// plus an optional per-group "extra" pointer and tag (Adam's step counter and its dtype). A
// launch's metadata, MtaMeta<D>, is a by-value __grid_constant__ kernel argument of at most
// kMtaMetaBytes (3 KB, inside the classic 4 KB parameter limit, with room for the functor):
// per group the D base pointers, the element count, the extra pointer/tag and the running
// total of blocks (block_end). Its capacity kMaxTensors is derived from D.
//
// Parallel split. Each group is cut into chunks of kMtaChunk elements and every CUDA block
// owns exactly one (group, chunk) pair: block b finds its group by a binary search of
// block_end (an inclusive prefix sum of chunk counts), so the block count costs no metadata.
// The kMtaThreads threads of a block stride over the chunk's elements. A launch is issued when
// the metadata holds kMaxTensors groups or kMtaMaxBlocks chunks (2^31 elements); a group that
// does not fit is split across launches by advancing its pointers (64-bit element offsets).
// Groups of any size are supported; a chunk itself always has <= kMtaChunk elements, so
// in-chunk indices are 32-bit.
//
// Memory access. mta_for_each() walks a chunk with 16-byte vector loads/stores (4 floats,
// 8 halves/bfloat16, 2 doubles) when every used pointer of the chunk is 16-byte aligned, each
// thread keeping 8 elements (2 to 4 for double) of each array in flight, plus a scalar tail;
// misaligned chunks (views with odd storage offsets) take a scalar path with up to 4
// elements per array in flight. Loads convert to the op-math type (float for float, half and
// bfloat16; double for double) and stores convert back (round to nearest even).
//
// The functor is called once per block as op(chunk, threadIdx.x) with chunk = the D chunk
// pointers, the element count, the group's slot in the launch and its extra pointer/tag. The
// functors and mta_for_each() are __host__ __device__ so their index arithmetic can be
// exercised on the host by running every (block, thread) in turn. Kernels use raw pointers
// only; launches go to the current CUDA stream of the current device (callers hold a
// c10::cuda::CUDAGuard on the tensors' device).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#define MTLCORE_HD __host__ __device__ __forceinline__

namespace mtlcore::cuda {

inline constexpr int kMtaThreads = 512;            // threads per block
inline constexpr int64_t kMtaChunk = 65536;        // elements per block
inline constexpr int64_t kMtaMaxBlocks = 1 << 15;  // blocks (chunks) per launch
inline constexpr size_t kMtaMetaBytes = 3072;      // bound on sizeof(MtaMeta<D>)
inline constexpr int kMtaVecBytes = 16;            // vector access width
inline constexpr int kMtaMinBlocksPerSm = 2;       // occupancy floor (caps registers at 64)

// Groups per launch for D arrays: pointers (8 D) + count (8) + extra (8) + block_end (4) +
// tag (1) bytes per group, 16 bytes kept for num_tensors and padding.
constexpr int mta_max_tensors(int depth) {
  return static_cast<int>((kMtaMetaBytes - 16) / (8 * static_cast<size_t>(depth) + 21));
}

// 16-byte vectors per array that a thread keeps in flight, within the 64-register budget
// of kMtaMinBlocksPerSm: 8 elements of float, half and bfloat16; 4 of double with up to 3
// arrays, 2 with more. ptxas -v (sm_90): no spills, except a few bytes (at most 12 stored,
// 28 loaded per thread) in three Adam kernels that unscale by grad_scale: bfloat16 with 4
// arrays, bfloat16 and float with 5 (amsgrad).
constexpr int mta_vecs_per_thread(size_t elem_size, int depth) {
  return elem_size == 4 || (elem_size == 8 && depth <= 3) ? 2 : 1;
}
// Elements per array that a thread keeps in flight on the scalar path (misaligned chunks).
constexpr int mta_scalar_ilp(size_t elem_size, int depth) {
  if (elem_size == 8 && depth >= 5) return 1;
  const int n = mta_vecs_per_thread(elem_size, depth) * kMtaVecBytes / static_cast<int>(elem_size);
  return n < 4 ? n : 4;
}

template <int D>
struct MtaMeta {
  static constexpr int kMaxTensors = mta_max_tensors(D);
  void* ptr[D][kMaxTensors];       // first element of this launch's part of each group
  int64_t numel[kMaxTensors];      // elements of that part
  const void* extra[kMaxTensors];  // per-group extra pointer (may be null)
  int32_t block_end[kMaxTensors];  // blocks of groups 0..t together (inclusive prefix sum)
  uint8_t extra_tag[kMaxTensors];  // per-group tag describing *extra
  int32_t num_tensors;
};

// One group as the caller describes it.
template <int D>
struct MtaTensor {
  void* ptr[D];
  int64_t numel;
  const void* extra;
  uint8_t extra_tag;
};

// What one block works on.
template <typename scalar_t, int D>
struct MtaChunk {
  scalar_t* ptr[D];   // first element of the chunk in each array
  int n;              // elements in the chunk, 1..kMtaChunk
  int slot;           // the group's index within this launch
  const void* extra;  // the group's extra pointer and tag
  uint8_t extra_tag;
};

// The chunk of block `block` of a launch.
template <typename scalar_t, int D>
MTLCORE_HD MtaChunk<scalar_t, D> mta_chunk(const MtaMeta<D>& meta, int64_t block) {
  int lo = 0;
  int hi = meta.num_tensors - 1;
  while (lo < hi) {  // first slot whose block_end exceeds block
    const int mid = (lo + hi) >> 1;
    if (block < meta.block_end[mid]) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t first_block = lo == 0 ? 0 : meta.block_end[lo - 1];
  const int64_t start = (block - first_block) * kMtaChunk;
  const int64_t left = meta.numel[lo] - start;
  MtaChunk<scalar_t, D> c;
#pragma unroll
  for (int d = 0; d < D; ++d) c.ptr[d] = static_cast<scalar_t*>(meta.ptr[d][lo]) + start;
  c.n = static_cast<int>(left < kMtaChunk ? left : kMtaChunk);
  c.slot = lo;
  c.extra = meta.extra[lo];
  c.extra_tag = meta.extra_tag[lo];
  return c;
}

template <typename scalar_t, int V>
struct alignas(kMtaVecBytes) MtaVec {
  scalar_t v[V];
};

// Applies f to every element of the chunk; this thread's share is elements tid, tid +
// kMtaThreads, ... (in vectors when aligned). f(x) receives x[d] = element of array d in the
// op-math type (zero for arrays not in kRead) and updates x in place; arrays in kWrite are
// stored back. Bit d of kRead / kWrite stands for array d.
template <unsigned kRead, unsigned kWrite, typename scalar_t, int D, typename F>
MTLCORE_HD void mta_for_each(const MtaChunk<scalar_t, D>& c, int tid, const F& f) {
  using T = at::opmath_type<scalar_t>;
  constexpr int V = kMtaVecBytes / static_cast<int>(sizeof(scalar_t));
  constexpr int U = mta_vecs_per_thread(sizeof(scalar_t), D);
  constexpr int kIlp = mta_scalar_ilp(sizeof(scalar_t), D);
  constexpr unsigned kUsed = kRead | kWrite;
  static_assert(V * sizeof(scalar_t) == kMtaVecBytes, "element size must divide 16 bytes");
  static_assert(kMtaChunk % V == 0, "chunks must start on vector boundaries");
  using Vec = MtaVec<scalar_t, V>;

  bool aligned = true;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if ((kUsed >> d) & 1u) {
      aligned = aligned && reinterpret_cast<uintptr_t>(c.ptr[d]) % kMtaVecBytes == 0;
    }
  }

  int scalar_begin = 0;
  if (aligned) {
    const int nvec = c.n / V;
    for (int base = 0; base < nvec; base += kMtaThreads * U) {
      Vec r[D][U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * kMtaThreads + tid;
        if (i < nvec) {
#pragma unroll
          for (int d = 0; d < D; ++d) {
            if ((kRead >> d) & 1u) r[d][u] = reinterpret_cast<const Vec*>(c.ptr[d])[i];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * kMtaThreads + tid;
        if (i < nvec) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            T x[D];
#pragma unroll
            for (int d = 0; d < D; ++d) {
              x[d] = ((kRead >> d) & 1u) ? static_cast<T>(r[d][u].v[e]) : T(0);
            }
            f(x);
#pragma unroll
            for (int d = 0; d < D; ++d) {
              if ((kWrite >> d) & 1u) r[d][u].v[e] = static_cast<scalar_t>(x[d]);
            }
          }
#pragma unroll
          for (int d = 0; d < D; ++d) {
            if ((kWrite >> d) & 1u) reinterpret_cast<Vec*>(c.ptr[d])[i] = r[d][u];
          }
        }
      }
    }
    scalar_begin = nvec * V;
  }

  // Scalar path: the whole chunk when misaligned, else the tail of fewer than V elements.
  for (int base = scalar_begin; base < c.n; base += kMtaThreads * kIlp) {
    T x[kIlp][D];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + k * kMtaThreads + tid;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        x[k][d] = (((kRead >> d) & 1u) && i < c.n) ? static_cast<T>(c.ptr[d][i]) : T(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + k * kMtaThreads + tid;
      if (i < c.n) {
        f(x[k]);
#pragma unroll
        for (int d = 0; d < D; ++d) {
          if ((kWrite >> d) & 1u) c.ptr[d][i] = static_cast<scalar_t>(x[k][d]);
        }
      }
    }
  }
}

template <typename scalar_t, int D, typename Op>
__global__ void __launch_bounds__(kMtaThreads, kMtaMinBlocksPerSm)
    mta_kernel(const __grid_constant__ MtaMeta<D> meta, const __grid_constant__ Op op) {
  const MtaChunk<scalar_t, D> c = mta_chunk<scalar_t, D>(meta, blockIdx.x);
  op(c, static_cast<int>(threadIdx.x));
}

// Packs the groups into launches of at most max_blocks chunks and MtaMeta<D>::kMaxTensors
// groups and calls launch(meta, blocks) for each. Groups with no elements are skipped.
template <int D, typename Launch>
void mta_pack(const std::vector<MtaTensor<D>>& tensors, size_t elem_size, int64_t max_blocks,
              Launch&& launch) {
  TORCH_INTERNAL_ASSERT(max_blocks >= 1 && max_blocks <= INT32_MAX);
  MtaMeta<D> meta{};
  int nt = 0;
  int64_t blocks = 0;
  for (const MtaTensor<D>& t : tensors) {
    int64_t done = 0;
    while (done < t.numel) {
      const int64_t chunks = (t.numel - done + kMtaChunk - 1) / kMtaChunk;
      const int64_t take = std::min(chunks, max_blocks - blocks);  // >= 1
      const int64_t count = std::min(take * kMtaChunk, t.numel - done);
      for (int d = 0; d < D; ++d) {
        meta.ptr[d][nt] = static_cast<char*>(t.ptr[d]) + done * static_cast<int64_t>(elem_size);
      }
      meta.numel[nt] = count;
      meta.extra[nt] = t.extra;
      meta.extra_tag[nt] = t.extra_tag;
      blocks += take;
      meta.block_end[nt] = static_cast<int32_t>(blocks);
      ++nt;
      done += count;
      if (nt == MtaMeta<D>::kMaxTensors || blocks == max_blocks) {
        meta.num_tensors = nt;
        launch(static_cast<const MtaMeta<D>&>(meta), blocks);
        nt = 0;
        blocks = 0;
      }
    }
  }
  if (nt > 0) {
    meta.num_tensors = nt;
    launch(static_cast<const MtaMeta<D>&>(meta), blocks);
  }
}

// Runs op over all groups (arrays of scalar_t) on the current device's current stream.
template <typename scalar_t, int D, typename Op>
void multi_tensor_apply(const std::vector<MtaTensor<D>>& tensors, const Op& op) {
  static_assert(sizeof(MtaMeta<D>) <= kMtaMetaBytes, "multi-tensor metadata too large");
  static_assert(sizeof(MtaMeta<D>) + sizeof(Op) <= 4000, "kernel arguments exceed 4 KB");
  if (tensors.empty()) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  mta_pack<D>(tensors, sizeof(scalar_t), kMtaMaxBlocks,
              [&](const MtaMeta<D>& meta, int64_t blocks) {
                mta_kernel<scalar_t, D, Op>
                    <<<static_cast<unsigned>(blocks), kMtaThreads, 0, stream>>>(meta, op);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
}

}  // namespace mtlcore::cuda
