// Inner loops of the fused optimizer updates on the CPU, one table per instruction set.
//
// optim_kernels.cpp is compiled once per ISA (base, avx2, avx512) into namespace
// mtlcore::cpu::<isa>; csrc/cpu/optim.cpp picks the table with MTLCORE_ISA_SELECT and drives
// the loops over all tensors of a call. Each function updates one flat chunk of n elements.
#pragma once

#include <cstdint>

#include "common/optim_options.h"

namespace mtlcore::cpu {

// Hyperparameters as the loops need them (after validation), with the GradScaler's scale.
struct SgdLoopArgs {
  SgdOptions opt;
  bool has_grad_scale;
  double grad_scale;
};

struct AdamLoopArgs {
  AdamOptions opt;
  bool has_grad_scale;
  double grad_scale;
};

// Per-tensor values derived from its step count, in double as torch.optim computes them.
struct AdamStepScalars {
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

template <typename T>
using SgdLoop = void (*)(T* param, T* grad, T* momentum_buffer, int64_t n, const SgdLoopArgs& a);

template <typename T>
using AdamLoop = void (*)(T* param, T* grad, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq,
                          int64_t n, const AdamLoopArgs& a, const AdamStepScalars& s);

struct OptimLoops {
  SgdLoop<float> sgd_f32;
  SgdLoop<double> sgd_f64;
  AdamLoop<float> adam_f32;
  AdamLoop<double> adam_f64;
};

namespace base {
extern const OptimLoops optim_loops;
}
namespace avx2 {
extern const OptimLoops optim_loops;
}
namespace avx512 {
extern const OptimLoops optim_loops;
}

}  // namespace mtlcore::cpu
