// Host run of the fused optimizers' CUDA element functors (built by tests/test_cuda_host.py with
// nvcc as a host program): SgdOp and AdamOp of csrc/cuda/optim_ops.cuh, unmodified, with the
// scalars sgd_scalars and adam_scalars derive, over random groups packed by mta_pack and walked
// by every (block, thread) as mta_kernel walks them. Against a reference step written from
// torch.optim's algorithms (SGD with momentum, dampening, Nesterov, weight decay, maximize; Adam
// and AdamW with amsgrad, per-group step counters in float32 or float64), one rounding per
// operation in the op-math type in the documented order, so every array must match bit for
// bit. Also: the GradScaler path (gradients divided by the scale and written back; a nonzero
// found_inf leaves every array untouched), arrays the functor must not write (the gradients
// without a scale), guard elements around every array, and arrays misaligned for the vector
// path. float, double, half and bfloat16.
//
// Prints one line per configuration and "optim host: ok"; exits 1 when a check fails.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/optim_ops.cuh"

using namespace mtlcore::cuda;  // NOLINT(google-build-using-namespace)

namespace {

constexpr int kGuard = 8;
constexpr double kSentinel = -5.0;

int failures = 0;

void fail(const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

struct Hyper {
  double lr = 0.01, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool nesterov = false, maximize = false, decoupled = false;
  int found_inf = -1;  // -1: no found_inf tensor; else its value
};

// One array of a group in a buffer of its own: guards, 0..7 elements of offset, the data.
template <typename scalar_t>
struct Array {
  std::vector<scalar_t> buf;
  int64_t offset = 0;
  scalar_t* data() { return buf.data() + kGuard + offset; }
};

// D arrays per group, filled with values in [lo, hi).
template <typename scalar_t, int D>
struct Groups {
  std::vector<int64_t> numel;
  std::vector<std::array<Array<scalar_t>, D>> arrays;
  std::vector<float> steps_f32;  // each group's step counter, in both dtypes
  std::vector<double> steps_f64;
};

template <typename scalar_t, int D>
Groups<scalar_t, D> make_groups(std::mt19937_64& rng, const double (&lo)[D],
                                const double (&hi)[D]) {
  Groups<scalar_t, D> g;
  const int count = 2 + static_cast<int>(rng() % 6);
  const int64_t sizes[] = {1, 3, 8, 17, 4097, kMtaChunk + 3};
  for (int i = 0; i < count; ++i) {
    g.numel.push_back(rng() % 2 == 0 ? sizes[rng() % 6] : 1 + static_cast<int64_t>(rng() % 70000));
  }
  g.arrays.resize(count);
  for (int i = 0; i < count; ++i) {
    for (int d = 0; d < D; ++d) {
      Array<scalar_t>& a = g.arrays[i][d];
      a.offset = rng() % 3 == 0 ? static_cast<int64_t>(rng() % 8) : 0;
      a.buf.assign(static_cast<size_t>(2 * kGuard + a.offset + g.numel[i]),
                   static_cast<scalar_t>(kSentinel));
      std::uniform_real_distribution<double> u(lo[d], hi[d]);
      for (int64_t k = 0; k < g.numel[i]; ++k) a.data()[k] = static_cast<scalar_t>(u(rng));
    }
    g.steps_f64.push_back(1 + static_cast<double>(rng() % 12));
    g.steps_f32.push_back(static_cast<float>(g.steps_f64.back()));
  }
  return g;
}

// Runs op as multi_tensor_apply launches it: mta_pack's launches, every block's chunk, every
// thread. `steps`: each group's step counter as the group's extra pointer (Adam).
template <typename Op, int D>
void apply(Groups<typename Op::scalar_type, D>& g, const Op& op, bool with_steps, bool f64_steps,
           int64_t max_blocks) {
  using scalar_t = typename Op::scalar_type;
  std::vector<MtaTensor<D>> tensors;
  for (size_t i = 0; i < g.numel.size(); ++i) {
    MtaTensor<D> t{};
    for (int d = 0; d < D; ++d) t.ptr[d] = g.arrays[i][d].data();
    t.numel = g.numel[i];
    if (with_steps) {
      t.extra = f64_steps ? static_cast<const void*>(&g.steps_f64[i]) : &g.steps_f32[i];
      t.extra_tag = f64_steps ? kStepDouble : kStepFloat;
    }
    tensors.push_back(t);
  }
  mta_pack<D>(tensors, sizeof(scalar_t), max_blocks, [&](const MtaMeta<D>& meta, int64_t blocks) {
    for (int64_t b = 0; b < blocks; ++b) {
      const MtaChunk<scalar_t, D> c = mta_chunk<scalar_t, D>(meta, b);
      for (int tid = 0; tid < kMtaThreads; ++tid) op(c, tid);
    }
  });
}

// Compares every array (guards included) with the expected buffers, bit for bit.
template <typename scalar_t, int D>
void compare(const Groups<scalar_t, D>& got, const Groups<scalar_t, D>& want,
             const std::string& name) {
  for (size_t i = 0; i < got.numel.size(); ++i) {
    for (int d = 0; d < D; ++d) {
      const auto& a = got.arrays[i][d].buf;
      const auto& b = want.arrays[i][d].buf;
      for (size_t k = 0; k < a.size(); ++k) {
        const float x = static_cast<float>(a[k]), y = static_cast<float>(b[k]);
        const bool same = x == y || (x != x && y != y);
        if (!same || (std::is_same_v<scalar_t, double> &&
                      static_cast<double>(a[k]) != static_cast<double>(b[k]))) {
          fail(name + ": group " + std::to_string(i) + " (" + std::to_string(got.numel[i]) +
               " elements) array " + std::to_string(d) + " index " +
               std::to_string(static_cast<int64_t>(k) - kGuard - got.arrays[i][d].offset) + ": " +
               std::to_string(static_cast<double>(a[k])) + " instead of " +
               std::to_string(static_cast<double>(b[k])));
          return;
        }
      }
    }
  }
}

// torch.optim.SGD's step for one element, in T, one rounding per operation; with `scaled`,
// the gradient is divided by scale first and written back.
template <typename T>
void sgd_reference(const Hyper& h, bool first_step, bool scaled, float scale, T& p, T& g_io,
                   T* buf) {
  T g = g_io;
  if (scaled) {
    g = g / static_cast<T>(scale);
    g_io = g;
  }
  if (h.maximize) g = -g;
  if (h.weight_decay != 0.0) g = g + p * static_cast<T>(h.weight_decay);
  if (h.momentum != 0.0) {
    T b =
        first_step ? g : *buf * static_cast<T>(h.momentum) + g * static_cast<T>(1.0 - h.dampening);
    *buf = b;
    g = h.nesterov ? g + b * static_cast<T>(h.momentum) : b;
  }
  p = p - g * static_cast<T>(h.lr);
}

// torch.optim.Adam's (AdamW's with decoupled) step for one element at step `step`.
template <typename T>
void adam_reference(const Hyper& h, bool scaled, float scale, double step, bool amsgrad, T& p,
                    T& g_io, T& m, T& v, T* vmax) {
  T g = g_io;
  if (scaled) {
    g = g / static_cast<T>(scale);
    g_io = g;
  }
  if (h.maximize) g = -g;
  if (h.weight_decay != 0.0) {
    if (h.decoupled) {
      p = p * static_cast<T>(1.0 - h.lr * h.weight_decay);
    } else {
      g = g + p * static_cast<T>(h.weight_decay);
    }
  }
  m = m * static_cast<T>(h.beta1) + g * static_cast<T>(1.0 - h.beta1);
  v = v * static_cast<T>(h.beta2) + (g * g) * static_cast<T>(1.0 - h.beta2);
  const T step_size = static_cast<T>(h.lr / (1.0 - std::pow(h.beta1, step)));
  const T bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(h.beta2, step)));
  T second = v;
  if (amsgrad) {
    if (*vmax < v || v != v) *vmax = v;
    second = *vmax;
  }
  const T denom = std::sqrt(second) / bc2_sqrt + static_cast<T>(h.eps);
  p = p - (step_size * m) / denom;
}

