// Autograd of mtlcore.max_pool2d, in C++ (registered for the Autograd dispatch key).
//
// The graph node keeps the input only (no indices: max_pool2d_backward finds each window's
// maximum again); its backward calls max_pool2d_backward when the engine will use the input's
// gradient in this backward call. A Python autograd registration cost tens of microseconds
// per call, more than pooling a small feature map.
//
// Without grad mode, or when the input does not require grad, the call goes straight to the
// forward kernel. Double backward is not supported (the backward op has no
// derivative): a gradient computed with create_graph=True raises when it is differentiated
// (forbid_double_backward).
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "common/autograd_node.h"

#include <string>
#include <vector>

namespace mtlcore {

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardSig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                              at::IntArrayRef, bool);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool);

// Edge: input. Input: the output's gradient.
struct MaxPool2dBackward : public Node {
  SavedVariable input;
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  bool ceil_mode = false;

  std::string name() const override { return "MaxPool2dBackward"; }

  void release_variables() override { input.reset_data(); }

  variable_list apply(variable_list&& incoming) override {
    static const auto op = find_op<BackwardSig>("mtlcore::max_pool2d_backward");
    variable_list out(1);
    const at::Tensor& grad = incoming[0];
    if (!grad.defined() || !task_should_compute_output(0)) return out;
    check_dense_grad("mtlcore.max_pool2d", grad);
    at::AutoDispatchBelowADInplaceOrView guard;  // the op has no derivative (see below)
    out[0] = op.call(grad, input.unpack(), kernel_size, stride, padding, dilation, ceil_mode);
    forbid_double_backward("mtlcore.max_pool2d", *this, incoming, out);
    return out;
  }
};

at::Tensor max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  check_no_tangent("mtlcore.max_pool2d", input, "input");
  static const auto forward = find_op<ForwardSig>("mtlcore::max_pool2d");
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    output = forward.call(input, kernel_size, stride, padding, dilation, ceil_mode);
  }
  if (!torch::autograd::GradMode::is_enabled() || !input.requires_grad()) return output;
  auto node = make_node<MaxPool2dBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->input = SavedVariable(input, false);
  node->kernel_size = kernel_size.vec();
  node->stride = stride.vec();
  node->padding = padding.vec();
  node->dilation = dilation.vec();
  node->ceil_mode = ceil_mode;
  torch::autograd::set_history(output, node);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("max_pool2d_backward", not_differentiable());  // common/autograd_node.h
}

}  // namespace mtlcore
