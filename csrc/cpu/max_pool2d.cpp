// mtlcore.max_pool2d on the CPU: argument checks, allocation and the parallel split; the loops
// are in max_pool2d_kernels.cpp (compiled per ISA, chosen at run time).
//
// Layout: see common/max_pool2d_args.h (NCHW read through strides, or channels_last).
// Parallel split: one at::parallel_for over the work units of max_pool2d_kernels.h (planes,
//   output rows or channel blocks of an image), at least kMinWork elements per thread. Every
//   output element is written by one unit and every sum runs inside one unit, so results are
//   bitwise the same for any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cpu_isa.h"
#include "common/max_pool2d_args.h"
#include "cpu/dtype_index.h"
#include "cpu/max_pool2d_kernels.h"

namespace mtlcore::cpu {

namespace {

constexpr int64_t kMinWork = 1 << 14;  // input elements: below this a thread costs more

const MaxPoolLoops& loops() { MTLCORE_ISA_SELECT(max_pool_loops); }

const std::vector<at::ScalarType>& cpu_dtypes() {
  static const std::vector<at::ScalarType> d = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  return d;
}

PoolJob make_job(const Pool2dParams& p, const at::Tensor& input, const at::Tensor& out) {
  PoolJob j{};
  j.x = input.const_data_ptr();
  j.out = out.data_ptr();
  j.n = p.n;
  j.c = p.c;
  j.h = p.h;
  j.w = p.w;
  j.oh = p.oh;
  j.ow = p.ow;
  j.kh = p.kh;
  j.kw = p.kw;
  j.sh = p.stride_h;
  j.sw = p.stride_w;
  j.ph = p.pad_h;
  j.pw = p.pad_w;
  j.dh = p.dil_h;
  j.dw = p.dil_w;
  for (int d = 0; d < 4; ++d) j.xs[d] = input.stride(d);
  return j;
}

// Runs loop over `units` units of `elements_per_unit` input elements each.
void run(PoolLoop loop, const PoolJob& job, int64_t units, int64_t elements_per_unit) {
  if (units == 0) return;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, elements_per_unit));
  at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { loop(job, b, e); });
}

at::Tensor max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d_args("mtlcore.max_pool2d", input, kernel_size, stride,
                                               padding, dilation, ceil_mode, cpu_dtypes());
  at::Tensor out = new_pool2d_tensor(p, input, p.oh, p.ow);
  if (out.numel() == 0) return out;
  const PoolJob job = make_job(p, input, out);
  const int di = dtype_index(input.scalar_type(), "mtlcore.max_pool2d");
  if (p.channels_last) {
    run(loops().forward_cl[di], job, p.n * p.oh, p.kh * p.ow * p.kw * p.c);
  } else {
    run(loops().forward_nchw[di], job, p.n * p.c, p.h * p.w);
  }
  return out;
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   bool ceil_mode) {
  const char* op = "mtlcore.max_pool2d_backward";
  const Pool2dParams p = check_max_pool2d_args(op, input, kernel_size, stride, padding, dilation,
                                               ceil_mode, cpu_dtypes());
  check_max_pool2d_backward_args(op, p, input, grad_output);
  at::Tensor grad_input = new_pool2d_tensor(p, input, p.h, p.w);
  if (grad_input.numel() == 0) return grad_input;
  PoolJob job = make_job(p, input, grad_input);
  job.go = grad_output.const_data_ptr();
  for (int d = 0; d < 4; ++d) job.gs[d] = grad_output.stride(d);
  const int di = dtype_index(input.scalar_type(), "mtlcore.max_pool2d_backward");
  if (p.channels_last) {
    const int64_t blocks = (p.c + kPoolChannelBlock - 1) / kPoolChannelBlock;
    run(loops().backward_cl[di], job, p.n * blocks, p.h * p.w * std::min(p.c, kPoolChannelBlock));
  } else {
    run(loops().backward_nchw[di], job, p.n * p.c, p.h * p.w);
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace mtlcore::cpu
