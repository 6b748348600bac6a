// Host run of csrc/cuda/multi_tensor_apply.cuh (built by tests/test_cuda_host.py with nvcc as a
// host program): packs random lists of groups with mta_pack, then for every launch, every block
// and every one of the kMtaThreads threads in turn calls mta_chunk and mta_for_each through a
// counting functor, the way mta_kernel does on a device. Checks the launches' metadata (block
// counts, group capacity, extra pointers), that every element of every group is visited exactly
// once, that arrays outside kRead reach the functor as zero, that arrays outside kWrite and the
// guard elements around each array are never written; on both the 16-byte vector path
// (aligned arrays) and the scalar path (storage offsets that misalign a chunk).
//
// Prints one line per configuration and "mta host: ok" at the end; exits 1 on the first
// failing configuration (an access far out of bounds may crash it instead: also a failure).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "host_check.h"

using mtlcore::cuda::kMtaChunk;
using mtlcore::cuda::kMtaMaxBlocks;
using mtlcore::cuda::kMtaThreads;
using mtlcore::cuda::mta_chunk;
using mtlcore::cuda::mta_for_each;
using mtlcore::cuda::mta_pack;
using mtlcore::cuda::MtaChunk;
using mtlcore::cuda::MtaMeta;
using mtlcore::cuda::MtaTensor;

using host_check::fail;

