// CUDA kernels of the fused optimizer ops mtlcore::sgd_ and mtlcore::adam_ (schemas in
// csrc/mtlcore.cpp), in place over lists of tensors.
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

namespace mtlcore {

namespace {

using cuda::MtaChunk;
using cuda::MtaTensor;

// ---------------------------------------------------------------------------------------
// Element arithmetic: one rounding per operation, never fused.
// ---------------------------------------------------------------------------------------

// op_add/op_sub/op_mul/op_div(a, b) and op_sqrt(a) for float and double: the round-to-nearest
// intrinsics on the device (no contraction into FMA, IEEE division and square root whatever the
// flags), the plain operators on the host.
#ifdef __CUDA_ARCH__
#define MTLCORE_RN_BINARY(name, op, float_rn, double_rn)             \
  MTLCORE_HD float name(float a, float b) { return float_rn(a, b); } \
  MTLCORE_HD double name(double a, double b) { return double_rn(a, b); }
MTLCORE_HD float op_sqrt(float a) { return __fsqrt_rn(a); }
MTLCORE_HD double op_sqrt(double a) { return __dsqrt_rn(a); }
#else
#define MTLCORE_RN_BINARY(name, op, float_rn, double_rn)     \
  MTLCORE_HD float name(float a, float b) { return a op b; } \
  MTLCORE_HD double name(double a, double b) { return a op b; }
MTLCORE_HD float op_sqrt(float a) { return ::sqrtf(a); }
MTLCORE_HD double op_sqrt(double a) { return ::sqrt(a); }
#endif
MTLCORE_RN_BINARY(op_add, +, __fadd_rn, __dadd_rn)
MTLCORE_RN_BINARY(op_sub, -, __fsub_rn, __dsub_rn)
MTLCORE_RN_BINARY(op_mul, *, __fmul_rn, __dmul_rn)
MTLCORE_RN_BINARY(op_div, /, __fdiv_rn, __ddiv_rn)
#undef MTLCORE_RN_BINARY

// max(vmax, v) that propagates NaN from either side, like torch.maximum (the CPU kernels'
// expression, so ties and NaNs pick the same operand).
template <typename T>
MTLCORE_HD T op_max(T vmax, T v) {
  return (vmax < v || v != v) ? v : vmax;
}

// Reads a one-element step counter: tag 1 = float64, 0 = float32.
constexpr uint8_t kStepFloat = 0;
constexpr uint8_t kStepDouble = 1;
MTLCORE_HD double read_step(const void* p, uint8_t tag) {
  return tag == kStepDouble ? *static_cast<const double*>(p)
                            : static_cast<double>(*static_cast<const float*>(p));
}

// ---------------------------------------------------------------------------------------
// SGD. Arrays: 0 params, 1 grads, 2 momentum_buffers (absent without momentum).
// ---------------------------------------------------------------------------------------

enum SgdMode : int {
  kNoMomentum = 0,    // momentum == 0: buffers unused
  kFirstStep = 1,     // buffers written (b = g), not read
  kMomentumStep = 2,  // buffers read and written
};

template <typename T>
struct SgdScalars {
  T lr;
  T momentum;
  T one_minus_dampening;
  T weight_decay;
  bool has_weight_decay;
  bool nesterov;
  bool maximize;
};

template <typename scalar_t, int kMode, bool kScale>
struct SgdOp {
  using scalar_type = scalar_t;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kDepth = kMode == kNoMomentum ? 2 : 3;
  static constexpr unsigned kRead = kMode == kMomentumStep ? 0b111u : 0b011u;
  static constexpr unsigned kWrite =
      0b001u | (kScale ? 0b010u : 0u) | (kMode != kNoMomentum ? 0b100u : 0u);

  SgdScalars<T> s;
  const float* found_inf;   // may be null
  const float* grad_scale;  // non-null iff kScale

