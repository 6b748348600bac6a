// CUDA kernels of mtlcore::multitask_loss, multitask_loss_with_grad and multitask_loss_backward
// (schemas in csrc/mtlcore.cpp): T task losses (ce, bce, mse, l1) in one pass, coupled by the
// weights and the relation matrix, and the scaling of their gradients in the backward. The
// device code and the work-list planning are in multitask_loss_kernels.cuh (which
// tests/host/multitask_loss_host.cpp also runs on the host); this file is the ATen side.
//
// Data layout. The shared argument checks (common/multitask_loss_args.h) describe task i by a
// TaskView: B items of C x S elements read through the item strides logits_stride and
// target_stride: ce element (b, c, s) at b * logits_stride + c * S + s and its int64 target at
// b * target_stride + s; bce/mse/l1 element (b, j) at b * logits_stride + j, target at
// b * target_stride + j (S = 1). Gradients are new contiguous tensors: element (b, c, s) at
// b * C * S + c * S + s. Every element offset is 64-bit.
//
// Parallel split. The host cuts every task into work items of about kWorkElements elements (a
// count fixed here, the same on every device) and uploads the TaskViews, each task's first work
// item and the work list with one asynchronous copy from pinned memory. One launch then runs a
// block of kThreads threads per work item, whatever the tasks' kinds:
//   ce, S > 1, or S == 1 with C <= kThreadRowMaxClasses: a thread per position (b, s),
//     consecutive threads on consecutive s (coalesced), each looping over the C classes;
//   ce, S == 1, C <= kWarpRowMaxClasses: a warp per row [C], lanes strided over the classes;
//   ce, S == 1, larger C: the whole block per row;
//   bce, mse, l1: the threads strided over the item's elements.
// Softmax takes one pass over the logits, keeping an online state (running max, sum of exp
// rescaled to that max, sum of the logits) merged across lanes and warps by shuffles in a fixed
// tree; a second pass re-reads the logits and writes each gradient element once. Each block
// stores its (sum of losses, count of valid positions) in a workspace slot of its own; a
// one-block launch then adds each task's slots in work-list order and computes per_task,
// grad_scale and total on the device. The backward is one launch over a work list of the
// gradients' elements: each block computes its task's coefficient from the device tensors (no
// host synchronisation) and scales its elements (16-byte vector accesses when aligned); a
// one-block launch writes grad_weights and grad_relation. No atomics: every sum is taken in an
// order fixed by the shapes, so results are bitwise identical from run to run. Launches go to
// the current stream of the logits' (per_task's) device.
//
// Numerics. Logits, and half/bfloat16 targets, are converted to float (double for double logits)
// on load; all loss and gradient math is done in that type with its exp/log/log1p, and the
// gradients are rounded once to the logits' dtype on store. No attempt is made to match the CPU
// kernels bit for bit (the device's exp and log differ from the host's), but the expressions
// are theirs: 1 - eps and eps / C in the math type, softmax as exp(x - max) * (1 / sum). Losses
// are summed in double (per thread, then per block, then per task). L_i = sum / count and
// grad_scale = count (grads[i] / grad_scale[i] = d L_i / d logits[i]: the gradients here are
// unscaled, mse's also without its factor 2, which makes its grad_scale count / 2, since
// 2 (x - y) would overflow half precision from |x - y| > 32752 on; the CPU forward pre-scales
// its own) are computed in double and rounded to the loss dtype; total is computed in double
// from the unrounded L. Backward: coef_i is computed in double, rounded to the gradient's
// op-math type and multiplied by the gradient, which is rounded once.
// A ce label outside [0, C) (and not ignore_index) trips a device-side assertion
// (CUDA_KERNEL_ASSERT, as torch's nll_loss does) at the end of the block that read it; the
// position is skipped (gradient 0), never read out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/multitask_loss_args.h"
#include "cuda/multitask_loss_kernels.cuh"

