// Argument checks and layout preparation shared by the CPU and CUDA optimizer kernels.
//
// An update op receives parallel tensor lists (params, grads, optimizer states). Index i of
// every list must agree in device, dtype and shape; the kernels then walk each group of
// tensors as flat arrays. Groups that are not laid out identically and densely (a sliced
// parameter, a grad with other strides) are updated through contiguous copies that
// DenseLists::write_back() copies back: correct for any layout, fast for the usual one.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "common/optim_options.h"

namespace mtlcore {

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool mutated;
};

// Every argument check of mtlcore.sgd_ / mtlcore.adam_, shared by the CPU and CUDA kernels:
// hyperparameters, list lengths, per-index dtype/shape/device agreement (all tensors on
// params[0]'s device, one dtype from `dtypes`), layouts, memory shared between an updated
// tensor and another list's tensor, the GradScaler tensors and Adam's step counters. Errors
// name the op, the argument and the index. Returns the lists the kernel walks: params, grads,
// then the states in use (momentum_buffers only with momentum, max_exp_avg_sqs only with
// amsgrad); grads count as updated only when grad_scale is given.
std::vector<NamedList> check_sgd_args(at::TensorList params, at::TensorList grads,
                                      at::TensorList momentum_buffers, const SgdOptions& o,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf,
                                      const std::vector<at::ScalarType>& dtypes);
std::vector<NamedList> check_adam_args(at::TensorList params, at::TensorList grads,
                                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                       at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                       const AdamOptions& o,
                                       const std::optional<at::Tensor>& grad_scale,
                                       const std::optional<at::Tensor>& found_inf,
                                       const std::vector<at::ScalarType>& dtypes);

class DenseLists {
 public:
  explicit DenseLists(const std::vector<NamedList>& lists);
  // Tensor of list `l` at index `i`, dense and laid out like its group.
  const at::Tensor& get(size_t l, size_t i) const { return dense_[l][i]; }
  size_t num_tensors() const { return dense_.empty() ? 0 : dense_[0].size(); }
  // Copies results held in contiguous copies back into the caller's tensors.
  void write_back();

 private:
  std::vector<std::vector<at::Tensor>> dense_;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;  // (caller's tensor, copy)
};

// Reads a one-element tensor (CPU) as double.
double scalar_value(const at::Tensor& t);

}  // namespace mtlcore