  MTLCORE_HD void operator()(const MtaChunk<scalar_t, kDepth>& c, int tid) const {
    const float inf = found_inf != nullptr ? *found_inf : 0.0f;
    T scale = T(1);
    if constexpr (kScale) scale = static_cast<T>(*grad_scale);
    if (inf != 0.0f) return;
    const SgdScalars<T> k = s;
    cuda::mta_for_each<kRead, kWrite>(c, tid, [&](T(&x)[kDepth]) {
      const T p = x[0];
      T g = x[1];
      if constexpr (kScale) {
        g = op_div(g, scale);
        x[1] = g;
      }
      if (k.maximize) g = -g;
      if (k.has_weight_decay) g = op_add(g, op_mul(p, k.weight_decay));
      if constexpr (kMode != kNoMomentum) {
        T b;
        if constexpr (kMode == kFirstStep) {
          b = g;
        } else {
          b = op_add(op_mul(x[2], k.momentum), op_mul(g, k.one_minus_dampening));
        }
        x[2] = b;
        g = k.nesterov ? op_add(g, op_mul(b, k.momentum)) : b;
      }
      x[0] = op_sub(p, op_mul(g, k.lr));
    });
  }
};

// ---------------------------------------------------------------------------------------
// Adam / AdamW. Arrays: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 max_exp_avg_sqs
// (only with amsgrad). The group's extra pointer is its step counter.
// ---------------------------------------------------------------------------------------

template <typename T>
struct AdamScalars {
  double lr;  // for the per-step scalars (double)
  double beta1;
  double beta2;
  T beta1_t;
  T one_minus_beta1;
  T beta2_t;
  T one_minus_beta2;
  T eps;
  T weight_decay;
  T decay_factor;  // 1 - lr * weight_decay (decoupled weight decay)
  bool has_weight_decay;
  bool decoupled;
  bool maximize;
};

template <typename scalar_t, bool kAmsgrad, bool kScale>
struct AdamOp {
  using scalar_type = scalar_t;
  using T = at::opmath_type<scalar_t>;
  static constexpr int kDepth = kAmsgrad ? 5 : 4;
  static constexpr unsigned kRead = (1u << kDepth) - 1u;
  static constexpr unsigned kWrite =
      0b01101u | (kAmsgrad ? 0b10000u : 0u) | (kScale ? 0b00010u : 0u);

  AdamScalars<T> s;
  const float* found_inf;   // may be null
  const float* grad_scale;  // non-null iff kScale

  MTLCORE_HD void operator()(const MtaChunk<scalar_t, kDepth>& c, int tid) const {
    const float inf = found_inf != nullptr ? *found_inf : 0.0f;
    T scale = T(1);
    if constexpr (kScale) scale = static_cast<T>(*grad_scale);
    const double step = read_step(c.extra, c.extra_tag);
    if (inf != 0.0f) return;
    // The CPU op raises for a step below 1 (bias_correction1 would be 0); here the counter is
    // on the device, so every thread of the block asserts before writing anything.
    CUDA_KERNEL_ASSERT(step >= 1.0 && "mtlcore.adam_: state_steps must be >= 1");
    const AdamScalars<T> k = s;
    const double bias_correction1 = 1.0 - ::pow(k.beta1, step);
    const T step_size = static_cast<T>(k.lr / bias_correction1);
    const T bias_correction2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(k.beta2, step)));
    cuda::mta_for_each<kRead, kWrite>(c, tid, [&](T(&x)[kDepth]) {
      T p = x[0];
      T g = x[1];
      if constexpr (kScale) {
        g = op_div(g, scale);
        x[1] = g;
      }
      if (k.maximize) g = -g;
      if (k.has_weight_decay) {
        if (k.decoupled) {
          p = op_mul(p, k.decay_factor);
        } else {
          g = op_add(g, op_mul(p, k.weight_decay));
        }
      }
      const T m = op_add(op_mul(x[2], k.beta1_t), op_mul(g, k.one_minus_beta1));
      const T v = op_add(op_mul(x[3], k.beta2_t), op_mul(op_mul(g, g), k.one_minus_beta2));
      T denom;
      if constexpr (kAmsgrad) {
        const T vmax = op_max(x[4], v);
        x[4] = vmax;
        denom = op_add(op_div(op_sqrt(vmax), bias_correction2_sqrt), k.eps);
      } else {
        denom = op_add(op_div(op_sqrt(v), bias_correction2_sqrt), k.eps);
      }
      x[0] = op_sub(p, op_div(op_mul(step_size, m), denom));
      x[2] = m;
      x[3] = v;
    });
  }
};

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "mtlcore.sgd_",
                                  [&] {
                                    using T = at::opmath_type<scalar_t>;
                                    const SgdScalars<T> s{static_cast<T>(lr),
                                                          static_cast<T>(momentum),
                                                          static_cast<T>(1.0 - dampening),
                                                          static_cast<T>(weight_decay),
                                                          weight_decay != 0.0,
                                                          nesterov,
                                                          maximize};
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "mtlcore.adam_", [&] {
                                    using T = at::opmath_type<scalar_t>;
                                    const AdamScalars<T> s{lr,
                                                           beta1,
                                                           beta2,
                                                           static_cast<T>(beta1),
                                                           static_cast<T>(1.0 - beta1),
                                                           static_cast<T>(beta2),
                                                           static_cast<T>(1.0 - beta2),
                                                           static_cast<T>(eps),
                                                           static_cast<T>(weight_decay),
                                                           static_cast<T>(1.0 - lr * weight_decay),
                                                           weight_decay != 0.0,
                                                           decoupled_weight_decay,
                                                           maximize};
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
