// Fused SGD / Adam / AdamW updates on the CPU: argument checks and the multi-tensor driver.
//
// Layout: every tensor group (param, grad, states at one index) is walked as flat arrays
//   (common/optim_args.h makes non-dense groups dense through copies that are written back).
// Parallel split: all tensors of a call are cut into chunks of kChunk elements and ONE
//   at::parallel_for runs over the chunks of all tensors (threads follow torch.set_num_threads),
//   so many small tensors cost one parallel region, not one per tensor.
// Numerics: the element loops are in optim_kernels.cpp (compiled per ISA, chosen at run time);
//   Adam's bias corrections are computed per tensor in double, as torch.optim does.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_isa.h"
#include "common/optim_args.h"
#include "cpu/optim_kernels.h"

namespace mtlcore::cpu {

namespace {

constexpr int64_t kChunk = 1 << 15;       // elements per work item
constexpr int64_t kMinPerThread = 1 << 15;  // below this a thread costs more than it saves

const OptimLoops& loops() { MTLCORE_ISA_SELECT(optim_loops); }

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Cuts tensors of the given sizes into chunks; one at::parallel_for then runs `fn` on each.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numels, const Fn& fn) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(numels[t], b + kChunk)});
    }
    total += numels[t];
  }
  if (chunks.empty()) return;
  // Grain in chunks: keep at least kMinPerThread elements per thread.
  const int64_t avg = std::max<int64_t>(1, total / static_cast<int64_t>(chunks.size()));
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / avg);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) fn(chunks[c]);
  });
}

std::vector<int64_t> numels_of(const DenseLists& d) {
  std::vector<int64_t> n(d.num_tensors());
  for (size_t i = 0; i < n.size(); ++i) n[i] = d.get(0, i).numel();
  return n;
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
  constexpr const char* op = "mtlcore.sgd_";
  const SgdOptions o{lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step};
  check_sgd_options(o);
  const bool has_momentum = momentum != 0.0;
  std::vector<NamedList> lists = {{"params", params, true},
                                  {"grads", grads, grad_scale.has_value()}};
  if (has_momentum) lists.push_back({"momentum_buffers", momentum_buffers, true});
  const c10::Device device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  check_tensor_lists(op, lists, device, {at::kFloat, at::kDouble});
  check_scaler_tensor(op, "grad_scale", grad_scale, device);
  check_scaler_tensor(op, "found_inf", found_inf, device);
  if (params.empty() || skip_step(found_inf)) return;

  const SgdLoopArgs args{o, grad_scale.has_value(), grad_scale ? scalar_value(*grad_scale) : 1.0};
  DenseLists d(lists);
  const auto run = [&](auto tag, auto loop) {
    using T = decltype(tag);
    for_each_chunk(numels_of(d), [&](const Chunk& c) {
      const size_t i = static_cast<size_t>(c.tensor);
      T* buf = has_momentum ? ptr<T>(d, 2, i) + c.begin : nullptr;
      loop(ptr<T>(d, 0, i) + c.begin, ptr<T>(d, 1, i) + c.begin, buf, c.end - c.begin, args);
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
  const AdamOptions o{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                      decoupled_weight_decay};
  check_adam_options(o);
  std::vector<NamedList> lists = {{"params", params, true},
                                  {"grads", grads, grad_scale.has_value()},
                                  {"exp_avgs", exp_avgs, true},
                                  {"exp_avg_sqs", exp_avg_sqs, true}};
  if (amsgrad) lists.push_back({"max_exp_avg_sqs", max_exp_avg_sqs, true});
  const c10::Device device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  check_tensor_lists(op, lists, device, {at::kFloat, at::kDouble});
  check_state_steps(op, state_steps, params.size(), device);
  check_scaler_tensor(op, "grad_scale", grad_scale, device);
  check_scaler_tensor(op, "found_inf", found_inf, device);
  if (params.empty() || skip_step(found_inf)) return;

  const AdamLoopArgs args{o, grad_scale.has_value(),
                          grad_scale ? scalar_value(*grad_scale) : 1.0};
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
    for_each_chunk(numels_of(d), [&](const Chunk& c) {
      const size_t i = static_cast<size_t>(c.tensor);
      T* vmax = amsgrad ? ptr<T>(d, 4, i) + c.begin : nullptr;
      loop(ptr<T>(d, 0, i) + c.begin, ptr<T>(d, 1, i) + c.begin, ptr<T>(d, 2, i) + c.begin,
           ptr<T>(d, 3, i) + c.begin, vmax, c.end - c.begin, args, per_tensor[i]);
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
