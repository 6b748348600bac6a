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

void check_sgd_options(const SgdOptions& o);
void check_adam_options(const AdamOptions& o);

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool mutated;
};

// lists[0] is the reference list (params). Checks lengths, devices (all on `device`),
// dtypes (`allowed` floating types), shapes, layouts, and that no tensor at index i shares
// memory with another list's tensor at index i. Errors name the op, list and index.
void check_tensor_lists(const char* op, const std::vector<NamedList>& lists,
                        const c10::Device& device, const std::vector<at::ScalarType>& allowed);

// Optional one-element float tensors of the GradScaler protocol.
void check_scaler_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const c10::Device& device);

// Adam's per-parameter step counters: one element each, a real dtype, on `device`.
void check_state_steps(const char* op, at::TensorList steps, size_t n, const c10::Device& device);

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
