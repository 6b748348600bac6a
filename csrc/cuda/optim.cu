// CUDA kernels of the fused optimizer ops mtlcore::sgd_ and mtlcore::adam_ (schemas in
// csrc/mtlcore.cpp), in place over lists of tensors. The element functors (SgdOp, AdamOp) and
// their scalars are in optim_ops.cuh, which tests/host/optim_host.cu also runs on the host.
//
// Data layout. The argument checks and DenseLists (common/optim_args.h) turn index i of the
// op's lists into dense arrays laid out alike (contiguous copies, written back at the end,
// for the rare group that is not), so element k of params[i] pairs with element k of
// grads[i] and of each state. All tensors of a call share one dtype (checked) and run
// through multi_tensor_apply (see multi_tensor_apply.cuh); empty tensors are skipped.
//
// Parallel split. One CUDA block per (group, 64K-element chunk), 512 threads striding over
// the chunk's elements with 16-byte vector accesses; one launch covers many groups. The
// GradScaler tensors (found_inf, grad_scale: one float32 element each) and Adam's step
// counters (float32 or float64, one per group, carried as the group's extra pointer) are
// read by each block from device memory: no host synchronisation. When found_inf is nonzero
// every block returns before writing anything, so nothing at all changes. A step counter
// below 1 (or NaN), which the CPU op rejects, trips a device-side assertion (reported at the
// next synchronisation) before its block writes anything.
//
// Numerics. Element math is done in the op-math type T (float for float, half and bfloat16;
// double for double), loading converts to T and storing rounds back to the dtype. Every
// operation is rounded on its own in the documented order (round-to-nearest intrinsics: no
// FMA contraction, IEEE division and square root even under fast-math flags), the
// evaluation the CPU kernels use (built with -ffp-contract=off). Hyper-parameter expressions
// such as 1 - dampening, 1 - lr * weight_decay and 1 - beta are computed in double on the
// host, then cast to T; Adam's bias corrections are computed in double, by each thread once
// per block, from the group's step s:
//   bias_correction1 = 1 - beta1^s, step_size = lr / bias_correction1,
//   bias_correction2_sqrt = sqrt(1 - beta2^s),
// and cast to T (device pow may differ from the host's in the last bit of the double).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "common/optim_args.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/optim_ops.cuh"

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

// Indices of the tensors with elements: the kernels skip empty ones.
std::vector<size_t> nonempty(at::TensorList params) {
  std::vector<size_t> idx;
  idx.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() > 0) idx.push_back(i);
  }
  return idx;
}

// Runs op over groups `idx` of the dense lists (list d = array d of the op); `steps`, when
// not empty, gives each group's step counter.
template <typename Op>
void run_op(const DenseLists& dense, const std::vector<size_t>& idx, const Op& op,
            at::TensorList steps) {
  constexpr int D = Op::kDepth;
  std::vector<MtaTensor<D>> groups;
  groups.reserve(idx.size());
  for (size_t i : idx) {
    MtaTensor<D> g{};
    for (int d = 0; d < D; ++d) {
      const at::Tensor& t = dense.get(static_cast<size_t>(d), i);
      g.ptr[d] =
          ((Op::kWrite >> d) & 1u) ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    }
    g.numel = dense.get(0, i).numel();
    if (!steps.empty()) {
      g.extra = steps[i].const_data_ptr();
      g.extra_tag = steps[i].scalar_type() == at::kDouble ? kStepDouble : kStepFloat;
    }
    groups.push_back(g);
  }
  cuda::multi_tensor_apply<typename Op::scalar_type, D>(groups, op);
}

const float* optional_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

template <typename scalar_t, int kMode>
void run_sgd(const DenseLists& dense, const std::vector<size_t>& idx,
             const SgdScalars<at::opmath_type<scalar_t>>& s, const float* found_inf,
             const float* grad_scale) {
  if (grad_scale != nullptr) {
    run_op(dense, idx, SgdOp<scalar_t, kMode, true>{s, found_inf, grad_scale}, {});
  } else {
    run_op(dense, idx, SgdOp<scalar_t, kMode, false>{s, found_inf, nullptr}, {});
  }
}

template <typename scalar_t, bool kAmsgrad>
void run_adam(const DenseLists& dense, const std::vector<size_t>& idx,
              const AdamScalars<at::opmath_type<scalar_t>>& s, const float* found_inf,
              const float* grad_scale, at::TensorList steps) {
  if (grad_scale != nullptr) {
    run_op(dense, idx, AdamOp<scalar_t, kAmsgrad, true>{s, found_inf, grad_scale}, steps);
  } else {
    run_op(dense, idx, AdamOp<scalar_t, kAmsgrad, false>{s, found_inf, nullptr}, steps);
  }
}

}  // namespace

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const auto lists = check_sgd_args(
      params, grads, momentum_buffers,
      SgdOptions{lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step},
      grad_scale, found_inf, cuda_dtypes());
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "mtlcore.sgd_: the CUDA kernel got parameters on ", device);
  const bool use_momentum = momentum != 0.0;

  const std::vector<size_t> idx = nonempty(params);
  if (idx.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  DenseLists dense(lists);
  const float* fi = optional_float_ptr(found_inf);
  const float* gs = optional_float_ptr(grad_scale);
  const int mode = !use_momentum ? kNoMomentum : is_first_step ? kFirstStep : kMomentumStep;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "mtlcore.sgd_", [&] {
        using T = at::opmath_type<scalar_t>;
        const SgdScalars<T> s =
            sgd_scalars<T>(lr, momentum, dampening, weight_decay, nesterov, maximize);
        switch (mode) {
          case kNoMomentum:
            run_sgd<scalar_t, kNoMomentum>(dense, idx, s, fi, gs);
            break;
          case kFirstStep:
            run_sgd<scalar_t, kFirstStep>(dense, idx, s, fi, gs);
            break;
          default:
            run_sgd<scalar_t, kMomentumStep>(dense, idx, s, fi, gs);
            break;
        }
      });
  dense.write_back();
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  const auto lists = check_adam_args(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
      AdamOptions{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
      grad_scale, found_inf, cuda_dtypes());
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "mtlcore.adam_: the CUDA kernel got parameters on ", device);

  const std::vector<size_t> idx = nonempty(params);
  if (idx.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  DenseLists dense(lists);
  const float* fi = optional_float_ptr(found_inf);
  const float* gs = optional_float_ptr(grad_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "mtlcore.adam_", [&] {
        using T = at::opmath_type<scalar_t>;
        const AdamScalars<T> s =
            adam_scalars<T>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize);
        if (amsgrad) {
          run_adam<scalar_t, true>(dense, idx, s, fi, gs, state_steps);
        } else {
          run_adam<scalar_t, false>(dense, idx, s, fi, gs, state_steps);
        }
      });
  dense.write_back();
}

}  // namespace mtlcore

TORCH_LIBRARY_IMPL(mtlcore, CUDA, m) {
  m.impl("sgd_", &mtlcore::sgd_cuda);
  m.impl("adam_", &mtlcore::adam_cuda);
}
