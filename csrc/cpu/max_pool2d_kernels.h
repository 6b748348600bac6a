// Loops of mtlcore.max_pool2d on the CPU, one table per instruction set.
//
// max_pool2d_kernels.cpp is compiled once per ISA (base, avx2, avx512) into namespace
// mtlcore::cpu::<isa>; csrc/cpu/max_pool2d.cpp checks arguments, allocates, splits the work
// over threads and calls these functions, each of which runs on one thread over a range of
// work units.
#pragma once

#include <cstdint>

namespace mtlcore::cpu {

// Channels of one work unit of the channels_last backward.
inline constexpr int64_t kPoolChannelBlock = 64;

// One call's problem (sizes as in common/max_pool2d_args.h) and its tensors. x: input, read
// through xs (strides of N, C, H, W); out: output (forward) or grad_input (backward), new
// tensors of the layout the op chose (contiguous NCHW, or channels_last with xs[1] == 1);
// go: grad_output, read through gs.
struct PoolJob {
  const void* x;
  const void* go;
  void* out;
  int64_t n, c, h, w, oh, ow;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t xs[4];
  int64_t gs[4];
};

// Runs units [begin, end) of a job. Units: forward NCHW and backward NCHW: planes (n, c) of
// N * C; forward channels_last: output rows (n, oh) of N * OH; backward channels_last:
// (n, block of kPoolChannelBlock channels).
using PoolLoop = void (*)(const PoolJob& job, int64_t begin, int64_t end);

// Loops by dtype: float, double, half, bfloat16.
struct MaxPoolLoops {
  PoolLoop forward_nchw[4];
  PoolLoop forward_cl[4];
  PoolLoop backward_nchw[4];
  PoolLoop backward_cl[4];
};

namespace base {
extern const MaxPoolLoops max_pool_loops;
}
namespace avx2 {
extern const MaxPoolLoops max_pool_loops;
}
namespace avx512 {
extern const MaxPoolLoops max_pool_loops;
}

}  // namespace mtlcore::cpu
