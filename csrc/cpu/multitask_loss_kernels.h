// Loops of mtlcore.multitask_loss on the CPU, one table per instruction set.
//
// multitask_loss_kernels.cpp is compiled once per ISA (base, avx2, avx512) into namespace
// mtlcore::cpu::<isa>; csrc/cpu/multitask_loss.cpp picks the table with MTLCORE_ISA_SELECT,
// cuts every task into work items and runs them on the threads.
#pragma once

#include <cstdint>

#include "common/multitask_loss_args.h"

namespace mtlcore::cpu {

// A rectangle of one task: items [b0, b1) by positions [s0, s1) (ce: pixels, S == 1 for
// [B, C] logits; bce/mse/l1: elements of a row).
struct LossWork {
  int64_t b0, b1, s0, s1;
};

struct LossOptions {
  int64_t ignore_index;
  double label_smoothing;
};

// What one work item contributes: the sum of its losses (in double) and its number of valid
// elements. A ce label outside [0, C) that is not ignore_index stops the item and is reported.
struct LossPartial {
  double sum = 0.0;
  int64_t count = 0;
  bool bad_label = false;
  int64_t label = 0;     // the bad label ...
  int64_t position = 0;  // ... and its flat index in the targets
};

// Computes the losses of one work item and, when v.grad is set, the gradient of the summed
// loss at the same positions times v.grad_factor (zero where the label is missing).
using LossLoop = LossPartial (*)(const TaskView& v, const LossWork& w, const LossOptions& o);
// out[k] = grad[k] * coef for k < n, in the gradient's dtype (math in float, double for double).
using ScaleLoop = void (*)(const void* grad, void* out, int64_t n, double coef);

// Indexed [kind][dtype][target variant]; dtype: 0 float, 1 double, 2 half, 3 bfloat16;
// target variant 1: bce/mse/l1 targets in float32 rather than the logits' dtype.
struct MultitaskLossLoops {
  LossLoop loss[4][4][2];
  ScaleLoop scale[4];
};

namespace base {
extern const MultitaskLossLoops multitask_loss_loops;
}
namespace avx2 {
extern const MultitaskLossLoops multitask_loss_loops;
}
namespace avx512 {
extern const MultitaskLossLoops multitask_loss_loops;
}

}  // namespace mtlcore::cpu
