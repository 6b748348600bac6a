// Fused SGD / Adam / AdamW updates on the CPU: argument checks and the multi-tensor driver.
//
// Layout: every tensor group (param, grad, states at one index) is walked as flat arrays
//   (common/optim_args.h makes non-dense groups dense through copies that are written back).
// Parallel split: all tensors of a call form one virtual array that ONE at::parallel_for splits
//   evenly (in 64-element units) over the threads (torch.set_num_threads governs them); each
//   thread walks its contiguous range tensor by tensor. Many small tensors thus cost one
//   parallel region, not one per tensor, and the threads get equal work whatever the sizes.
// Numerics: the element loops are in optim_kernels.cpp (compiled per ISA, chosen at run time);
//   Adam's bias corrections are computed per tensor in double, as torch.optim does.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "common/optim_args.h"
#include "cpu/optim_kernels.h"

namespace mtlcore::cpu {

namespace {

constexpr int64_t kUnit = 64;               // elements: the split never cuts finer
constexpr int64_t kMinPerThread = 1 << 15;  // below this a thread costs more than it saves

const OptimLoops& loops() { MTLCORE_ISA_SELECT(optim_loops); }

// Calls fn(i, begin, end) on element ranges of tensors i of the dense lists so that every
// element of every tensor is visited once, the ranges spread over the threads.
template <typename Fn>
void for_each_range(const DenseLists& d, const Fn& fn) {
  const size_t n = d.num_tensors();
  std::vector<int64_t> start(n + 1, 0);  // start[i]: offset of tensor i in the virtual array
  for (size_t i = 0; i < n; ++i) start[i + 1] = start[i] + d.get(0, i).numel();
  const int64_t total = start[n];
  if (total == 0) return;
  const int64_t units = (total + kUnit - 1) / kUnit;
  at::parallel_for(0, units, kMinPerThread / kUnit, [&](int64_t lo, int64_t hi) {
    int64_t b = lo * kUnit;
    const int64_t e = std::min(total, hi * kUnit);
    // The tensor holding element b: the last one starting at or before it (empty tensors that
    // start there too are stepped over below).
    const auto first_after = std::upper_bound(start.begin(), start.end(), b);
    size_t i = static_cast<size_t>(first_after - start.begin()) - 1;
    while (b < e) {
      const int64_t stop = std::min(e, start[i + 1]);
      if (stop > b) fn(i, b - start[i], stop - start[i]);
      b = std::max(b, stop);
      ++i;
    }
  });
}

bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && scalar_value(*found_inf) != 0.0;
}

template <typename T>
T* ptr(const DenseLists& d, size_t list, size_t i) {
  return d.get(list, i).data_ptr<T>();
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  const SgdOptions o{lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step};
  const auto lists = check_sgd_args(params, grads, momentum_buffers, o, grad_scale, found_inf,
                                    {at::kFloat, at::kDouble});
  const bool has_momentum = momentum != 0.0;
  if (params.empty() || skip_step(found_inf)) return;

  const SgdLoopArgs args{o, grad_scale.has_value(), grad_scale ? scalar_value(*grad_scale) : 1.0};
  DenseLists d(lists);
  const auto run = [&](auto tag, auto loop) {
    using T = decltype(tag);
    for_each_range(d, [&](size_t i, int64_t b, int64_t e) {
      T* buf = has_momentum ? ptr<T>(d, 2, i) + b : nullptr;
      loop(ptr<T>(d, 0, i) + b, ptr<T>(d, 1, i) + b, buf, e - b, args);
    });
  };
  if (params[0].scalar_type() == at::kFloat) {
    run(float{}, loops().sgd_f32);
  } else {
    run(double{}, loops().sgd_f64);
  }
  d.write_back();
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
              double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "mtlcore.adam_";
  const AdamOptions o{lr,           beta1,   beta2,    eps,
                      weight_decay, amsgrad, maximize, decoupled_weight_decay};
  const auto lists =
      check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, o,
                      grad_scale, found_inf, {at::kFloat, at::kDouble});
  if (params.empty() || skip_step(found_inf)) return;

  const AdamLoopArgs args{o, grad_scale.has_value(), grad_scale ? scalar_value(*grad_scale) : 1.0};
  std::vector<AdamStepScalars> per_tensor(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = scalar_value(state_steps[i]);
    TORCH_CHECK_VALUE(step >= 1.0, op, ": state_steps[", i,
                      "] must be >= 1 (increment it before the update), got ", step);
    per_tensor[i] = {lr / (1 - std::pow(beta1, step)), std::sqrt(1 - std::pow(beta2, step))};
  }
  DenseLists d(lists);
  const auto run = [&](auto tag, auto loop) {
    using T = decltype(tag);
    for_each_range(d, [&](size_t i, int64_t b, int64_t e) {
      T* vmax = amsgrad ? ptr<T>(d, 4, i) + b : nullptr;
      loop(ptr<T>(d, 0, i) + b, ptr<T>(d, 1, i) + b, ptr<T>(d, 2, i) + b, ptr<T>(d, 3, i) + b, vmax,
           e - b, args, per_tensor[i]);
    });
  };
  if (params[0].scalar_type() == at::kFloat) {
    run(float{}, loops().adam_f32);
  } else {
    run(double{}, loops().adam_f64);
  }
  d.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, CPU, m) {
  m.impl("sgd_", &sgd_cpu);
  m.impl("adam_", &adam_cpu);
}

}  // namespace mtlcore::cpu
