// Argument checks and the problem description of mtlcore.max_pool2d, shared by the CPU and CUDA
// kernels (forward and backward).
//
// Shapes: input [N, C, H, W]; output [N, C, OH, OW] with F.max_pool2d's sizes (ceil_mode
// included: a last window must start inside the input or its left padding). Window (oh, ow)
// covers rows ih = oh * stride_h - pad_h + i * dil_h (i < kh) and columns likewise; rows and
// columns outside the input are skipped (padding is -inf, never selected). A window with no
// element inside the input (possible with dilation, or ceil_mode windows that start in the
// padding) gives -inf and passes no gradient on, as F.max_pool2d's values do.
//
// Layout: when input is channels_last-contiguous (and not also NCHW-contiguous), output and
// grad_input are channels_last; otherwise they are contiguous NCHW and input is read through
// its four strides (views, slices). grad_output is read through its strides.
//
// The maximum of a window, and the element its gradient goes to, is chosen as F.max_pool2d's
// indices are: the window's valid elements in row-major order, starting from the first one,
// replaced by each later element v with v > max or v NaN (so NaN propagates and the last NaN
// wins; among equal maxima the first).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mtlcore {

struct Pool2dParams {
  int64_t n, c, h, w;  // input
  int64_t oh, ow;      // output
  int64_t kh, kw;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
  bool channels_last;  // output and grad_input in channels_last (see above)

  std::vector<int64_t> output_sizes() const { return {n, c, oh, ow}; }
};

// Checks every argument of the forward op and returns the problem. `dtypes` are the dtypes
// this device supports. Errors are ValueError/TypeError naming the argument.
Pool2dParams check_max_pool2d_args(const char* op, const at::Tensor& input,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   bool ceil_mode, const std::vector<at::ScalarType>& dtypes);

// Checks grad_output of the backward op against the problem `p`: an [N, C, OH, OW] tensor of
// input's dtype and device.
void check_max_pool2d_backward_args(const char* op, const Pool2dParams& p, const at::Tensor& input,
                                    const at::Tensor& grad_output);

// A new [N, C, rows, cols] tensor with input's dtype and device, in the layout p chooses.
at::Tensor new_pool2d_tensor(const Pool2dParams& p, const at::Tensor& input, int64_t rows,
                             int64_t cols);

}  // namespace mtlcore
