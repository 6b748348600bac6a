#include "common/multitask_loss_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "cpu/output_cache.h"

namespace mtlcore {

namespace {

bool parse_kind(const std::string& s, LossKind* kind) {
  if (s == "ce") {
    *kind = LossKind::kCe;
  } else if (s == "bce") {
    *kind = LossKind::kBce;
  } else if (s == "mse") {
    *kind = LossKind::kMse;
  } else if (s == "l1") {
    *kind = LossKind::kL1;
  } else {
    return false;
  }
  return true;
}

// A 2-d tensor with a dense last dim is read in place; anything else is made contiguous.
at::Tensor readable(const at::Tensor& t) {
  if (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) == 1)) return t;
  if (t.dim() == 1) return t;
  return t.contiguous();
}

int64_t item_stride(const at::Tensor& t, int64_t item_numel) {
  if (t.dim() >= 1 && t.dim() <= 2 && t.size(0) > 1) return t.stride(0);
  return item_numel;
}

void check_small(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                 const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided, op, ": ", name,
                    " must be a dense tensor");
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
                    " but the logits are on ", like.device());
}

}  // namespace

MultitaskLossProblem check_multitask_loss_args(const char* op, at::TensorList logits,
                                               at::TensorList targets,
                                               const std::vector<std::string>& kinds,
                                               const std::optional<at::Tensor>& weights,
                                               const std::optional<at::Tensor>& relation,
                                               int64_t ignore_index, double label_smoothing,
                                               const std::vector<at::ScalarType>& dtypes) {
  const size_t t = logits.size();
  TORCH_CHECK_VALUE(t >= 1, op, ": needs at least one task, got empty logits");
  TORCH_CHECK_VALUE(targets.size() == t && kinds.size() == t, op,
                    ": logits, targets and kinds must have one entry per task, got ", t, ", ",
                    targets.size(), " and ", kinds.size());
  TORCH_CHECK_VALUE(
      std::isfinite(label_smoothing) && label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
      ": label_smoothing must be in [0, 1], got ", label_smoothing);

  MultitaskLossProblem p;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  const at::Tensor& first = logits[0];
  TORCH_CHECK_VALUE(first.defined(), op, ": logits[0] is undefined");
  p.dtype = first.scalar_type();
  bool supported = false;
  for (auto d : dtypes) supported = supported || p.dtype == d;
  TORCH_CHECK_TYPE(supported, op, ": logits[0] has dtype ", p.dtype, ", which ",
                   first.device().type(), " kernels do not support");
  p.loss_dtype = p.dtype == at::kDouble ? at::kDouble : at::kFloat;

  for (size_t i = 0; i < t; ++i) {
    const at::Tensor& x = logits[i];
    const at::Tensor& y = targets[i];
    LossKind kind;
    TORCH_CHECK_VALUE(parse_kind(kinds[i], &kind), op, ": kinds[", i, "] is '", kinds[i],
                      "'; expected one of ", kLossKindNames);
    TORCH_CHECK_VALUE(x.defined() && x.layout() == at::kStrided, op, ": logits[", i,
                      "] must be a dense tensor");
    TORCH_CHECK_VALUE(y.defined() && y.layout() == at::kStrided, op, ": targets[", i,
                      "] must be a dense tensor");
    TORCH_CHECK_TYPE(x.scalar_type() == p.dtype, op, ": logits[", i, "] has dtype ",
                     x.scalar_type(), " but logits[0] has ", p.dtype,
                     " (all tasks share one dtype)");
    TORCH_CHECK_VALUE(x.device() == first.device(), op, ": logits[", i, "] is on ", x.device(),
                      " but logits[0] is on ", first.device());
    TORCH_CHECK_VALUE(y.device() == first.device(), op, ": targets[", i, "] is on ", y.device(),
                      " but logits[0] is on ", first.device());
    if (kind == LossKind::kCe) {
      TORCH_CHECK_VALUE(x.dim() >= 2, op, ": logits[", i,
                        "] (ce) must be [B, C] or [B, C, d1, ...], got shape ", x.sizes());
      TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, op, ": targets[", i,
                       "] (ce) must hold int64 class indices, got ", y.scalar_type());
      std::vector<int64_t> expected{x.size(0)};
      for (int64_t d = 2; d < x.dim(); ++d) expected.push_back(x.size(d));
      TORCH_CHECK_VALUE(y.sizes() == at::IntArrayRef(expected), op, ": targets[", i,
                        "] (ce) must have shape ", at::IntArrayRef(expected),
                        " for logits of shape ", x.sizes(), ", got ", y.sizes());
      TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": logits[", i, "] (ce) must have at least one class");
      TORCH_CHECK_VALUE(x.size(1) < (int64_t{1} << 31), op, ": logits[", i,
                        "] (ce) has more than 2^31 - 1 classes");
      // Dense logits are read contiguously; [B, C] rows and [B] targets in place.
      p.logits.push_back(x.dim() == 2 ? readable(x) : x.contiguous());
      p.targets.push_back(y.dim() == 1 ? readable(y) : y.contiguous());
    } else {
      TORCH_CHECK_TYPE(at::isFloatingType(y.scalar_type()), op, ": targets[", i, "] (", kinds[i],
                       ") must be a floating-point tensor, got ", y.scalar_type());
      TORCH_CHECK_VALUE(y.sizes() == x.sizes(), op, ": targets[", i, "] (", kinds[i],
                        ") must have the logits' shape ", x.sizes(), ", got ", y.sizes());
      at::Tensor yy = y;
      if (p.dtype == at::kDouble) {
        yy = y.to(at::kDouble);
      } else if (y.scalar_type() != p.dtype) {
        yy = y.to(at::kFloat);
      }
      // Both are read with one row layout: 2-d ones in place when their rows are dense,
      // anything else as one contiguous row.
      p.logits.push_back(x.dim() == 2 ? readable(x) : x.contiguous());
      p.targets.push_back(x.dim() == 2 ? readable(yy) : yy.contiguous());
    }
    p.kinds.push_back(kind);
  }

  const int64_t nt = static_cast<int64_t>(t);
  if (weights.has_value() && weights->defined()) {
    check_small(op, "weights", *weights, {nt}, first);
    p.weights = weights->to(p.loss_dtype).contiguous();
  }
  if (relation.has_value() && relation->defined()) {
    check_small(op, "relation", *relation, {nt, nt}, first);
    p.relation = relation->to(p.loss_dtype).contiguous();
  }
  return p;
}

