// Helpers of the C++ autograd registrations (common/*_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace mtlcore {

// The typed handle of one of our ops (looked up once per call site: keep it in a static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A new graph node: c10::intrusive_ptr nodes in recent torch, std::shared_ptr ones before.
template <typename N, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<N>(std::forward<Args>(args)...);
  }
}

// A gradient that reaches a node must be dense: our backward kernels take strided tensors only
// (a sparse one passed to backward() would otherwise fail in the dispatcher, naming no argument).
inline void check_dense_grad(const char* op, const at::Tensor& grad) {
  TORCH_CHECK(grad.layout() == at::kStrided, op, " (backward): grad_output has layout ",
              grad.layout(), "; only dense (strided) tensors are supported");
}

// Forward-mode AD (dual tensors, torch.func.jvp, jacfwd) has no formula for our ops: an
// argument that carries a tangent raises NotImplementedError naming it, as PyTorch's own ops
// without a forward derivative do, instead of its tangent being dropped from the result.
// arg: the argument's name, in parts (e.g. "logits[", i, "]"), joined only when it raises.
template <typename... Arg>
void check_no_tangent(const char* op, const at::Tensor& t, const Arg&... arg) {
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(t), op,
                              ": forward-mode AD is not supported: ", arg...,
                              " is a dual tensor (it has a tangent)");
}

template <typename... Arg>
void check_no_tangent(const char* op, const std::optional<at::Tensor>& t, const Arg&... arg) {
  if (t.has_value()) check_no_tangent(op, *t, arg...);
}

// Our backward kernels have no derivative of their own. With create_graph=True (grad mode on
// while a node runs), the gradients a node returns become part of a graph, and without this
// they would be constants in it: a second derivative through them would silently come out as
// zero (or fail as "not used in the graph"). Each defined gradient in grads is given instead an
// Error node for grad_fn, with edges to what it depends on (the node's inputs, its next edges,
// and the incoming gradients), so that differentiating it raises op's message. Outside grad
// mode, or when none of those requires grad, grads are left as they are.
inline void forbid_double_backward(const char* op, const torch::autograd::Node& node,
                                   const torch::autograd::variable_list& incoming,
                                   torch::autograd::variable_list& grads) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  torch::autograd::edge_list edges = node.next_edges();
  for (auto& e : torch::autograd::collect_next_edges(incoming)) edges.push_back(std::move(e));
  if (std::none_of(edges.begin(), edges.end(), [](const auto& e) { return e.is_valid(); })) {
    return;
  }
  auto error = make_node<torch::autograd::Error>(
      std::string(op) +
          ": double backward is not supported: this gradient was computed with "
          "create_graph=True by a backward kernel that has no derivative of its own",
      std::move(edges));
  // The gradients are new tensors, or buffers the node has released (multitask_loss's in-place
  // scaling): setting their history touches nothing else. (No shallow copy: functorch's
  // batched tensors, under jacrev, have no data to copy.)
  for (auto& g : grads) {
    if (g.defined()) torch::autograd::set_history(g, error);
  }
}

// The Autograd kernel of an op without a derivative (our backward ops, the forward-with-
// gradients op): its outputs get a node that raises "derivative for <op> is not implemented"
// when a gradient reaches it, wherever the op is called with grad mode on and an input that
// requires grad (torch.func's nested transforms, whose outer levels see the call even below
// our nodes' AutoDispatchBelowADInplaceOrView guard, or a direct call). Without it PyTorch's
// default fallback only warns, and the second derivative comes out as zero.
inline torch::CppFunction not_differentiable() {
  return torch::autograd::autogradNotImplementedFallback();
}

}  // namespace mtlcore
