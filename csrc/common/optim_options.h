// Hyperparameters of the fused optimizer updates, as the op schemas take them. A plain header
// (no torch includes) so that the per-ISA kernel files can use it too.
#pragma once

namespace mtlcore {

struct SgdOptions {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
};

struct AdamOptions {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
};

}  // namespace mtlcore