std::vector<at::Tensor> MultitaskLossProblem::new_grads(at::TensorList caller_logits) const {
  std::vector<at::Tensor> grads;
  grads.reserve(caller_logits.size());
  for (const auto& x : caller_logits) {
    grads.push_back(
        cpu::empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  return grads;
}

std::vector<TaskView> MultitaskLossProblem::views(const std::vector<at::Tensor>& grads) const {
  std::vector<TaskView> v(num_tasks());
  for (size_t i = 0; i < num_tasks(); ++i) {
    const at::Tensor& x = logits[i];
    const at::Tensor& y = targets[i];
    TaskView& tv = v[i];
    tv.kind = kinds[i];
    if (kinds[i] == LossKind::kCe) {
      tv.batch = x.size(0);
      tv.classes = x.size(1);
      tv.inner = 1;
      for (int64_t d = 2; d < x.dim(); ++d) tv.inner *= x.size(d);
      tv.logits_stride = item_stride(x, tv.classes * tv.inner);
      tv.target_stride = item_stride(y, tv.inner);
      tv.target_is_float32 = false;
    } else {
      tv.batch = x.dim() == 2 ? x.size(0) : 1;
      tv.classes = x.dim() == 2 ? x.size(1) : x.numel();
      tv.inner = 1;
      tv.logits_stride = item_stride(x, tv.classes);
      tv.target_stride = item_stride(y, tv.classes);
      tv.target_is_float32 = y.scalar_type() != x.scalar_type();
    }
    tv.logits = x.data_ptr();
    tv.target = y.data_ptr();
    tv.grad = grads.empty() ? nullptr : grads[i].data_ptr();
  }
  return v;
}

void check_multitask_loss_backward_args(const char* op, const std::optional<at::Tensor>& grad_total,
                                        const std::optional<at::Tensor>& grad_per_task,
                                        const at::Tensor& per_task, const at::Tensor& grad_scale,
                                        at::TensorList grads,
                                        const std::optional<at::Tensor>& weights,
                                        const std::optional<at::Tensor>& relation) {
  TORCH_CHECK_VALUE(per_task.defined() && per_task.dim() == 1, op,
                    ": per_task must be a 1-d [T] tensor");
  const int64_t t = per_task.size(0);
  TORCH_CHECK_TYPE(per_task.scalar_type() == at::kFloat || per_task.scalar_type() == at::kDouble,
                   op, ": per_task must be float32 or float64, got ", per_task.scalar_type());
  const auto same = [&](const char* name, const at::Tensor& x, at::IntArrayRef shape) {
    check_small(op, name, x, shape, per_task);
    TORCH_CHECK_TYPE(x.scalar_type() == per_task.scalar_type(), op, ": ", name, " has dtype ",
                     x.scalar_type(), " but per_task has ", per_task.scalar_type());
  };
  same("grad_scale", grad_scale, {t});
  if (grad_total.has_value() && grad_total->defined()) same("grad_total", *grad_total, {});
  if (grad_per_task.has_value() && grad_per_task->defined()) {
    same("grad_per_task", *grad_per_task, {t});
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == t, op, ": grads has ", grads.size(),
                    " tensors but per_task has ", t, " tasks");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].defined() && grads[i].is_contiguous(), op, ": grads[", i,
                      "] must be a contiguous tensor (the forward's gradient)");
    TORCH_CHECK_VALUE(grads[i].device() == per_task.device(), op, ": grads[", i, "] is on ",
                      grads[i].device(), " but per_task is on ", per_task.device());
    TORCH_CHECK_TYPE(at::isFloatingType(grads[i].scalar_type()), op, ": grads[", i,
                     "] must be floating point, got ", grads[i].scalar_type());
  }
  if (weights.has_value() && weights->defined())
    check_small(op, "weights", *weights, {t}, per_task);
  if (relation.has_value() && relation->defined()) {
    check_small(op, "relation", *relation, {t, t}, per_task);
  }
}

double coupled_total(int64_t t, const double* loss, const double* w, const double* r) {
  double total = 0.0;
  for (int64_t i = 0; i < t; ++i) total += (w ? w[i] : 1.0) * loss[i];
  if (r != nullptr) {
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t j = 0; j < t; ++j) total += r[i * t + j] * loss[i] * loss[j];
    }
  }
  return total;
}

void coupled_coefficients(int64_t t, const double* loss, const double* w, const double* r,
                          double g_total, const double* g_per_task, const double* grad_scale,
                          double* coef) {
  for (int64_t i = 0; i < t; ++i) {
    double d = w ? w[i] : 1.0;
    if (r != nullptr) {
      for (int64_t j = 0; j < t; ++j) d += (r[i * t + j] + r[j * t + i]) * loss[j];
    }
    const double num = g_total * d + (g_per_task ? g_per_task[i] : 0.0);
    coef[i] = grad_scale[i] != 0.0 ? num / grad_scale[i] : 0.0;
  }
}

}  // namespace mtlcore
