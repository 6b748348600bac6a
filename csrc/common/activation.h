// The activations of mtlcore.conv2d_act and their derivatives, shared by the CPU and CUDA
// kernels (host and device code).
//
// Forward: y = act(z) with z the convolution plus bias (the pre-activation).
// Backward: dz = dy * act'(.), where act' is evaluated from what the forward pass saved:
//   - the output y for identity, relu, leaky_relu (negative_slope >= 0), sigmoid and tanh,
//     whose derivatives are functions of y, so no extra tensor is kept;
//   - the pre-activation z for gelu, gelu_tanh, silu (and leaky_relu with a negative slope,
//     where y > 0 no longer tells the sign of z).
// Formulas follow torch's (F.gelu with approximate="none"/"tanh", F.silu, ...), in the
// kernel's math type (float for float/half/bfloat16, double for double).
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define MTLCORE_HD __host__ __device__ __forceinline__
#else
#define MTLCORE_HD inline
#endif

namespace mtlcore {

enum class Activation { kIdentity, kRelu, kLeakyRelu, kGelu, kGeluTanh, kSilu, kSigmoid, kTanh };

// The activation named `name` (the op's string argument); false when the name is unknown.
inline bool parse_activation(std::string_view name, Activation* out) {
  constexpr std::pair<std::string_view, Activation> kNames[] = {
      {"identity", Activation::kIdentity},    {"relu", Activation::kRelu},
      {"leaky_relu", Activation::kLeakyRelu}, {"gelu", Activation::kGelu},
      {"gelu_tanh", Activation::kGeluTanh},   {"silu", Activation::kSilu},
      {"sigmoid", Activation::kSigmoid},      {"tanh", Activation::kTanh}};
  for (const auto& [n, a] : kNames) {
    if (n == name) {
      *out = a;
      return true;
    }
  }
  return false;
}

inline constexpr const char* kActivationNames =
    "identity, relu, leaky_relu, gelu, gelu_tanh, silu, sigmoid, tanh";

// True when the backward pass needs the pre-activation z rather than the output y.
inline bool needs_preactivation(Activation a, double negative_slope) {
  return a == Activation::kGelu || a == Activation::kGeluTanh || a == Activation::kSilu ||
         (a == Activation::kLeakyRelu && negative_slope < 0);
}

namespace act {

#if defined(__CUDA_ARCH__)
MTLCORE_HD float exp_(float x) { return ::expf(x); }
MTLCORE_HD double exp_(double x) { return ::exp(x); }
MTLCORE_HD float erf_(float x) { return ::erff(x); }
MTLCORE_HD double erf_(double x) { return ::erf(x); }
MTLCORE_HD float tanh_(float x) { return ::tanhf(x); }
MTLCORE_HD double tanh_(double x) { return ::tanh(x); }
#else
template <typename T>
MTLCORE_HD T exp_(T x) {
  return std::exp(x);
}
template <typename T>
MTLCORE_HD T erf_(T x) {
  return std::erf(x);
}
template <typename T>
MTLCORE_HD T tanh_(T x) {
  return std::tanh(x);
}
#endif

template <typename T>
MTLCORE_HD T sigmoid(T z) {
  return T(1) / (T(1) + exp_(-z));
}

// sqrt(2/pi) and 0.044715 of the tanh approximation; 1/sqrt(2) and 1/sqrt(2*pi) of the exact form.
template <typename T>
struct GeluConstants {
  static constexpr T kSqrt2OverPi = T(0.7978845608028654);
  static constexpr T kCubic = T(0.044715);
  static constexpr T kInvSqrt2 = T(0.7071067811865476);
  static constexpr T kInvSqrt2Pi = T(0.3989422804014327);
};

// y = act(z).
template <Activation A, typename T>
MTLCORE_HD T forward(T z, T negative_slope) {
  using C = GeluConstants<T>;
  if constexpr (A == Activation::kIdentity) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z < T(0) ? T(0) : z;  // NaN propagates, as in torch
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > T(0) ? z : z * negative_slope;
  } else if constexpr (A == Activation::kGelu) {
    return T(0.5) * z * (T(1) + erf_(z * C::kInvSqrt2));
  } else if constexpr (A == Activation::kGeluTanh) {
    const T inner = C::kSqrt2OverPi * (z + C::kCubic * z * z * z);
    return T(0.5) * z * (T(1) + tanh_(inner));
  } else if constexpr (A == Activation::kSilu) {
    return z * sigmoid(z);
  } else if constexpr (A == Activation::kSigmoid) {
    return sigmoid(z);
  } else {
    return tanh_(z);
  }
}

// act'(.) from the saved value s: the output y or the pre-activation z (needs_preactivation).
template <Activation A, typename T>
MTLCORE_HD T derivative(T s, T negative_slope) {
  using C = GeluConstants<T>;
  if constexpr (A == Activation::kIdentity) {
    return T(1);
  } else if constexpr (A == Activation::kRelu) {
    return s > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    // s is y for slope >= 0 and z otherwise; y > 0 <=> z > 0 holds in the first case.
    return s > T(0) ? T(1) : negative_slope;
  } else if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + erf_(s * C::kInvSqrt2));
    const T pdf = C::kInvSqrt2Pi * exp_(T(-0.5) * s * s);
    return cdf + s * pdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    const T s2 = s * s;
    const T inner = C::kSqrt2OverPi * (s + C::kCubic * s2 * s);
    const T t = tanh_(inner);
    const T dinner = C::kSqrt2OverPi * (T(1) + T(3) * C::kCubic * s2);
    return T(0.5) * (T(1) + t) + T(0.5) * s * (T(1) - t * t) * dinner;
  } else if constexpr (A == Activation::kSilu) {
    const T sg = sigmoid(s);
    return sg * (T(1) + s * (T(1) - sg));
  } else if constexpr (A == Activation::kSigmoid) {
    return s * (T(1) - s);
  } else {
    return T(1) - s * s;
  }
}

