// Host run of csrc/cuda/max_pool2d_elements.cuh (built by tests/test_cuda_host.py with nvcc as
// a host program): the CUDA kernels' per-element functions, called for every element in turn as
// the grid-stride loops do, against a brute-force pooling written here: every tap of every
// window in row-major order, the first valid element kept unless a later one is greater or NaN
// (torch's rule), and a backward that scatters each window's gradient onto its selection.
// Random shapes, kernels, strides, paddings, dilations, ceil_mode, NCHW / channels_last /
// strided inputs and outputs, values with ties, NaN and -inf; float, double, half, bfloat16.
// Values and gradients are small integers, so every sum is exact and results must be equal.
//
// Prints a line per dtype and "max_pool2d host: ok"; exits 1 at the first mismatch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/max_pool2d_elements.cuh"
#include "host_check.h"

using mtlcore::cuda::max_pool2d_backward_element;
using mtlcore::cuda::max_pool2d_element;
using mtlcore::cuda::PoolShape;
using mtlcore::cuda::View4;

using host_check::fail;

namespace {

constexpr int kGuard = 8;           // elements after each buffer, never to be written
constexpr double kSentinel = 99.0;  // their value

// torch's pooling_output_shape.
int pooled_size(int in, int k, int stride, int pad, int dil, bool ceil_mode) {
  const int64_t num =
      int64_t{in} + 2 * pad - int64_t{dil} * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return static_cast<int>(out);
}

// An [n, c, rows, cols] buffer laid out as NCHW (layout 0), NHWC (1) or NCHW with every other
// column (2), followed by kGuard sentinels.
template <typename T>
struct Tensor4 {
  std::vector<T> data;
  View4<T> view;
};

template <typename T>
Tensor4<T> make_tensor(int64_t n, int64_t c, int rows, int cols, int layout) {
  Tensor4<T> t;
  const int64_t elements = n * c * rows * cols * (layout == 2 ? 2 : 1);
  t.data.assign(static_cast<size_t>(elements + kGuard), T(kSentinel));
  if (layout == 1) {
    t.view = {t.data.data(), rows * cols * c, 1, cols * c, c};
  } else {
    const int64_t w = layout == 2 ? 2 : 1;
    t.view = {t.data.data(), c * rows * cols * w, rows * cols * w, cols * w, w};
  }
  return t;
}

template <typename T>
void check_guard(const Tensor4<T>& t, const char* name) {
  for (size_t i = t.data.size() - kGuard; i < t.data.size(); ++i) {
    if (static_cast<double>(t.data[i]) != kSentinel)
      fail(std::string(name) + " written past its end");
  }
}

bool same(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

template <typename T>
void run_case(std::mt19937& rng, int64_t& cases) {
  PoolShape s{};
  const int64_t n = rng() % 2 + 1;
  s.channels = rng() % 3 + 1;
  s.h = static_cast<int>(rng() % 9 + 1);
  s.w = static_cast<int>(rng() % 9 + 1);
  s.kh = static_cast<int>(rng() % 4 + 1);
  s.kw = static_cast<int>(rng() % 4 + 1);
  s.stride_h = static_cast<int>(rng() % 3 + 1);
  s.stride_w = static_cast<int>(rng() % 3 + 1);
  s.pad_h = static_cast<int>(rng() % (s.kh / 2 + 1));
  s.pad_w = static_cast<int>(rng() % (s.kw / 2 + 1));
  s.dil_h = static_cast<int>(rng() % 3 + 1);
  s.dil_w = static_cast<int>(rng() % 3 + 1);
  const bool ceil_mode = rng() % 2 == 1;
  s.oh = pooled_size(s.h, s.kh, s.stride_h, s.pad_h, s.dil_h, ceil_mode);
  s.ow = pooled_size(s.w, s.kw, s.stride_w, s.pad_w, s.dil_w, ceil_mode);
  if (s.oh < 1 || s.ow < 1) return;
  s.channels_last = rng() % 2 == 1;
  ++cases;

  Tensor4<T> in = make_tensor<T>(n, s.channels, s.h, s.w, static_cast<int>(rng() % 3));
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < s.channels; ++c)
      for (int y = 0; y < s.h; ++y)
        for (int x = 0; x < s.w; ++x) {
          const int r = static_cast<int>(rng() % 24);
          const float v = r == 0   ? std::numeric_limits<float>::quiet_NaN()
                          : r == 1 ? -std::numeric_limits<float>::infinity()
                                   : static_cast<float>(static_cast<int>(rng() % 7) - 3);
          in.view.at(b, c, y, x) = T(v);
        }
  const int out_layout = s.channels_last ? 1 : 0;
  Tensor4<T> out = make_tensor<T>(n, s.channels, s.oh, s.ow, out_layout);
  Tensor4<T> grad_out = make_tensor<T>(n, s.channels, s.oh, s.ow, static_cast<int>(rng() % 3));
  Tensor4<T> grad_in = make_tensor<T>(n, s.channels, s.h, s.w, out_layout);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < s.channels; ++c)
      for (int y = 0; y < s.oh; ++y)
        for (int x = 0; x < s.ow; ++x)
          grad_out.view.at(b, c, y, x) = T(static_cast<float>(rng() % 5 + 1));

