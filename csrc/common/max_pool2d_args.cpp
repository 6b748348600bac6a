#include "common/max_pool2d_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <limits>

#include "common/arg_checks.h"
#include "cpu/output_cache.h"

namespace mtlcore {

namespace {

// F.max_pool2d's output size along one dimension (torch's pooling_output_shape, rounding the
// division down); < 1 when the window does not fit.
int64_t pooled_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil,
                    bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  // The last window must start inside the input or its left padding.
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

}  // namespace

Pool2dParams check_max_pool2d_args(const char* op, const at::Tensor& input,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   bool ceil_mode, const std::vector<at::ScalarType>& dtypes) {
  TORCH_CHECK_VALUE(input.defined() && input.dim() == 4, op,
                    ": input must be a 4-d [N, C, H, W] tensor, got ",
                    input.defined() ? input.dim() : 0, " dimensions");
  TORCH_CHECK_VALUE(input.layout() == at::kStrided, op, ": input must be a dense (strided) tensor");
  bool supported = false;
  for (auto d : dtypes) supported = supported || input.scalar_type() == d;
  TORCH_CHECK_TYPE(supported, op, ": input has dtype ", input.scalar_type(), ", which ",
                   input.device().type(), " kernels do not support");
  // As F.max_pool2d: only the batch and channel dimensions may be empty (a padded window over
  // an empty image would otherwise yield -inf).
  TORCH_CHECK_VALUE(input.size(2) > 0 && input.size(3) > 0, op,
                    ": input must have a non-zero height and width, got ", input.sizes());
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "dilation", dilation, 1);
  check_pair(op, "padding", padding, 0);
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
                    ": padding must be at most half of kernel_size, got padding ", padding,
                    " and kernel_size ", kernel_size);
  // Window coordinates are computed in 32 bits on CUDA: keep every extent far from 2^31.
  constexpr int64_t kLimit = int64_t{1} << 30;
  for (const auto& [name, v] : {std::pair<const char*, at::IntArrayRef>{"kernel_size", kernel_size},
                                {"stride", stride},
                                {"dilation", dilation}}) {
    TORCH_CHECK_VALUE(v[0] < kLimit && v[1] < kLimit, op, ": ", name, " must be < 2^30, got ", v);
  }
  TORCH_CHECK_VALUE(kernel_size[0] * kernel_size[1] < kLimit, op,
                    ": the kernel must have fewer than 2^30 elements, got kernel_size ",
                    kernel_size);
  TORCH_CHECK_VALUE(input.size(2) < kLimit && input.size(3) < kLimit, op,
                    ": input height and width must be < 2^30, got ", input.sizes());
  TORCH_CHECK_VALUE(
      dilation[0] * (kernel_size[0] - 1) < kLimit && dilation[1] * (kernel_size[1] - 1) < kLimit,
      op, ": the dilated kernel must be smaller than 2^30");

  Pool2dParams p{};
  p.n = input.size(0);
  p.c = input.size(1);
  p.h = input.size(2);
  p.w = input.size(3);
  p.kh = kernel_size[0];
  p.kw = kernel_size[1];
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  p.oh = pooled_size(p.h, p.kh, p.stride_h, p.pad_h, p.dil_h, ceil_mode);
  p.ow = pooled_size(p.w, p.kw, p.stride_w, p.pad_w, p.dil_w, ceil_mode);
  TORCH_CHECK_VALUE(p.oh >= 1 && p.ow >= 1, op, ": the pooled output would be empty (", p.oh, "x",
                    p.ow, ") for input ", input.sizes(), ", kernel_size ", kernel_size, ", stride ",
                    stride, ", padding ", padding, ", dilation ", dilation);
  p.channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  return p;
}

void check_max_pool2d_backward_args(const char* op, const Pool2dParams& p, const at::Tensor& input,
                                    const at::Tensor& grad_output) {
  const auto expected = p.output_sizes();
  TORCH_CHECK_VALUE(grad_output.defined() && grad_output.layout() == at::kStrided, op,
                    ": grad_output must be a dense tensor");
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op,
                    ": grad_output must have shape ", at::IntArrayRef(expected), ", got ",
                    grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output has dtype ",
                   grad_output.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), op, ": grad_output is on ",
                    grad_output.device(), " but input is on ", input.device());
}

at::Tensor new_pool2d_tensor(const Pool2dParams& p, const at::Tensor& input, int64_t rows,
                             int64_t cols) {
  return cpu::empty_output(
      {p.n, p.c, rows, cols},
      input.options().memory_format(p.channels_last ? at::MemoryFormat::ChannelsLast
                                                    : at::MemoryFormat::Contiguous));
}

}  // namespace mtlcore
