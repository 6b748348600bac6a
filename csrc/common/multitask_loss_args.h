// Argument checks and the problem description of mtlcore.multitask_loss, shared by the CPU and
// CUDA kernels (forward and backward).
//
// A call holds T tasks. Task i reads logits[i] and targets[i] and is one of
//   ce   softmax cross-entropy over dim 1: logits [B, C] or [B, C, d1, ...], int64 targets
//        [B] or [B, d1, ...]; ignore_index and label_smoothing as F.cross_entropy;
//   bce  sigmoid binary cross-entropy on logits; mse, l1: regression. Float targets of the
//        logits' shape; a NaN target is a missing label.
// Every task is described to the kernels by a TaskView: B items of C x S elements (ce: C
// classes by S pixels; other kinds: rows of C elements, S = 1). Item b of the logits starts at
// b * logits_stride, its class c / element j at c * S (+ pixel s); targets likewise with
// target_stride (ce targets have S elements per item). 2-d logits and targets whose last dim is
// dense are read in place, whatever their row stride (the heads of one Linear split with
// torch.split); other layouts are made contiguous first. The gradient is a new contiguous
// tensor of the logits' shape: item b at b * C * S.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mtlcore {

enum class LossKind : int32_t { kCe = 0, kBce = 1, kMse = 2, kL1 = 3 };

inline constexpr const char* kLossKindNames = "ce, bce, mse, l1";

struct TaskView {
  LossKind kind;
  int64_t batch;          // B
  int64_t classes;        // C: classes (ce) or row length
  int64_t inner;          // S: pixels per item (dense ce), else 1
  int64_t logits_stride;  // elements between items of the logits
  int64_t target_stride;  // elements between items of the targets
  const void* logits;
  const void* target;
  void* grad;                // contiguous, logits' dtype; null when the gradient is not wanted
  bool target_is_float32;    // bce/mse/l1 targets: float32 rather than the logits' dtype
  double grad_factor = 1.0;  // the gradient is written times this (see the CPU forward)

  int64_t numel() const { return batch * classes * inner; }
};

struct MultitaskLossProblem {
  std::vector<LossKind> kinds;
  std::vector<at::Tensor> logits;      // as the kernels read them (see the header comment)
  std::vector<at::Tensor> targets;     // likewise; bce/mse/l1 in the logits' dtype or float32
  at::ScalarType dtype;                // the logits' dtype, one for all tasks
  at::ScalarType loss_dtype;           // float64 for float64 logits, else float32
  std::optional<at::Tensor> weights;   // [T] in loss_dtype, or none (all ones)
  std::optional<at::Tensor> relation;  // [T, T] in loss_dtype, or none (zero)
  int64_t ignore_index;
  double label_smoothing;

  size_t num_tasks() const { return kinds.size(); }
  // New contiguous tensors shaped like the caller's logits, for the gradients.
  std::vector<at::Tensor> new_grads(at::TensorList caller_logits) const;
  // Views of every task; grads may be empty (no gradient written).
  std::vector<TaskView> views(const std::vector<at::Tensor>& grads) const;
};

// Checks every argument of the forward ops and returns the problem. `dtypes` are the logits
// dtypes this device supports. Errors are ValueError/TypeError naming the argument and the task
// index. Labels are checked by the kernels (they read them anyway).
MultitaskLossProblem check_multitask_loss_args(const char* op, at::TensorList logits,
                                               at::TensorList targets,
                                               const std::vector<std::string>& kinds,
                                               const std::optional<at::Tensor>& weights,
                                               const std::optional<at::Tensor>& relation,
                                               int64_t ignore_index, double label_smoothing,
                                               const std::vector<at::ScalarType>& dtypes);

// Checks the backward op's arguments: T = per_task.numel(), grad_scale [T] and the optional
// incoming gradients ([] and [T]) in per_task's dtype and device, grads[i] (the forward's
// gradients, possibly empty tensors when not wanted), weights [T], relation [T, T].
void check_multitask_loss_backward_args(const char* op, const std::optional<at::Tensor>& grad_total,
                                        const std::optional<at::Tensor>& grad_per_task,
                                        const at::Tensor& per_task, const at::Tensor& grad_scale,
                                        at::TensorList grads,
                                        const std::optional<at::Tensor>& weights,
                                        const std::optional<at::Tensor>& relation);

// Host reference of the coupling, in double, for tiny T-sized tensors:
//   total = sum_i w_i L_i + sum_ij R_ij L_i L_j,
//   coef_i = (g_total * (w_i + sum_j (R_ij + R_ji) L_j) + g_i) / grad_scale_i (0 where
//   grad_scale_i is 0: a task without valid labels),
// the factor that turns the forward's gradient grads[i] into d total / d logits[i] (the forward
// returns grads[i] and grad_scale[i] with grads[i] / grad_scale[i] = d L_i / d logits[i]).
// w or r may be null (ones / zero), g_per_task null (zero).
double coupled_total(int64_t t, const double* loss, const double* w, const double* r);
void coupled_coefficients(int64_t t, const double* loss, const double* w, const double* r,
                          double g_total, const double* g_per_task, const double* grad_scale,
                          double* coef);

}  // namespace mtlcore
