// Autograd of mtlcore.multitask_loss, in C++ (registered for the Autograd dispatch key).
//
// The forward runs multitask_loss_with_grad below autograd: one pass over the logits gives the
// losses and the gradients, which the graph node keeps (one tensor the size of the logits per
// task, in their dtype; nothing else of size). Its backward calls multitask_loss_backward,
// which only scales them (on the CPU, in the common case, not even that: see
// multitask_loss_with_grad's schema comment in mtlcore.cpp). A Python autograd registration would
// cost tens of microseconds per call in Python; the loss is called once per training step on small
// heads, where that overhead would be most of the time.
//
// Without grad mode, or with no input that requires grad, the call goes straight to the
// plain multitask_loss kernel (no gradient is computed). Double backward is not supported
// (the saved gradients are constants to the graph): a gradient computed with create_graph=True
// raises when it is differentiated (forbid_double_backward). Compiled autograd falls back to
// eager for this node.
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "common/autograd_node.h"

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace mtlcore {

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList,
                                                      const std::vector<std::string>&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, int64_t,
                                                      double);
using WithGradSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    at::TensorList, at::TensorList, const std::vector<std::string>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double);
using BackwardInPlaceSig = void(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                const at::Tensor&, const at::Tensor&, at::TensorList,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using BackwardSig = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, std::array<bool, 3>);

// Keys of tensors that belong to a tracer rather than to memory of their own.
const c10::DispatchKeySet kTracerKeys({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});

SavedVariable save(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? SavedVariable(*t, false) : SavedVariable();
}

std::optional<at::Tensor> unpack_optional(const SavedVariable& v, bool present) {
  return present ? std::optional<at::Tensor>(v.unpack()) : std::nullopt;
}

// Edges: logits[0..T), weights, relation. Inputs: the gradients of total and per_task.
struct MultitaskLossBackward : public Node {
  std::vector<SavedVariable> grads;
  SavedVariable per_task, grad_scale, weights, relation;
  bool has_weights = false, has_relation = false;

  std::string name() const override { return "MultitaskLossBackward"; }

  void release_variables() override {
    for (auto& g : grads) g.reset_data();
    per_task.reset_data();
    grad_scale.reset_data();
    weights.reset_data();
    relation.reset_data();
  }

