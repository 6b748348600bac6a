#include "common/conv2d_act_args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "common/arg_checks.h"

namespace mtlcore {

Conv2dParams check_conv2d_act_args(const char* op, const at::Tensor& input,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups,
                                   std::string_view activation, double negative_slope,
                                   const std::vector<at::ScalarType>& dtypes) {
  Conv2dParams p{};
  TORCH_CHECK_VALUE(parse_activation(activation, &p.activation), op, ": unknown activation '",
                    std::string(activation), "'; expected one of ", kActivationNames);
  TORCH_CHECK_VALUE(std::isfinite(negative_slope), op, ": negative_slope must be finite, got ",
                    negative_slope);
  p.negative_slope = negative_slope;

  TORCH_CHECK_VALUE(input.defined() && input.dim() == 4, op,
                    ": input must be a 4-d [N, C, H, W] tensor, got ",
                    input.defined() ? input.dim() : 0, " dimensions");
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 4, op,
                    ": weight must be a 4-d [K, C/groups, R, S] tensor, got ",
                    weight.defined() ? weight.dim() : 0, " dimensions");
  TORCH_CHECK_VALUE(input.layout() == at::kStrided && weight.layout() == at::kStrided, op,
                    ": input and weight must be dense (strided) tensors");
  bool supported = false;
  for (auto d : dtypes) supported = supported || input.scalar_type() == d;
  TORCH_CHECK_TYPE(supported, op, ": input has dtype ", input.scalar_type(), ", which ",
                   input.device().type(), " kernels do not support");
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op, ": weight has dtype ",
                   weight.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == input.device(), op, ": weight is on ", weight.device(),
                    " but input is on ", input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape [", weight.size(0), "] (weight.size(0)), got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), op, ": bias has dtype ",
                     bias->scalar_type(), " but input has ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, ": bias is on ", bias->device(),
                      " but input is on ", input.device());
  }

  check_pair(op, "stride", stride, 1);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(padding.size() == 2 || padding.size() == 4, op,
                    ": padding must have 2 values (height, width) or 4 (top, bottom, left, "
                    "right), got ",
                    padding.size());
  for (int64_t v : padding) {
    TORCH_CHECK_VALUE(v >= 0, op, ": padding must be >= 0, got ", padding);
  }
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);

  p.n = input.size(0);
  p.c = input.size(1);
  p.h = input.size(2);
  p.w = input.size(3);
  p.k = weight.size(0);
  p.r = weight.size(2);
  p.s = weight.size(3);
  p.groups = groups;
  TORCH_CHECK_VALUE(p.c % groups == 0, op, ": input has ", p.c, " channels, which groups=", groups,
                    " does not divide");
  TORCH_CHECK_VALUE(p.k % groups == 0, op, ": weight has ", p.k,
                    " output channels, which groups=", groups, " does not divide");
  TORCH_CHECK_VALUE(weight.size(1) * groups == p.c, op,
                    ": weight.size(1) must be input channels "
                    "/ groups = ",
                    p.c / groups, ", got ", weight.size(1));
  TORCH_CHECK_VALUE(p.k > 0 && p.r > 0 && p.s > 0, op, ": weight must not be empty, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(p.c > 0, op, ": input must have at least one channel");

  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  if (padding.size() == 2) {
    p.pad_top = p.pad_bottom = padding[0];
    p.pad_left = p.pad_right = padding[1];
  } else {
    p.pad_top = padding[0];
    p.pad_bottom = padding[1];
    p.pad_left = padding[2];
    p.pad_right = padding[3];
  }
  const int64_t extent_h = p.dil_h * (p.r - 1) + 1;
  const int64_t extent_w = p.dil_w * (p.s - 1) + 1;
  const int64_t padded_h = p.h + p.pad_top + p.pad_bottom;
  const int64_t padded_w = p.w + p.pad_left + p.pad_right;
  TORCH_CHECK_VALUE(extent_h <= padded_h && extent_w <= padded_w, op,
                    ": the kernel (dilated extent ", extent_h, "x", extent_w,
                    ") is larger than the padded input (", padded_h, "x", padded_w, ")");
  p.oh = (padded_h - extent_h) / p.stride_h + 1;
  p.ow = (padded_w - extent_w) / p.stride_w + 1;
  return p;
}

void check_conv2d_act_backward_args(const char* op, const Conv2dParams& p, const at::Tensor& input,
                                    const at::Tensor& grad_output, const at::Tensor& saved) {
  const auto expected = p.output_sizes();
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"grad_output", grad_output}, {"saved", saved}}) {
    TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided, op, ": ", name,
                      " must be a dense tensor");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
                      at::IntArrayRef(expected), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ",
                     t.scalar_type(), " but input has ", input.scalar_type());
    TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
                      " but input is on ", input.device());
  }
}

}  // namespace mtlcore
