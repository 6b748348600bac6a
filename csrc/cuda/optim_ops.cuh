// The element functors of mtlcore::sgd_ and mtlcore::adam_'s CUDA kernels (csrc/cuda/optim.cu,
// whose header describes the layout, the parallel split and the numerics): the per-element
// arithmetic, SgdOp and AdamOp as multi_tensor_apply runs them, and how the host derives their
// scalars from the op's arguments. Kept apart from the ATen host code so that
// tests/host/optim_host.cu can run them, unmodified, on the host.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "cuda/multi_tensor_apply.cuh"

namespace mtlcore::cuda {
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
    mta_for_each<kRead, kWrite>(c, tid, [&](T(&x)[kDepth]) {
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
    mta_for_each<kRead, kWrite>(c, tid, [&](T(&x)[kDepth]) {
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

// The functors' scalars from the op's arguments: 1 - dampening, 1 - beta and
// 1 - lr * weight_decay in double, then everything cast to T.
template <typename T>
SgdScalars<T> sgd_scalars(double lr, double momentum, double dampening, double weight_decay,
                          bool nesterov, bool maximize) {
  return {static_cast<T>(lr),
          static_cast<T>(momentum),
          static_cast<T>(1.0 - dampening),
          static_cast<T>(weight_decay),
          weight_decay != 0.0,
          nesterov,
          maximize};
}

template <typename T>
AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled_weight_decay, bool maximize) {
  return {lr,
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
}

}  // namespace mtlcore::cuda