template <typename scalar_t, int kMode, bool kScale>
void run_sgd(std::mt19937_64& rng, const Hyper& h, const char* dtype) {
  using T = at::opmath_type<scalar_t>;
  constexpr int D = SgdOp<scalar_t, kMode, kScale>::kDepth;
  const float scale = kScale ? 1024.0f : 1.0f;
  double lo[D], hi[D];
  for (int d = 0; d < D; ++d) lo[d] = -1.0, hi[d] = 1.0;
  if (kScale) lo[1] = -1024.0, hi[1] = 1024.0;
  Groups<scalar_t, D> got = make_groups<scalar_t, D>(rng, lo, hi);
  Groups<scalar_t, D> want = got;
  const float found_inf = static_cast<float>(h.found_inf);
  const SgdOp<scalar_t, kMode, kScale> op{
      sgd_scalars<T>(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize),
      h.found_inf >= 0 ? &found_inf : nullptr, kScale ? &scale : nullptr};
  apply(got, op, false, false, rng() % 2 == 0 ? kMtaMaxBlocks : 3);
  if (h.found_inf <= 0) {
    for (size_t i = 0; i < want.numel.size(); ++i) {
      for (int64_t k = 0; k < want.numel[i]; ++k) {
        T p = static_cast<T>(want.arrays[i][0].data()[k]);
        T g = static_cast<T>(want.arrays[i][1].data()[k]);
        T b = D > 2 ? static_cast<T>(want.arrays[i][D - 1].data()[k]) : T(0);
        sgd_reference<T>(h, kMode == kFirstStep, kScale, scale, p, g, &b);
        want.arrays[i][0].data()[k] = static_cast<scalar_t>(p);
        if (kScale) want.arrays[i][1].data()[k] = static_cast<scalar_t>(g);
        if (D > 2) want.arrays[i][D - 1].data()[k] = static_cast<scalar_t>(b);
      }
    }
  }
  const std::string name =
      std::string("sgd ") + dtype + " mode " + std::to_string(kMode) + (kScale ? " scaled" : "") +
      " nesterov " + std::to_string(h.nesterov) + " maximize " + std::to_string(h.maximize) +
      " wd " + std::to_string(h.weight_decay) + " found_inf " + std::to_string(h.found_inf);
  compare(got, want, name);
  std::printf("%s: %zu groups\n", name.c_str(), got.numel.size());
}