namespace {

constexpr int kGuard = 16;         // guard elements before and after each array
constexpr float kSentinel = -3;    // value of the guard elements
constexpr float kUnreadSeen = -7;  // written where an array outside kRead reached f nonzero

// Array 0: read only. Array 1: read and written, x1 += x0 + 1 (so a second visit shows). Arrays
// 2..D-1: written only, x_d = x0 + d (they must arrive as zero).
template <typename scalar_t, int D>
struct CountOp {
  static constexpr unsigned kRead = 0b11u;
  static constexpr unsigned kWrite = ((1u << D) - 1u) & ~1u;
  MTLCORE_HD void operator()(const MtaChunk<scalar_t, D>& c, int tid) const {
    using T = at::opmath_type<scalar_t>;
    mta_for_each<kRead, kWrite>(c, tid, [](T(&x)[D]) {
      x[1] = x[1] + x[0] + T(1);
      for (int d = 2; d < D; ++d) x[d] = x[d] == T(0) ? x[0] + T(d) : T(kUnreadSeen);
    });
  }
};

float value0(int64_t i) { return static_cast<float>(i % 61); }
float value1(int64_t i) { return static_cast<float>(i % 7); }

template <typename scalar_t, int D>
void run_config(std::mt19937_64& rng, int groups, int64_t max_blocks, const char* name) {
  // Sizes: empty, tiny, around the vector width and the chunk size, and larger.
  const int64_t special[] = {0,
                             1,
                             2,
                             3,
                             7,
                             8,
                             9,
                             15,
                             17,
                             511,
                             513,
                             4095,
                             4097,
                             kMtaChunk - 1,
                             kMtaChunk,
                             kMtaChunk + 1,
                             3 * kMtaChunk + 5};
  std::vector<int64_t> numel(groups);
  for (int g = 0; g < groups; ++g) {
    const int pick = static_cast<int>(rng() % 4);
    numel[g] = pick == 0   ? special[rng() % (sizeof(special) / sizeof(special[0]))]
               : pick == 1 ? static_cast<int64_t>(rng() % 40)
                           : static_cast<int64_t>(rng() % 150000);
  }
  // Each array lives in a buffer of its own: kGuard elements, then 0..7 elements of offset (a
  // nonzero one misaligns the array for 16-byte vectors), the array, kGuard more.
  std::vector<std::vector<scalar_t>> buffers(static_cast<size_t>(groups) * D);
  std::vector<int64_t> offsets(buffers.size());
  std::vector<MtaTensor<D>> tensors(groups);
  std::vector<int> record(groups);  // the groups' extra pointers point here
  for (int g = 0; g < groups; ++g) {
    for (int d = 0; d < D; ++d) {
      const size_t k = static_cast<size_t>(g) * D + d;
      offsets[k] = rng() % 3 == 0 ? static_cast<int64_t>(rng() % 8) : 0;
      std::vector<scalar_t>& buf = buffers[k];
      buf.assign(static_cast<size_t>(2 * kGuard + offsets[k] + numel[g]), scalar_t(kSentinel));
      scalar_t* a = buf.data() + kGuard + offsets[k];
      for (int64_t i = 0; i < numel[g]; ++i) {
        a[i] = scalar_t(d == 0 ? value0(i) : d == 1 ? value1(i) : 0.0f);
      }
      tensors[g].ptr[d] = a;
    }
    tensors[g].numel = numel[g];
    tensors[g].extra = &record[g];
    tensors[g].extra_tag = static_cast<uint8_t>(g % 251);
  }

  int launches = 0;
  const CountOp<scalar_t, D> op;
  mta_pack<D>(tensors, sizeof(scalar_t), max_blocks, [&](const MtaMeta<D>& meta, int64_t blocks) {
    ++launches;
    if (meta.num_tensors < 1 || meta.num_tensors > MtaMeta<D>::kMaxTensors) {
      fail("launch with " + std::to_string(meta.num_tensors) + " groups");
    }
    if (blocks < 1 || blocks > max_blocks || meta.block_end[meta.num_tensors - 1] != blocks) {
      fail("launch of " + std::to_string(blocks) + " blocks, block_end " +
           std::to_string(meta.block_end[meta.num_tensors - 1]));
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const MtaChunk<scalar_t, D> c = mta_chunk<scalar_t, D>(meta, b);
      if (c.n < 1 || c.n > kMtaChunk) fail("chunk of " + std::to_string(c.n) + " elements");
      const int g = static_cast<int>(static_cast<const int*>(c.extra) - record.data());
      if (g < 0 || g >= groups || c.extra_tag != g % 251 || c.slot >= meta.num_tensors) {
        fail("block " + std::to_string(b) + ": wrong extra pointer, tag or slot");
      }
      for (int tid = 0; tid < kMtaThreads; ++tid) op(c, tid);
    }
  });

  int64_t elements = 0;
  for (int g = 0; g < groups; ++g) {
    elements += numel[g];
    for (int d = 0; d < D; ++d) {
      const size_t k = static_cast<size_t>(g) * D + d;
      const std::vector<scalar_t>& buf = buffers[k];
      const int64_t first = kGuard + offsets[k];
      for (int64_t j = 0; j < static_cast<int64_t>(buf.size()); ++j) {
        const int64_t i = j - first;
        float want = kSentinel;
        if (i >= 0 && i < numel[g]) {
          want = d == 0 ? value0(i) : d == 1 ? value1(i) + value0(i) + 1 : value0(i) + d;
        }
        const float got = static_cast<float>(buf[j]);
        if (got != want) {
          fail("group " + std::to_string(g) + " (" + std::to_string(numel[g]) +
               " elements, offset " + std::to_string(offsets[k]) + ") array " + std::to_string(d) +
               " index " + std::to_string(i) + ": " + std::to_string(got) + " instead of " +
               std::to_string(want));
        }
      }
    }
  }
  std::printf("%-9s D=%d groups %3d max_blocks %6lld: %d launches, %lld elements\n", name, D,
              groups, static_cast<long long>(max_blocks), launches,
              static_cast<long long>(elements));
}

template <typename scalar_t, int D>
void run_all(std::mt19937_64& rng, const char* name) {
  // Few groups in one launch; more groups than one launch's metadata holds; groups split
  // across launches by a small block budget.
  run_config<scalar_t, D>(rng, 5, kMtaMaxBlocks, name);
  run_config<scalar_t, D>(rng, MtaMeta<D>::kMaxTensors + 7, kMtaMaxBlocks, name);
  run_config<scalar_t, D>(rng, 20, 3, name);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261130);
  return host_check::run_checks("mta", [&] {
    run_all<float, 2>(rng, "float");
    run_all<float, 5>(rng, "float");
    run_all<double, 3>(rng, "double");
    run_all<double, 5>(rng, "double");
    run_all<c10::Half, 4>(rng, "half");
    run_all<c10::BFloat16, 3>(rng, "bfloat16");
  });
}