namespace mtlcore {

namespace {

using namespace cuda;  // NOLINT(google-build-using-namespace)

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

const std::vector<at::ScalarType>& cuda_dtypes() {
  static const std::vector<at::ScalarType> d{at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  return d;
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

// Bytes of one host array to upload.
struct HostPart {
  const void* data;
  size_t bytes;
};

template <typename V>
HostPart host_part(const std::vector<V>& v) {
  static_assert(std::is_trivially_copyable_v<V>);
  return {v.data(), v.size() * sizeof(V)};
}

// The host arrays `parts` in one device buffer, each at a kUploadAlign-aligned offset, copied
// with one asynchronous copy from pinned memory on the current stream (the copy keeps the
// pinned block from reuse until it is done). offsets[k] receives where part k starts.
at::Tensor upload(const std::vector<HostPart>& parts, c10::Device device,
                  std::vector<size_t>& offsets) {
  offsets.clear();
  size_t bytes = 0;
  for (const HostPart& part : parts) {
    offsets.push_back(bytes);
    bytes += (part.bytes + kUploadAlign - 1) / kUploadAlign * kUploadAlign;
  }
  const int64_t size = static_cast<int64_t>(std::max<size_t>(bytes, 1));
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* host_bytes = static_cast<uint8_t*>(host.mutable_data_ptr());
  for (size_t k = 0; k < parts.size(); ++k) {
    if (parts[k].bytes > 0) std::memcpy(host_bytes + offsets[k], parts[k].data, parts[k].bytes);
  }
  return host.to(at::TensorOptions().dtype(at::kByte).device(device), /*non_blocking=*/true);
}

template <typename V>
const V* uploaded(const at::Tensor& buffer, size_t offset) {
  return reinterpret_cast<const V*>(static_cast<const uint8_t*>(buffer.const_data_ptr()) + offset);
}

struct ForwardOutputs {
  at::Tensor total;
  at::Tensor per_task;
  at::Tensor grad_scale;
  std::vector<at::Tensor> grads;
};

ForwardOutputs multitask_loss_forward_cuda(const char* op, at::TensorList logits,
                                           at::TensorList targets,
                                           const std::vector<std::string>& kinds,
                                           const std::optional<at::Tensor>& weights,
                                           const std::optional<at::Tensor>& relation,
                                           int64_t ignore_index, double label_smoothing,
                                           bool with_grad) {
  const MultitaskLossProblem problem = check_multitask_loss_args(
      op, logits, targets, kinds, weights, relation, ignore_index, label_smoothing, cuda_dtypes());
  const c10::Device device = logits[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": the CUDA kernel got logits on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();

  ForwardOutputs out;
  if (with_grad) out.grads = problem.new_grads(logits);
  const std::vector<TaskView> views = problem.views(out.grads);
  const int64_t num_tasks = static_cast<int64_t>(views.size());

  const WorkList list = plan_work(views);
  const int64_t num_work = static_cast<int64_t>(list.work.size());
  TORCH_CHECK_VALUE(num_work <= std::numeric_limits<int32_t>::max(), op,
                    ": too many elements for the CUDA kernel");

  std::vector<size_t> offsets;
  const at::Tensor meta =
      upload({host_part(views), host_part(list.first_item), host_part(list.work)}, device, offsets);

  const at::TensorOptions loss_options = logits[0].options().dtype(problem.loss_dtype);
  out.total = at::empty({}, loss_options);
  out.per_task = at::empty({num_tasks}, loss_options);
  out.grad_scale = at::empty({num_tasks}, loss_options);
  const at::Tensor partial_loss = at::empty({num_work}, loss_options.dtype(at::kDouble));
  const at::Tensor partial_count = at::empty({num_work}, loss_options.dtype(at::kLong));
  const at::Tensor task_loss = at::empty({num_tasks}, loss_options.dtype(at::kDouble));
  const at::Tensor w = problem.weights.value_or(at::Tensor());
  const at::Tensor r = problem.relation.value_or(at::Tensor());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, problem.dtype, "mtlcore.multitask_loss", [&] {
        using Acc = at::opmath_type<scalar_t>;
        if (num_work > 0) {
          const auto smoothing = static_cast<Acc>(problem.label_smoothing);
          const CeParams<Acc> ce{problem.ignore_index, smoothing, Acc(1) - smoothing};
          multitask_loss_kernel<scalar_t><<<static_cast<unsigned>(num_work), kThreads, 0, stream>>>(
              uploaded<TaskView>(meta, offsets[0]), uploaded<WorkItem>(meta, offsets[2]), ce,
              partial_loss.mutable_data_ptr<double>(), partial_count.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // Also with no work at all: every output gets defined.
        finalize_kernel<Acc><<<1, kThreads, 0, stream>>>(
            uploaded<int64_t>(meta, offsets[1]), partial_loss.const_data_ptr<double>(),
            partial_count.const_data_ptr<int64_t>(), num_tasks, data_or_null<Acc>(w),
            data_or_null<Acc>(r), uploaded<TaskView>(meta, offsets[0]),
            task_loss.mutable_data_ptr<double>(), out.per_task.mutable_data_ptr<Acc>(),
            out.grad_scale.mutable_data_ptr<Acc>(), out.total.mutable_data_ptr<Acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

// grad_logits[i] = coef_i * grads[i] for the tasks whose gradient has dtype `dtype` and
// elements: one upload and one launch.
template <typename LossT>
void scale_grads(at::ScalarType dtype, at::TensorList grads,
                 const std::vector<at::Tensor>& grad_logits, const CouplingArgs<LossT>& coupling,
                 c10::Device device, const at::cuda::CUDAStream& stream) {
  std::vector<ScaleTask> tasks(grads.size(), ScaleTask{nullptr, nullptr, false});
  std::vector<ScaleWork> work;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t numel = grads[i].numel();
    if (numel == 0 || grads[i].scalar_type() != dtype) continue;
    tasks[i] = scale_task(grads[i].const_data_ptr(), grad_logits[i].mutable_data_ptr());
    append_scale_work(static_cast<int64_t>(i), numel, work);
  }
  TORCH_CHECK_VALUE(work.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
                    "mtlcore.multitask_loss_backward: too many elements for the CUDA kernel");
  std::vector<size_t> offsets;
  const at::Tensor meta = upload({host_part(tasks), host_part(work)}, device, offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "mtlcore.multitask_loss_backward", [&] {
        scale_grads_kernel<scalar_t, LossT>
            <<<static_cast<unsigned>(work.size()), kThreads, 0, stream>>>(
                uploaded<ScaleTask>(meta, offsets[0]), uploaded<ScaleWork>(meta, offsets[1]),
                coupling);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

template <typename LossT>
void multitask_loss_backward_typed(const CouplingArgs<LossT>& coupling, at::TensorList grads,
                                   const std::vector<at::Tensor>& grad_logits, bool want_logits,
                                   LossT* grad_weights, LossT* grad_relation, c10::Device device,
                                   const at::cuda::CUDAStream& stream) {
  if (want_logits) {
    // The forward writes every gradient in the logits' dtype: normally one group, one launch.
    std::vector<at::ScalarType> dtypes;
    for (const at::Tensor& g : grads) {
      if (g.numel() > 0 &&
          std::find(dtypes.begin(), dtypes.end(), g.scalar_type()) == dtypes.end()) {
        dtypes.push_back(g.scalar_type());
      }
    }
    for (at::ScalarType dtype : dtypes) {
      scale_grads(dtype, grads, grad_logits, coupling, device, stream);
    }
  }
  if (coupling.grad_total != nullptr && (grad_weights != nullptr || grad_relation != nullptr)) {
    coupling_grads_kernel<LossT><<<1, kThreads, 0, stream>>>(
        coupling.num_tasks, coupling.grad_total, coupling.per_task, grad_weights, grad_relation);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multitask_loss_cuda(
    at::TensorList logits, at::TensorList targets, const std::vector<std::string>& kinds,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    int64_t ignore_index, double label_smoothing) {
  ForwardOutputs out =
      multitask_loss_forward_cuda("mtlcore.multitask_loss", logits, targets, kinds, weights,
                                  relation, ignore_index, label_smoothing, /*with_grad=*/false);
  return {out.total, out.per_task};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>
multitask_loss_with_grad_cuda(at::TensorList logits, at::TensorList targets,
                              const std::vector<std::string>& kinds,
                              const std::optional<at::Tensor>& weights,
                              const std::optional<at::Tensor>& relation, int64_t ignore_index,
                              double label_smoothing) {
  ForwardOutputs out =
      multitask_loss_forward_cuda("mtlcore.multitask_loss_with_grad", logits, targets, kinds,
                                  weights, relation, ignore_index, label_smoothing,
                                  /*with_grad=*/true);
  return {out.total, out.per_task, out.grad_scale, std::move(out.grads)};
}

namespace {

// The backward's kernels, writing grad_logits (when want_logits; they may be the grads
// themselves: the scaling is element-wise) and the coupling gradients (undefined: not wanted).
void backward_into(const char* op, const std::optional<at::Tensor>& grad_total,
                   const std::optional<at::Tensor>& grad_per_task, const at::Tensor& per_task,
                   const at::Tensor& grad_scale, at::TensorList grads,
                   const std::optional<at::Tensor>& weights,
                   const std::optional<at::Tensor>& relation,
                   const std::vector<at::Tensor>& grad_logits, bool want_logits,
                   at::Tensor& grad_weights, at::Tensor& grad_relation) {
  check_multitask_loss_backward_args(op, grad_total, grad_per_task, per_task, grad_scale, grads,
                                     weights, relation);
  TORCH_CHECK_VALUE(per_task.is_cuda(), op, ": the CUDA kernel got per_task on ",
                    per_task.device());
  const c10::cuda::CUDAGuard guard(per_task.device());
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  const int64_t num_tasks = per_task.size(0);
  const at::ScalarType loss_dtype = per_task.scalar_type();
  // Without grad_total the coupling gradients are zero.
  const bool coupled = has(grad_total);
  for (at::Tensor* g : {&grad_weights, &grad_relation}) {
    if (g->defined() && !coupled) g->zero_();
  }

  const at::Tensor loss = per_task.contiguous();
  const at::Tensor scale = grad_scale.contiguous();
  const at::Tensor g_per_task = has(grad_per_task) ? grad_per_task->contiguous() : at::Tensor();
  const at::Tensor w = has(weights) ? weights->to(loss_dtype).contiguous() : at::Tensor();
  const at::Tensor r = has(relation) ? relation->to(loss_dtype).contiguous() : at::Tensor();
  const at::Tensor g_total = coupled ? *grad_total : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(loss_dtype, "mtlcore.multitask_loss_backward", [&] {
    using LossT = scalar_t;
    const CouplingArgs<LossT> coupling{num_tasks,
                                       data_or_null<LossT>(loss),
                                       data_or_null<LossT>(scale),
                                       data_or_null<LossT>(g_total),
                                       data_or_null<LossT>(g_per_task),
                                       data_or_null<LossT>(w),
                                       data_or_null<LossT>(r)};
    multitask_loss_backward_typed<LossT>(
        coupling, grads, grad_logits, want_logits,
        grad_weights.defined() && coupled ? grad_weights.mutable_data_ptr<LossT>() : nullptr,
        grad_relation.defined() && coupled ? grad_relation.mutable_data_ptr<LossT>() : nullptr,
        per_task.device(), stream);
  });
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multitask_loss_backward_cuda(
    const std::optional<at::Tensor>& grad_total, const std::optional<at::Tensor>& grad_per_task,
    const at::Tensor& per_task, const at::Tensor& grad_scale, at::TensorList grads,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    std::array<bool, 3> output_mask) {
  const auto [want_logits, want_weights, want_relation] = output_mask;
  const int64_t num_tasks = per_task.dim() == 1 ? per_task.size(0) : 0;
  const at::TensorOptions loss_options = per_task.options();
  // Gradients not asked for come back as empty tensors.
  std::vector<at::Tensor> grad_logits;
  grad_logits.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    grad_logits.push_back(want_logits ? at::empty(g.sizes(), g.options())
                                      : at::empty({0}, g.options()));
  }
  using Shape = std::vector<int64_t>;
  at::Tensor grad_weights = at::empty(want_weights ? Shape{num_tasks} : Shape{0}, loss_options);
  at::Tensor grad_relation =
      at::empty(want_relation ? Shape{num_tasks, num_tasks} : Shape{0}, loss_options);
  at::Tensor no_weights, no_relation;
  backward_into("mtlcore.multitask_loss_backward", grad_total, grad_per_task, per_task, grad_scale,
                grads, weights, relation, grad_logits, want_logits,
                want_weights ? grad_weights : no_weights,
                want_relation ? grad_relation : no_relation);
  return {std::move(grad_logits), grad_weights, grad_relation};
}

void multitask_loss_backward_inplace_cuda(const std::optional<at::Tensor>& grad_total,
                                          const std::optional<at::Tensor>& grad_per_task,
                                          const at::Tensor& per_task, const at::Tensor& grad_scale,
                                          at::TensorList grads,
                                          const std::optional<at::Tensor>& weights,
                                          const std::optional<at::Tensor>& relation) {
  const std::vector<at::Tensor> in_place(grads.begin(), grads.end());
  at::Tensor no_weights, no_relation;
  backward_into("mtlcore.multitask_loss_backward_", grad_total, grad_per_task, per_task, grad_scale,
                grads, weights, relation, in_place, true, no_weights, no_relation);
}

}  // namespace mtlcore

TORCH_LIBRARY_IMPL(mtlcore, CUDA, m) {
  m.impl("multitask_loss", &mtlcore::multitask_loss_cuda);
  m.impl("multitask_loss_with_grad", &mtlcore::multitask_loss_with_grad_cuda);
  m.impl("multitask_loss_backward", &mtlcore::multitask_loss_backward_cuda);
  m.impl("multitask_loss_backward_", &mtlcore::multitask_loss_backward_inplace_cuda);
}