template <typename scalar_t, bool kAmsgrad, bool kScale>
void run_adam(std::mt19937_64& rng, const Hyper& h, bool f64_steps, const char* dtype) {
  using T = at::opmath_type<scalar_t>;
  constexpr int D = AdamOp<scalar_t, kAmsgrad, kScale>::kDepth;
  const float scale = kScale ? 512.0f : 1.0f;
  double lo[D] = {-1.0, kScale ? -512.0 : -1.0, -0.1, 0.0};
  double hi[D] = {1.0, kScale ? 512.0 : 1.0, 0.1, 0.01};
  if constexpr (kAmsgrad) lo[4] = 0.0, hi[4] = 0.01;
  Groups<scalar_t, D> got = make_groups<scalar_t, D>(rng, lo, hi);
  Groups<scalar_t, D> want = got;
  const float found_inf = static_cast<float>(h.found_inf);
  const AdamOp<scalar_t, kAmsgrad, kScale> op{
      adam_scalars<T>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled, h.maximize),
      h.found_inf >= 0 ? &found_inf : nullptr, kScale ? &scale : nullptr};
  apply(got, op, true, f64_steps, rng() % 2 == 0 ? kMtaMaxBlocks : 3);
  if (h.found_inf <= 0) {
    for (size_t i = 0; i < want.numel.size(); ++i) {
      const double step = f64_steps ? want.steps_f64[i] : want.steps_f32[i];
      for (int64_t k = 0; k < want.numel[i]; ++k) {
        T x[5] = {};
        for (int d = 0; d < D; ++d) x[d] = static_cast<T>(want.arrays[i][d].data()[k]);
        adam_reference<T>(h, kScale, scale, step, kAmsgrad, x[0], x[1], x[2], x[3], &x[4]);
        for (int d = 0; d < D; ++d) {
          if (d != 1 || kScale) want.arrays[i][d].data()[k] = static_cast<scalar_t>(x[d]);
        }
      }
    }
  }
  const std::string name = std::string("adam ") + dtype + (kAmsgrad ? " amsgrad" : "") +
                           (kScale ? " scaled" : "") + (f64_steps ? " float64 steps" : "") +
                           " decoupled " + std::to_string(h.decoupled) + " maximize " +
                           std::to_string(h.maximize) + " wd " + std::to_string(h.weight_decay) +
                           " found_inf " + std::to_string(h.found_inf);
  compare(got, want, name);
  std::printf("%s: %zu groups\n", name.c_str(), got.numel.size());
}

template <typename scalar_t>
void run_dtype(std::mt19937_64& rng, const char* dtype) {
  Hyper plain;
  run_sgd<scalar_t, kNoMomentum, false>(rng, plain, dtype);
  Hyper wd_max = plain;
  wd_max.weight_decay = 0.01;
  wd_max.maximize = true;
  run_sgd<scalar_t, kNoMomentum, true>(rng, wd_max, dtype);
  Hyper mom = plain;
  mom.momentum = 0.9;
  mom.dampening = 0.1;
  mom.weight_decay = 0.001;
  run_sgd<scalar_t, kFirstStep, false>(rng, mom, dtype);
  run_sgd<scalar_t, kMomentumStep, false>(rng, mom, dtype);
  Hyper nesterov = mom;
  nesterov.dampening = 0.0;
  nesterov.nesterov = true;
  nesterov.found_inf = 0;
  run_sgd<scalar_t, kMomentumStep, true>(rng, nesterov, dtype);
  nesterov.found_inf = 1;
  run_sgd<scalar_t, kMomentumStep, true>(rng, nesterov, dtype);

  Hyper adam;
  run_adam<scalar_t, false, false>(rng, adam, false, dtype);
  Hyper adamw = adam;
  adamw.weight_decay = 0.05;
  adamw.decoupled = true;
  adamw.maximize = true;
  run_adam<scalar_t, true, false>(rng, adamw, true, dtype);
  Hyper l2 = adam;
  l2.weight_decay = 0.01;
  l2.found_inf = 0;
  run_adam<scalar_t, false, true>(rng, l2, true, dtype);
  run_adam<scalar_t, true, true>(rng, l2, false, dtype);
  l2.found_inf = 1;
  run_adam<scalar_t, true, true>(rng, l2, false, dtype);
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::mt19937_64 rng(20261130);
  run_dtype<float>(rng, "float");
  run_dtype<double>(rng, "double");
  run_dtype<c10::Half>(rng, "half");
  run_dtype<c10::BFloat16>(rng, "bfloat16");
  if (failures > 0) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("optim host: ok\n");
  return 0;
}
