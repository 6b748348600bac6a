// mtlcore's operator schemas (the whole API surface of the compiled ops) and the Python module.
//
// Each backend registers its kernels in its own file with TORCH_LIBRARY_IMPL:
//   csrc/cpu/<family>.cpp  (CPU)      csrc/cuda/<family>.cu  (CUDA)
// Fake kernels are registered from Python (python/mtlcore/ops.py), and so is the autograd of
// conv2d_act_with_preact; that of conv2d_act, max_pool2d and multitask_loss is in C++
// (common/*_autograd.cpp).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_isa.h"
#include "cpu/output_cache.h"

TORCH_LIBRARY(mtlcore, m) {
  // act(conv2d(input, weight, bias)) in one pass: the bias and the activation are applied to
  // each output tile before it is stored. padding: (pad_h, pad_w) or (top, bottom, left, right).
  // activation: identity, relu, leaky_relu, gelu, gelu_tanh, silu, sigmoid, tanh. The output is
  // contiguous NCHW. Differentiable (C++ autograd).
  m.def(
      "conv2d_act(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, str activation, float negative_slope) -> Tensor");
  // The same, also returning the pre-activation conv2d(input, weight, bias), which the backward
  // of gelu, gelu_tanh, silu (and leaky_relu with a negative slope) needs; both contiguous.
  m.def(
      "conv2d_act_with_preact(Tensor input, Tensor weight, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, int groups, str activation, float negative_slope) -> "
      "(Tensor output, Tensor preact)");
  // Gradients of conv2d_act. saved is the forward's output, or its pre-activation for the
  // activations that need it. The activation derivative and the bias reduction are fused into
  // the first pass over grad_output. output_mask says which of (grad_input, grad_weight,
  // grad_bias) to compute; the others come back as empty tensors.
  m.def(
      "conv2d_act_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
      "int[] stride, int[] padding, int[] dilation, int groups, str activation, "
      "float negative_slope, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode) without indices
  // (common/max_pool2d_args.h): NaN propagates; the output is channels_last when input is,
  // contiguous NCHW otherwise. Pairs (height, width); padding is at most half the kernel.
  // Differentiable (C++ autograd).
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");
  // Gradient of max_pool2d: each window's grad_output goes to the element F.max_pool2d's
  // indices would name (the first maximum, or the last NaN), found again from input (no
  // indices are saved); overlapping windows add up in window order. grad_input has input's
  // shape and the forward output's layout.
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor input, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  // All T task losses of a multi-task model in one call (kinds: ce, bce, mse, l1; see
  // common/multitask_loss_args.h): per_task[i] is task i's mean loss over its valid elements
  // (0 when it has none) and total = sum_i w_i L_i + sum_ij R_ij L_i L_j (weights default to
  // ones, relation to zero). total and per_task are float32 (float64 for float64 logits).
  // Differentiable (C++ autograd): the gradient is computed in the forward pass.
  m.def(
      "multitask_loss(Tensor[] logits, Tensor[] targets, str[] kinds, Tensor? weights, "
      "Tensor? relation, int ignore_index, float label_smoothing) -> "
      "(Tensor total, Tensor per_task)");
  // The same, also returning what backward needs: grads[i] (contiguous, logits' dtype),
  // computed in the same pass as the loss, and grad_scale[i], with
  // grads[i] / grad_scale[i] = d per_task[i] / d logits[i] (grad_scale[i] = 0 when task i has
  // no valid label). On the CPU grads[i] is already d total / d logits[i] when every label of
  // task i is present (grad_scale[i] = w_i; grads[i] is the gradient of the summed loss times
  // w_i / positions_i); on CUDA it is the gradient of the summed loss (grad_scale[i] = count).
  m.def(
      "multitask_loss_with_grad(Tensor[] logits, Tensor[] targets, str[] kinds, Tensor? weights, "
      "Tensor? relation, int ignore_index, float label_smoothing) -> "
      "(Tensor total, Tensor per_task, Tensor grad_scale, Tensor[] grads)");
  // Gradients of multitask_loss from those of total ([]) and per_task ([T]), either may be
  // absent. Only scales the forward's gradients: grad_logits[i] = coef_i * grads[i] with
  // coef_i = (grad_total * (w_i + sum_j (R_ij + R_ji) L_j) + grad_per_task_i) / grad_scale_i
  // (0 when grad_scale_i is 0);
  // grad_weights = grad_total * L, grad_relation = grad_total * L L^T. output_mask says which
  // of (grad_logits, grad_weights, grad_relation) to compute; the others come back empty.
  m.def(
      "multitask_loss_backward(Tensor? grad_total, Tensor? grad_per_task, Tensor per_task, "
      "Tensor grad_scale, Tensor[] grads, Tensor? weights, Tensor? relation, "
      "bool[3] output_mask) -> (Tensor[] grad_logits, Tensor grad_weights, "
      "Tensor grad_relation)");
  // multitask_loss_backward's scaling done in place on grads (the forward's gradients become
  // those of the logits): what the autograd node uses when the graph is not kept, saving an
  // allocation and a pass over fresh memory. A task whose coefficient is 1 is not touched.
  m.def(
      "multitask_loss_backward_(Tensor? grad_total, Tensor? grad_per_task, Tensor per_task, "
      "Tensor grad_scale, Tensor(a!)[] grads, Tensor? weights, Tensor? relation) -> ()");
  // Fused SGD update (torch.optim.SGD arithmetic) over lists of tensors, in place.
  // grads are written (divided by grad_scale) only when grad_scale is given, as torch's fused
  // optimizers do; with momentum == 0, momentum_buffers may be empty.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "float lr, float momentum=0., float dampening=0., float weight_decay=0., "
      "bool nesterov=False, bool maximize=False, bool is_first_step=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Fused Adam / AdamW update (torch.optim.Adam / AdamW arithmetic), in place. state_steps[i]
  // holds the step count including this update (callers increment it first, as torch does).
  // max_exp_avg_sqs is read and written only with amsgrad (may be empty otherwise).
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor[] state_steps, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay=0., "
      "bool amsgrad=False, bool maximize=False, bool decoupled_weight_decay=False, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = MTLCORE_VERSION;
  d["torch"] = MTLCORE_TORCH_VERSION;
#ifdef MTLCORE_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = MTLCORE_CUDA_ARCHS;
  d["cpu_isa"] = mtlcore::cpu_isa_name(mtlcore::cpu_isa());
  d["cpu_isa_supported"] = mtlcore::cpu_isa_name(mtlcore::cpu_isa_supported());
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["threads"] = at::get_num_threads();
  d["sanitize"] = MTLCORE_SANITIZE;  // compiler sanitizers of this build ("" for none)
  return d;
}

pybind11::dict cpu_cache_stats() {
  const mtlcore::cpu::OutputCacheStats s = mtlcore::cpu::output_cache_stats();
  pybind11::dict d;
  d["limit_bytes"] = s.limit_bytes;
  d["cached_bytes"] = s.cached_bytes;
  d["cached_blocks"] = s.cached_blocks;
  d["allocated_bytes"] = s.allocated_bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtlcore's compiled kernels; the ops are in torch.ops.mtlcore";
  m.def("build_info", &build_info, "How this extension was built and which CPU path it uses.");
  m.def("cpu_cache_stats", &cpu_cache_stats, "The CPU output cache's counters.");
  m.def("empty_cpu_cache", &mtlcore::cpu::empty_output_cache,
        "Frees the memory the CPU output cache keeps.");
  m.def("set_cpu_cache_limit", &mtlcore::cpu::set_output_cache_limit, pybind11::arg("bytes"),
        "Sets the most bytes the CPU output cache keeps (0 turns it off).");
}