// dy * act'(.) from the saved value s. relu and leaky_relu select rather than multiply, as
// torch's threshold_backward / leaky_relu_backward do (an infinite dy stays infinite where the
// slope is 1 and does not turn into NaN where it is 0), with the same comparisons: relu passes
// dy unless s <= 0 (a NaN output passes it), leaky_relu takes the slope unless s > 0.
template <Activation A, typename T>
MTLCORE_HD T backward(T dy, T s, T negative_slope) {
  if constexpr (A == Activation::kIdentity) {
    return dy;
  } else if constexpr (A == Activation::kRelu) {
    return s <= T(0) ? T(0) : dy;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return s > T(0) ? dy : dy * negative_slope;
  } else {
    return dy * derivative<A, T>(s, negative_slope);
  }
}

}  // namespace act

// Calls fn(std::integral_constant<Activation, A>{}) with A = a, so kernels can be templates on
// the activation.
template <typename Fn>
decltype(auto) dispatch_activation(Activation a, Fn&& fn) {
  switch (a) {
#define MTLCORE_ACT_CASE(A) \
  case Activation::A:       \
    return fn(std::integral_constant<Activation, Activation::A>{});
    MTLCORE_ACT_CASE(kIdentity)
    MTLCORE_ACT_CASE(kRelu)
    MTLCORE_ACT_CASE(kLeakyRelu)
    MTLCORE_ACT_CASE(kGelu)
    MTLCORE_ACT_CASE(kGeluTanh)
    MTLCORE_ACT_CASE(kSilu)
    MTLCORE_ACT_CASE(kSigmoid)
    default:
      return fn(std::integral_constant<Activation, Activation::kTanh>{});
#undef MTLCORE_ACT_CASE
  }
}

}  // namespace mtlcore
