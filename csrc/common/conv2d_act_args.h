// Argument checks and the problem description of mtlcore.conv2d_act, shared by the CPU and CUDA
// kernels (forward and backward).
//
// Shapes: input [N, C, H, W] (any strides: NCHW, channels_last or a strided view), weight
// [K, C/groups, R, S], bias [K] or none; output [N, K, OH, OW], always contiguous NCHW.
// Padding is (top, bottom, left, right); the op also accepts two values (pad_h, pad_w) for the
// symmetric case, which is what F.conv2d takes. "same" with an even effective kernel extent
// pads one more at the bottom/right, as F.conv2d does.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/activation.h"

namespace mtlcore {

struct Conv2dParams {
  int64_t n, c, h, w;  // input
  int64_t k, r, s;     // output channels, kernel height and width
  int64_t oh, ow;      // output height and width
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t dil_h, dil_w;
  int64_t groups;
  Activation activation;
  double negative_slope;

  int64_t c_per_group() const { return c / groups; }
  int64_t k_per_group() const { return k / groups; }
  // Depth of one group's GEMM in the forward pass: (C / groups) * R * S.
  int64_t depth() const { return c_per_group() * r * s; }
  std::vector<int64_t> output_sizes() const { return {n, k, oh, ow}; }
};

// Checks every argument of the forward op and returns the problem. `dtypes` are the dtypes
// this device supports. Errors are ValueError/TypeError naming the argument.
Conv2dParams check_conv2d_act_args(const char* op, const at::Tensor& input,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups,
                                   std::string_view activation, double negative_slope,
                                   const std::vector<at::ScalarType>& dtypes);

// Checks the extra tensors of the backward op against the problem `p` (from the call above):
// grad_output and saved (the forward's output or pre-activation) are [N, K, OH, OW] tensors of
// input's dtype and device.
void check_conv2d_act_backward_args(const char* op, const Conv2dParams& p, const at::Tensor& input,
                                    const at::Tensor& grad_output, const at::Tensor& saved);

}  // namespace mtlcore