  const View4<const T> in_c{in.view.data, in.view.stride_n, in.view.stride_c, in.view.stride_h,
                            in.view.stride_w};
  const View4<const T> go_c{grad_out.view.data, grad_out.view.stride_n, grad_out.view.stride_c,
                            grad_out.view.stride_h, grad_out.view.stride_w};
  for (int64_t e = 0; e < n * s.channels * s.oh * s.ow; ++e)
    max_pool2d_element(s, in_c, out.view, e);
  for (int64_t e = 0; e < n * s.channels * s.h * s.w; ++e) {
    max_pool2d_backward_element(s, go_c, in_c, grad_in.view, e);
  }
  check_guard(out, "output");
  check_guard(grad_in, "grad_input");

  // Brute force.
  std::vector<double> want_grad(static_cast<size_t>(n * s.channels * s.h * s.w), 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < s.channels; ++c)
      for (int oh = 0; oh < s.oh; ++oh)
        for (int ow = 0; ow < s.ow; ++ow) {
          double best = -std::numeric_limits<double>::infinity();
          int by = -1, bx = -1;
          for (int i = 0; i < s.kh; ++i)
            for (int j = 0; j < s.kw; ++j) {
              const int y = oh * s.stride_h - s.pad_h + i * s.dil_h;
              const int x = ow * s.stride_w - s.pad_w + j * s.dil_w;
              if (y < 0 || y >= s.h || x < 0 || x >= s.w) continue;
              const double v = static_cast<double>(in.view.at(b, c, y, x));
              if (by < 0 || v > best || std::isnan(v)) {
                best = v;
                by = y;
                bx = x;
              }
            }
          const double got = static_cast<double>(out.view.at(b, c, oh, ow));
          if (!same(got, best)) {
            fail("output (" + std::to_string(b) + ", " + std::to_string(c) + ", " +
                 std::to_string(oh) + ", " + std::to_string(ow) + "): " + std::to_string(got) +
                 " instead of " + std::to_string(best));
          }
          if (by >= 0) {
            want_grad[static_cast<size_t>(((b * s.channels + c) * s.h + by) * s.w + bx)] +=
                static_cast<double>(grad_out.view.at(b, c, oh, ow));
          }
        }
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < s.channels; ++c)
      for (int y = 0; y < s.h; ++y)
        for (int x = 0; x < s.w; ++x) {
          const double want =
              want_grad[static_cast<size_t>(((b * s.channels + c) * s.h + y) * s.w + x)];
          const double got = static_cast<double>(grad_in.view.at(b, c, y, x));
          if (got != want) {
            fail("grad_input (" + std::to_string(b) + ", " + std::to_string(c) + ", " +
                 std::to_string(y) + ", " + std::to_string(x) + "): " + std::to_string(got) +
                 " instead of " + std::to_string(want) + " (kernel " + std::to_string(s.kh) + "x" +
                 std::to_string(s.kw) + ", stride " + std::to_string(s.stride_h) + "x" +
                 std::to_string(s.stride_w) + ", dilation " + std::to_string(s.dil_h) + "x" +
                 std::to_string(s.dil_w) + ")");
          }
        }
}

template <typename T>
void run_all(std::mt19937& rng, const char* name) {
  int64_t cases = 0;
  for (int i = 0; i < 4000; ++i) run_case<T>(rng, cases);
  std::printf("%-9s %lld cases\n", name, static_cast<long long>(cases));
}

}  // namespace

int main() {
  std::mt19937 rng(20261130);
  return host_check::run_checks("max_pool2d", [&] {
    run_all<float>(rng, "float");
    run_all<double>(rng, "double");
    run_all<c10::Half>(rng, "half");
    run_all<c10::BFloat16>(rng, "bfloat16");
  });
}
