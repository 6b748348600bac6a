// Autograd of mtlcore.conv2d_act, in C++ (registered for the Autograd dispatch key).
//
// The forward runs conv2d_act below autograd, or conv2d_act_with_preact when the activation's
// derivative needs the pre-activation (gelu, gelu_tanh, silu, leaky_relu with a negative
// slope) and a gradient is wanted. The graph node keeps input and weight (as autograd does for
// F.conv2d) and one output-sized tensor: the output itself, or the pre-activation. Its backward
// calls conv2d_act_backward for the gradients the engine will use (task_should_compute_output: so
// torch.autograd.grad(y, [x]) computes no weight gradient, as for torch's own convolution).
// A Python autograd registration cost about 40 us per forward and 90 us per backward in
// Python, as much as the whole of a small layer's compute.
//
// Without grad mode, or with no input that requires grad, the call goes straight to the
// forward kernel and nothing is kept. Double backward is not supported (the backward op has no
// derivative): a gradient computed with create_graph=True raises when it is differentiated
// (forbid_double_backward); so does forward-mode AD (check_no_tangent). Compiled autograd falls
// back to eager for this node. conv2d_act_with_preact, when called directly, gets the same
// node on its output (its pre-activation is not differentiable).
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/autograd_node.h"

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace mtlcore {

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                              at::IntArrayRef, int64_t, c10::string_view, double);
using WithPreactSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&,
                                                         at::IntArrayRef, at::IntArrayRef,
                                                         at::IntArrayRef, int64_t, c10::string_view,
                                                         double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, double, std::array<bool, 3>);

// Edges: input, weight, bias (an empty edge without bias). Input: the output's gradient.
struct Conv2dActBackward : public Node {
  SavedVariable input, weight, saved;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  std::string activation;
  double negative_slope = 0.0;

  std::string name() const override { return "Conv2dActBackward"; }

  void release_variables() override {
    input.reset_data();
    weight.reset_data();
    saved.reset_data();
  }

  variable_list apply(variable_list&& incoming) override {
    static const auto op = find_op<BackwardSig>("mtlcore::conv2d_act_backward");
    variable_list out(3);
    const at::Tensor& grad = incoming[0];
    if (!grad.defined()) return out;
    check_dense_grad("mtlcore.conv2d_act", grad);
    // The edges the engine will follow in this backward call (not only those that exist: a
    // missing bias, or one that needs no gradient, has no edge).
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    // Below autograd: the op has no derivative (forbid_double_backward below says so).
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_weight, grad_bias] =
        op.call(grad, input.unpack(), weight.unpack(), saved.unpack(), stride, padding, dilation,
                groups, activation, negative_slope, mask);
    if (mask[0]) out[0] = std::move(grad_input);
    if (mask[1]) out[1] = std::move(grad_weight);
    if (mask[2]) out[2] = std::move(grad_bias);
    forbid_double_backward("mtlcore.conv2d_act", *this, incoming, out);
    return out;
  }
};

// Whether the call needs a graph node: grad mode, and an argument that requires grad. First,
// no argument may carry a forward-mode tangent.
bool wants_grad(const char* op, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias) {
  check_no_tangent(op, input, "input");
  check_no_tangent(op, weight, "weight");
  check_no_tangent(op, bias, "bias");
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  return torch::autograd::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() || bias_grad);
}

// Whether the backward needs the pre-activation (an unknown activation is left to the forward
// kernel's argument check).
bool keeps_preact(c10::string_view activation, double negative_slope) {
  Activation act = Activation::kIdentity;
  return parse_activation(std::string_view(activation.data(), activation.size()), &act) &&
         needs_preactivation(act, negative_slope);
}

// Makes output's graph node, which keeps input, weight and saved (the output or the
// pre-activation).
void record_node(const at::Tensor& output, const at::Tensor& saved, const at::Tensor& input,
                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 int64_t groups, c10::string_view activation, double negative_slope) {
  auto node = make_node<Conv2dActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->input = SavedVariable(input, false);
  node->weight = SavedVariable(weight, false);
  node->stride = stride.vec();
  node->padding = padding.vec();
  node->dilation = dilation.vec();
  node->groups = groups;
  node->activation = std::string(activation.data(), activation.size());
  node->negative_slope = negative_slope;
  node->saved = SavedVariable(saved, false);
  torch::autograd::set_history(output, node);
}

at::Tensor conv2d_act_autograd(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view activation, double negative_slope) {
  static const auto forward = find_op<ForwardSig>("mtlcore::conv2d_act");
  if (!wants_grad("mtlcore.conv2d_act", input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward.call(input, weight, bias, stride, padding, dilation, groups, activation,
                        negative_slope);
  }
  const bool keep_preact = keeps_preact(activation, negative_slope);
  at::Tensor output, preact;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (keep_preact) {
      static const auto with_preact = find_op<WithPreactSig>("mtlcore::conv2d_act_with_preact");
      std::tie(output, preact) = with_preact.call(input, weight, bias, stride, padding, dilation,
                                                  groups, activation, negative_slope);
    } else {
      output = forward.call(input, weight, bias, stride, padding, dilation, groups, activation,
                            negative_slope);
    }
  }
  // The output is saved detached (it shares the version counter, so an in-place change of it
  // is still caught): saved as itself it would hold its own grad_fn, this node.
  record_node(output, keep_preact ? preact : output.detach(), input, weight, bias, stride, padding,
              dilation, groups, activation, negative_slope);
  return output;
}

// conv2d_act_with_preact called directly: the same node on its output; the pre-activation is
// not differentiable.
std::tuple<at::Tensor, at::Tensor> conv2d_act_with_preact_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, double negative_slope) {
  static const auto with_preact = find_op<WithPreactSig>("mtlcore::conv2d_act_with_preact");
  const bool grad = wants_grad("mtlcore.conv2d_act_with_preact", input, weight, bias);
  at::Tensor output, preact;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(output, preact) = with_preact.call(input, weight, bias, stride, padding, dilation,
                                                groups, activation, negative_slope);
  }
  if (grad) {
    record_node(output, keeps_preact(activation, negative_slope) ? preact : output.detach(), input,
                weight, bias, stride, padding, dilation, groups, activation, negative_slope);
  }
  return {output, preact};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, Autograd, m) {
  m.impl("conv2d_act", &conv2d_act_autograd);
  m.impl("conv2d_act_with_preact", &conv2d_act_with_preact_autograd);
  // Not differentiable (see not_differentiable in common/autograd_node.h).
  m.impl("conv2d_act_backward", not_differentiable());
}

}  // namespace mtlcore
