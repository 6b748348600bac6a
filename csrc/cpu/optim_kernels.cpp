// Fused SGD and Adam element loops (CPU), compiled once per instruction set.
//
// Layout: each call updates one flat chunk: param, grad and state arrays of n elements that
//   are laid out identically (csrc/common/optim_args.h prepares them).
// Parallel split: none here; csrc/cpu/optim.cpp splits all tensors of a call into chunks and
//   spreads the chunks over threads with at::parallel_for.
// Vectorisation: the loops are branch-free in the element index (flags are template
//   parameters) over __restrict__ pointers, so the compiler emits SSE2 / AVX2 / AVX-512 code
//   according to the flags this file is compiled with (CMakeLists.txt).
// Numerics: the element arithmetic is torch's fused CPU optimizers', in the parameter dtype;
//   scalar coefficients are formed in double and rounded once. FMA contraction is off, so all
//   ISA paths give bitwise-identical results, independent of the thread count.
#include "cpu/optim_kernels.h"

#include <cmath>

#ifndef MTLCORE_ISA
#error "compile this file with -DMTLCORE_ISA=<isa namespace>"
#endif

namespace mtlcore::cpu::MTLCORE_ISA {

namespace {

// 0: no momentum; 1: first step (buffer = grad); 2: buffer = momentum * buffer + (1 - d) * grad.
template <typename T, bool kScale, bool kDecay, int kMomentum, bool kNesterov>
void sgd_loop(T* __restrict__ p, T* __restrict__ g, T* __restrict__ buf, int64_t n,
              const SgdLoopArgs& a) {
  const T inv_sign = a.opt.maximize ? T(-1) : T(1);
  const T scale = T(a.grad_scale);
  const T wd = T(a.opt.weight_decay);
  const T mom = T(a.opt.momentum);
  const T damp = T(1 - a.opt.dampening);
  const T lr = T(a.opt.lr);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i];
    if constexpr (kScale) {
      gi = gi / scale;
      g[i] = gi;
    }
    gi = gi * inv_sign;  // exact: multiplies by +1 or -1
    if constexpr (kDecay) gi = gi + p[i] * wd;
    if constexpr (kMomentum != 0) {
      T b;
      if constexpr (kMomentum == 1) {
        b = gi;
      } else {
        b = buf[i] * mom + gi * damp;
      }
      buf[i] = b;
      if constexpr (kNesterov) {
        gi = gi + b * mom;
      } else {
        gi = b;
      }
    }
    p[i] = p[i] - gi * lr;
  }
}

template <typename T, bool kScale, bool kDecay, int kMomentum>
void sgd_nesterov(T* p, T* g, T* buf, int64_t n, const SgdLoopArgs& a) {
  if (a.opt.nesterov) {
    sgd_loop<T, kScale, kDecay, kMomentum, true>(p, g, buf, n, a);
  } else {
    sgd_loop<T, kScale, kDecay, kMomentum, false>(p, g, buf, n, a);
  }
}

template <typename T, bool kScale, bool kDecay>
void sgd_momentum(T* p, T* g, T* buf, int64_t n, const SgdLoopArgs& a) {
  if (a.opt.momentum == 0.0) {
    sgd_loop<T, kScale, kDecay, 0, false>(p, g, buf, n, a);
  } else if (a.opt.is_first_step) {
    sgd_nesterov<T, kScale, kDecay, 1>(p, g, buf, n, a);
  } else {
    sgd_nesterov<T, kScale, kDecay, 2>(p, g, buf, n, a);
  }
}

template <typename T>
void sgd(T* p, T* g, T* buf, int64_t n, const SgdLoopArgs& a) {
  const bool decay = a.opt.weight_decay != 0.0;
  if (a.has_grad_scale) {
    decay ? sgd_momentum<T, true, true>(p, g, buf, n, a)
          : sgd_momentum<T, true, false>(p, g, buf, n, a);
  } else {
    decay ? sgd_momentum<T, false, true>(p, g, buf, n, a)
          : sgd_momentum<T, false, false>(p, g, buf, n, a);
  }
}

// kDecay: 0 none, 1 L2 (added to the gradient), 2 decoupled (AdamW, shrinks the parameter).
template <typename T, bool kScale, int kDecay, bool kAmsgrad>
void adam_loop(T* __restrict__ p, T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
               T* __restrict__ vmax, int64_t n, const AdamLoopArgs& a, const AdamStepScalars& s) {
  const T inv_sign = a.opt.maximize ? T(-1) : T(1);
  const T scale = T(a.grad_scale);
  const T wd = T(a.opt.weight_decay);
  const T shrink = T(1 - a.opt.lr * a.opt.weight_decay);
  const T beta1 = T(a.opt.beta1);
  const T beta2 = T(a.opt.beta2);
  const T c1 = T(1 - a.opt.beta1);
  const T c2 = T(1 - a.opt.beta2);
  const T eps = T(a.opt.eps);
  const T step_size = T(s.step_size);
  const T bc2_sqrt = T(s.bias_correction2_sqrt);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i];
    if constexpr (kScale) {
      gi = gi / scale;
      g[i] = gi;
    }
    gi = gi * inv_sign;
    T pi = p[i];
    if constexpr (kDecay == 1) gi = gi + pi * wd;
    if constexpr (kDecay == 2) pi = pi * shrink;
    const T mi = m[i] * beta1 + gi * c1;
    const T vi = v[i] * beta2 + gi * gi * c2;
    m[i] = mi;
    v[i] = vi;
    T denom;
    if constexpr (kAmsgrad) {
      const T vm = (vmax[i] < vi || vi != vi) ? vi : vmax[i];  // NaN-propagating max
      vmax[i] = vm;
      denom = std::sqrt(vm) / bc2_sqrt + eps;
    } else {
      denom = std::sqrt(vi) / bc2_sqrt + eps;
    }
    p[i] = pi - step_size * mi / denom;
  }
}

template <typename T, bool kScale, int kDecay>
void adam_amsgrad(T* p, T* g, T* m, T* v, T* vmax, int64_t n, const AdamLoopArgs& a,
                  const AdamStepScalars& s) {
  if (a.opt.amsgrad) {
    adam_loop<T, kScale, kDecay, true>(p, g, m, v, vmax, n, a, s);
  } else {
    adam_loop<T, kScale, kDecay, false>(p, g, m, v, vmax, n, a, s);
  }
}

template <typename T, bool kScale>
void adam_decay(T* p, T* g, T* m, T* v, T* vmax, int64_t n, const AdamLoopArgs& a,
                const AdamStepScalars& s) {
  if (a.opt.weight_decay == 0.0) {
    adam_amsgrad<T, kScale, 0>(p, g, m, v, vmax, n, a, s);
  } else if (a.opt.decoupled_weight_decay) {
    adam_amsgrad<T, kScale, 2>(p, g, m, v, vmax, n, a, s);
  } else {
    adam_amsgrad<T, kScale, 1>(p, g, m, v, vmax, n, a, s);
  }
}

template <typename T>
void adam(T* p, T* g, T* m, T* v, T* vmax, int64_t n, const AdamLoopArgs& a,
          const AdamStepScalars& s) {
  if (a.has_grad_scale) {
    adam_decay<T, true>(p, g, m, v, vmax, n, a, s);
  } else {
    adam_decay<T, false>(p, g, m, v, vmax, n, a, s);
  }
}

}  // namespace

const OptimLoops optim_loops = {&sgd<float>, &sgd<double>, &adam<float>, &adam<double>};

}  // namespace mtlcore::cpu::MTLCORE_ISA