  variable_list apply(variable_list&& incoming) override {
    static const auto op = find_op<BackwardSig>("mtlcore::multitask_loss_backward");
    const size_t t = grads.size();
    variable_list out(t + 2);
    const at::Tensor& g_total = incoming[0];
    const at::Tensor& g_per_task = incoming[1];
    if (!g_total.defined() && !g_per_task.defined()) return out;
    bool any_logits = false;
    for (size_t i = 0; i < t; ++i) any_logits = any_logits || should_compute_output(i);
    const std::array<bool, 3> mask{any_logits, has_weights && should_compute_output(t),
                                   has_relation && should_compute_output(t + 1)};
    at::AutoDispatchBelowADInplaceOrView guard;  // the ops have no derivative (see the end)
    const auto opt = [](const at::Tensor& x) {
      return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
    };
    const at::TensorOptions options = g_total.defined() ? g_total.options() : g_per_task.options();
    std::vector<at::Tensor> saved;
    saved.reserve(t);
    // When the graph is freed after this call, nothing else can read the forward's gradients:
    // they are scaled in place and become the logits' gradients (no new allocation, one pass
    // over warm memory). Tracers (torch.compile's fake and functional tensors) get the
    // functional op.
    bool in_place = mask[0] && !torch::autograd::get_current_graph_task_keep_graph();
    for (auto& g : grads) {
      saved.push_back(mask[0] ? g.unpack() : at::empty({0}, options));
      in_place = in_place && !saved.back().key_set().has_any(kTracerKeys);
    }
    std::vector<at::Tensor> grad_logits;
    at::Tensor grad_weights, grad_relation;
    if (in_place) {
      for (auto& g : grads) g.reset_data();
      static const auto scale_op = find_op<BackwardInPlaceSig>("mtlcore::multitask_loss_backward_");
      scale_op.call(opt(g_total), opt(g_per_task), per_task.unpack(), grad_scale.unpack(), saved,
                    unpack_optional(weights, has_weights), unpack_optional(relation, has_relation));
      grad_logits = std::move(saved);
      if (mask[1] || mask[2]) {
        std::vector<at::Tensor> none(t, at::empty({0}, options));
        std::tie(std::ignore, grad_weights, grad_relation) =
            op.call(opt(g_total), opt(g_per_task), per_task.unpack(), grad_scale.unpack(), none,
                    unpack_optional(weights, has_weights), unpack_optional(relation, has_relation),
                    {false, mask[1], mask[2]});
      }
    } else {
      std::tie(grad_logits, grad_weights, grad_relation) = op.call(
          opt(g_total), opt(g_per_task), per_task.unpack(), grad_scale.unpack(), saved,
          unpack_optional(weights, has_weights), unpack_optional(relation, has_relation), mask);
    }
    if (mask[0]) {
      for (size_t i = 0; i < t; ++i) {
        if (should_compute_output(i)) out[i] = std::move(grad_logits[i]);
      }
    }
    if (mask[1]) out[t] = std::move(grad_weights);
    if (mask[2]) out[t + 1] = std::move(grad_relation);
    forbid_double_backward("mtlcore.multitask_loss", *this, incoming, out);
    return out;
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

std::tuple<at::Tensor, at::Tensor> multitask_loss_autograd(
    at::TensorList logits, at::TensorList targets, const std::vector<std::string>& kinds,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    int64_t ignore_index, double label_smoothing) {
  for (size_t i = 0; i < logits.size(); ++i) {
    check_no_tangent("mtlcore.multitask_loss", logits[i], "logits[", i, "]");
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    check_no_tangent("mtlcore.multitask_loss", targets[i], "targets[", i, "]");
  }
  check_no_tangent("mtlcore.multitask_loss", weights, "weights");
  check_no_tangent("mtlcore.multitask_loss", relation, "relation");
  bool wants_grad = requires_grad(weights) || requires_grad(relation);
  for (const auto& x : logits) wants_grad = wants_grad || (x.defined() && x.requires_grad());
  wants_grad = wants_grad && torch::autograd::GradMode::is_enabled();
  if (!wants_grad) {
    static const auto op = find_op<ForwardSig>("mtlcore::multitask_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(logits, targets, kinds, weights, relation, ignore_index, label_smoothing);
  }
  static const auto op = find_op<WithGradSig>("mtlcore::multitask_loss_with_grad");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = op.call(logits, targets, kinds, weights, relation, ignore_index, label_smoothing);
  }
  auto& [total, per_task, grad_scale, grads] = r;
  auto node = make_node<MultitaskLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(logits, weights, relation));
  node->has_weights = weights.has_value() && weights->defined();
  node->has_relation = relation.has_value() && relation->defined();
  node->grads.reserve(grads.size());
  for (const auto& g : grads) node->grads.emplace_back(g, false);
  // per_task is saved detached: the node does not differentiate through it, and saving the
  // output itself would tie it to its own grad_fn.
  node->per_task = SavedVariable(per_task.detach(), false);
  node->grad_scale = SavedVariable(grad_scale, false);
  node->weights = save(weights);
  node->relation = save(relation);
  torch::autograd::set_history(total, node);
  torch::autograd::set_history(per_task, node);
  return {total, per_task};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, Autograd, m) {
  m.impl("multitask_loss", &multitask_loss_autograd);
  // Not differentiable (see not_differentiable in common/autograd_node.h).
  m.impl("multitask_loss_with_grad", not_differentiable());
  m.impl("multitask_loss_backward", not_differentiable());
  m.impl("multitask_loss_backward_", not_differentiable());
}

}  // namespace mtlcore
