// Host run of mtlcore.conv2d_act's CUDA kernel code (built by tests/test_cuda_host.py with g++,
// against the CUDA toolkit's headers): the tiled implicit GEMM of csrc/cuda/conv2d_act_gemm.cuh,
// unmodified, through the emulator of tests/host/cuda_emu.h (every block as 256 threads with a
// barrier, the wmma tile maths included), driving the real problem classes of
// csrc/cuda/conv2d_act_problems.cuh: the forward (identity and relu, with the pre-activation),
// the input gradient and the weight gradient split over depth ranges as plan_depth_split cuts
// it; and the direct kernels, launched the same way: the depthwise convolutions, the
// backward's first pass (relu's derivative and the bias gradient's block sums, with warp
// shuffles) and the sums of partials. Against a naive double convolution.
//
// Every input, weight, bias and gradient is a multiple of 1/16 in [-1, 1], exact in every
// dtype (and in TF32), so every product is exact in float and every sum here too: each
// result must equal the naive sum rounded once to the dtype, bit for bit, for all five tile
// maths (float on FMA, double on FMA, float as TF32, half and bfloat16 on wmma). Cases: fixed
// edge cases (1x1 image, several depth tiles, more than 64 rows or 128 columns, depthwise) and
// random shapes (groups, kernel 1-4, stride 1-3, asymmetric padding, dilation 1-2) with NCHW,
// channels_last and strided inputs (the gaps hold a poison value that must never be read).
//
// Prints a line per tile math and "conv2d_act host: ok"; exits 1 when a case fails.
#include "cuda_emu.h"
// The emulator first: the kernel headers below use what it defines.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/conv2d_act_problems.cuh"

namespace {

using namespace mtlcore;        // NOLINT(google-build-using-namespace)
using namespace mtlcore::cuda;  // NOLINT(google-build-using-namespace)

struct Case {
  int n, groups, cg, kg, h, w, r, s, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
      dil_h, dil_w;
  int layout;  // input: 0 NCHW, 1 channels_last, 2 NCHW with every other column
  bool bias;
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "N=%d groups=%d Cg=%d Kg=%d %dx%d kernel %dx%d stride %d,%d pad %d,%d,%d,%d "
                "dilation %d,%d layout %d bias %d",
                c.n, c.groups, c.cg, c.kg, c.h, c.w, c.r, c.s, c.stride_h, c.stride_w, c.pad_top,
                c.pad_bottom, c.pad_left, c.pad_right, c.dil_h, c.dil_w, c.layout, c.bias);
  return buf;
}

template <class T>
T from_double(double v) {
  return ElementTraits<T>::from_acc(static_cast<acc_t<T>>(v));
}

template <class T>
double to_double(T v) {
  return static_cast<double>(ElementTraits<T>::to_acc(v));
}

// Compares a result with the exact sums rounded once to T; prints the first difference.
template <class T>
bool matches(const std::vector<T>& got, const std::vector<double>& exact, const char* what,
             const char* math, const Case& c) {
  for (size_t i = 0; i < got.size(); ++i) {
    const double want = to_double(from_double<T>(exact[i]));
    if (!(to_double(got[i]) == want)) {
      std::printf("FAILED %s %s at %zu: %g instead of %g (%s)\n", math, what, i, to_double(got[i]),
                  want, describe(c).c_str());
      return false;
    }
  }
  return true;
}

template <class T, class Math>
bool run_case(const Case& cs, std::mt19937_64& rng, const char* math) {
  // The direct kernels do not depend on the tile math: float's run once (with the FMA tile).
  constexpr bool kDirect = !std::is_same_v<Math, WmmaTileMath<float>>;
  if (!kDirect && cs.groups > 1 && cs.cg == 1) return true;  // depthwise: direct kernels only
  const int64_t C = int64_t{cs.cg} * cs.groups, K = int64_t{cs.kg} * cs.groups;
  const int64_t OH =
      (cs.h + cs.pad_top + cs.pad_bottom - (int64_t{cs.dil_h} * (cs.r - 1) + 1)) / cs.stride_h + 1;
  const int64_t OW =
      (cs.w + cs.pad_left + cs.pad_right - (int64_t{cs.dil_w} * (cs.s - 1) + 1)) / cs.stride_w + 1;
  const int64_t RS = int64_t{cs.r} * cs.s;
  auto value = [&rng] { return static_cast<double>(static_cast<int>(rng() % 33) - 16) / 16.0; };

  ConvShape sh{};
  sh.n = cs.n;
  sh.c = C;
  sh.k = K;
  sh.c_per_group = cs.cg;
  sh.k_per_group = cs.kg;
  sh.h = cs.h;
  sh.w = cs.w;
  sh.oh = static_cast<int>(OH);
  sh.ow = static_cast<int>(OW);
  sh.r = cs.r;
  sh.s = cs.s;
  sh.stride_h = cs.stride_h;
  sh.stride_w = cs.stride_w;
  sh.pad_top = cs.pad_top;
  sh.pad_left = cs.pad_left;
  sh.dil_h = cs.dil_h;
  sh.dil_w = cs.dil_w;
  sh.input_plane = int64_t{cs.h} * cs.w;
  sh.output_plane = OH * OW;
  sh.kernel_area = RS;
  if (cs.layout == 1) {
    sh.x_stride_c = 1;
    sh.x_stride_w = C;
    sh.x_stride_h = C * cs.w;
    sh.x_stride_n = sh.x_stride_h * cs.h;
  } else {
    sh.x_stride_w = cs.layout == 2 ? 2 : 1;
    sh.x_stride_h = sh.x_stride_w * cs.w;
    sh.x_stride_c = sh.x_stride_h * cs.h;
    sh.x_stride_n = sh.x_stride_c * C;
  }

  std::vector<T> x(static_cast<size_t>(cs.n * sh.x_stride_n), from_double<T>(1e4));  // poison
  std::vector<double> xd(static_cast<size_t>(cs.n * C * sh.input_plane));
  for (int64_t n = 0; n < cs.n; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < cs.h; ++y)
        for (int64_t z = 0; z < cs.w; ++z) {
          const double v = value();
          x[n * sh.x_stride_n + c * sh.x_stride_c + y * sh.x_stride_h + z * sh.x_stride_w] =
              from_double<T>(v);
          xd[((n * C + c) * cs.h + y) * cs.w + z] = v;
        }
  std::vector<double> wd(static_cast<size_t>(K * cs.cg * RS)), bd(static_cast<size_t>(K), 0.0);
  for (double& v : wd) v = value();
  if (cs.bias)
    for (double& v : bd) v = value();
  std::vector<T> wt(wd.size()), bt(bd.size());
  for (size_t i = 0; i < wd.size(); ++i) wt[i] = from_double<T>(wd[i]);
  for (size_t i = 0; i < bd.size(); ++i) bt[i] = from_double<T>(bd[i]);
  const int64_t out_numel = cs.n * K * OH * OW;
  std::vector<double> gd(static_cast<size_t>(out_numel));
  for (double& v : gd) v = value();
  std::vector<T> g(gd.size());
  for (size_t i = 0; i < gd.size(); ++i) g[i] = from_double<T>(gd[i]);

  // The naive convolution and its two gradients, in double (exact here).
  std::vector<double> z_ref(static_cast<size_t>(out_numel)), gx_ref(xd.size(), 0.0),
      gw_ref(wd.size(), 0.0);
  for (int64_t n = 0; n < cs.n; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t o = ((n * K + k) * OH + oh) * OW + ow;
          double sum = bd[k];
          for (int64_t c = 0; c < cs.cg; ++c)
            for (int64_t r = 0; r < cs.r; ++r)
              for (int64_t s = 0; s < cs.s; ++s) {
                const int64_t ih = oh * cs.stride_h - cs.pad_top + r * cs.dil_h;
                const int64_t iw = ow * cs.stride_w - cs.pad_left + s * cs.dil_w;
                if (ih < 0 || ih >= cs.h || iw < 0 || iw >= cs.w) continue;
                const int64_t xi = ((n * C + k / cs.kg * cs.cg + c) * cs.h + ih) * cs.w + iw;
                const int64_t wi = ((k * cs.cg + c) * cs.r + r) * cs.s + s;
                sum += wd[wi] * xd[xi];
                gx_ref[xi] += gd[o] * wd[wi];
                gw_ref[wi] += gd[o] * xd[xi];
              }
          z_ref[o] = sum;
        }
  std::vector<double> relu_ref(z_ref.size());
  for (size_t i = 0; i < z_ref.size(); ++i) relu_ref[i] = z_ref[i] > 0 ? z_ref[i] : 0.0;

  const bool depthwise = cs.groups > 1 && cs.cg == 1;
  const T* bias = cs.bias ? bt.data() : nullptr;
  const acc_t<T> slope = 0;
  std::vector<T> out(z_ref.size(), from_double<T>(-99)), pre(z_ref.size(), from_double<T>(-99));
  std::vector<T> out_relu(out), pre_relu(out);
  std::vector<T> gx(xd.size(), from_double<T>(-99)), gw(wd.size(), from_double<T>(-99));
  const int64_t pixels = cs.n * sh.output_plane;
  if (depthwise) {
    // The direct kernels, the element-wise ones over a few blocks so that their grid-stride
    // loops wrap; the weight gradient over (weight element, range) blocks as plan_ranges
    // cuts it, then the sum of its partials.
    emu::launch(dim3(3), kBlockThreads, depthwise_forward_kernel<T, Activation::kIdentity>, sh,
                x.data(), wt.data(), bias, out.data(), pre.data(), slope, out_numel);
    emu::launch(dim3(3), kBlockThreads, depthwise_forward_kernel<T, Activation::kRelu>, sh,
                x.data(), wt.data(), bias, out_relu.data(), pre_relu.data(), slope, out_numel);
    emu::launch(dim3(2), kBlockThreads, depthwise_input_grad_kernel<T>, sh, g.data(), wt.data(),
                gx.data(), static_cast<int64_t>(gx.size()));
    const int64_t weights = static_cast<int64_t>(wt.size());
    const RangeSplit ranges = plan_ranges(weights, pixels);
    std::vector<acc_t<T>> partial(static_cast<size_t>(ranges.ranges * weights),
                                  static_cast<acc_t<T>>(NAN));
    emu::launch(dim3(static_cast<unsigned>(weights), static_cast<unsigned>(ranges.ranges)),
                kBlockThreads, depthwise_weight_grad_kernel<T>, sh, g.data(), x.data(),
                partial.data(), pixels, ranges.range_len);
    emu::launch(dim3(2), kBlockThreads, sum_partials_kernel<T>, partial.data(), ranges.ranges,
                weights, gw.data());
  } else {
    const ForwardGemm<T, Activation::kIdentity> fwd{
        sh, x.data(), wt.data(), bias, out.data(), pre.data(), slope, cs.kg, pixels, cs.cg * RS};
    launch_implicit_gemm<Math>("forward", fwd, cs.groups, 1, fwd.depth_size, nullptr);
    const ForwardGemm<T, Activation::kRelu> fwd_relu{
        sh,    x.data(), wt.data(), bias,      out_relu.data(), pre_relu.data(),
        slope, cs.kg,    pixels,    cs.cg * RS};
    launch_implicit_gemm<Math>("forward", fwd_relu, cs.groups, 1, fwd_relu.depth_size, nullptr);
    const InputGradGemm<T> ig{
        sh, g.data(), wt.data(), gx.data(), cs.cg, cs.n * sh.input_plane, cs.kg * RS};
    launch_implicit_gemm<Math>("input grad", ig, cs.groups, 1, ig.depth_size, nullptr);
    const int64_t cols = cs.cg * RS;
    const int64_t tiles = ceil_div(cs.kg, Math::kBM) * ceil_div(cols, Math::kBN) * cs.groups;
    const RangeSplit split = plan_depth_split(tiles, cs.groups, pixels, Math::kBK);
    std::vector<acc_t<T>> partial(static_cast<size_t>(split.ranges * K * cols),
                                  static_cast<acc_t<T>>(NAN));
    const WeightGradGemm<T> wg{sh, g.data(), x.data(), partial.data(), cs.kg, cols, pixels};
    launch_implicit_gemm<Math>("weight grad", wg, cs.groups, split.ranges, split.range_len,
                               nullptr);
    for (int64_t i = 0; i < K * cols; ++i) {
      acc_t<T> sum = 0;
      for (int64_t part = 0; part < split.ranges; ++part) sum += partial[part * K * cols + i];
      gw[i] = ElementTraits<T>::from_acc(sum);
    }
  }

  const bool convolution_ok =
      matches(out, z_ref, "forward", math, cs) && matches(pre, z_ref, "preact", math, cs) &&
      matches(out_relu, relu_ref, "relu forward", math, cs) &&
      matches(pre_relu, z_ref, "relu preact", math, cs) &&
      matches(gx, gx_ref, "grad_input", math, cs) && matches(gw, gw_ref, "grad_weight", math, cs);
  if (!kDirect || !convolution_ok) return convolution_ok;

  // The backward first pass for relu (its derivative read from the saved output) with the
  // bias gradient: dz = grad_output where the output is positive, else 0; grad_bias[k] = the
  // sum of channel k's dz, per range of pixels (block_sum), then over the ranges. grad_output
  // is read through its strides: channels_last when the input is.
  std::vector<T> saved(z_ref.size()), grad_output(z_ref.size());
  const OutputView<T> saved_view{saved.data(), K * OH * OW, OH * OW, OW, 1};
  const OutputView<T> grad_view =
      cs.layout == 1 ? OutputView<T>{grad_output.data(), K * OH * OW, 1, OW * K, K}
                     : OutputView<T>{grad_output.data(), K * OH * OW, OH * OW, OW, 1};
  std::vector<double> dz_ref(z_ref.size()), grad_bias_ref(static_cast<size_t>(K), 0.0);
  for (int64_t n = 0; n < cs.n; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t o = ((n * K + k) * OH + oh) * OW + ow;
          saved[o] = from_double<T>(relu_ref[o]);
          grad_output[n * grad_view.stride_n + k * grad_view.stride_k + oh * grad_view.stride_h +
                      ow * grad_view.stride_w] = g[o];
          dz_ref[o] = relu_ref[o] > 0 ? gd[o] : 0.0;
          grad_bias_ref[k] += dz_ref[o];
        }
  const RangeSplit bias_ranges = plan_ranges(K, pixels);
  std::vector<T> dz(z_ref.size(), from_double<T>(-99)), grad_bias(bd.size(), from_double<T>(-99));
  std::vector<acc_t<T>> bias_partial(static_cast<size_t>(bias_ranges.ranges * K),
                                     static_cast<acc_t<T>>(NAN));
  emu::launch(dim3(static_cast<unsigned>(K), static_cast<unsigned>(bias_ranges.ranges)),
              kBlockThreads, activation_grad_kernel<T, Activation::kRelu>, sh, grad_view,
              saved_view, dz.data(), bias_partial.data(), slope, pixels, bias_ranges.range_len);
  emu::launch(dim3(1), kBlockThreads, sum_partials_kernel<T>, bias_partial.data(),
              bias_ranges.ranges, K, grad_bias.data());

  return matches(dz, dz_ref, "first pass", math, cs) &&
         matches(grad_bias, grad_bias_ref, "grad_bias", math, cs);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 10;
  std::mt19937_64 rng(20261130);
  std::vector<Case> cases = {
      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, true},     // 1x1 image, 1x1 kernel
      {2, 2, 3, 3, 7, 5, 3, 3, 2, 1, 1, 1, 1, 1, 2, 1, 1, true},     // groups, channels_last
      {1, 1, 40, 70, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, true},   // > 64 rows, many depth tiles
      {3, 1, 5, 9, 13, 11, 3, 2, 1, 1, 1, 0, 2, 1, 1, 2, 0, false},  // > 128 columns
      {2, 4, 1, 2, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, true},     // depthwise, multiplier 2
      {1, 2, 1, 1, 70, 70, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, true},   // depthwise, > 4096 pixels:
                                                                     // sums over 2 ranges
  };
  while (static_cast<int>(cases.size()) < 6 + random_cases) {
    Case c{};
    c.n = 1 + static_cast<int>(rng() % 3);
    c.groups = 1 + static_cast<int>(rng() % 3);
    c.cg = 1 + static_cast<int>(rng() % 5);
    c.kg = 1 + static_cast<int>(rng() % 6);
    c.h = 1 + static_cast<int>(rng() % 12);
    c.w = 1 + static_cast<int>(rng() % 12);
    c.r = 1 + static_cast<int>(rng() % 4);
    c.s = 1 + static_cast<int>(rng() % 4);
    c.stride_h = 1 + static_cast<int>(rng() % 3);
    c.stride_w = 1 + static_cast<int>(rng() % 3);
    c.pad_top = static_cast<int>(rng() % 3);
    c.pad_bottom = static_cast<int>(rng() % 3);
    c.pad_left = static_cast<int>(rng() % 3);
    c.pad_right = static_cast<int>(rng() % 3);
    c.dil_h = 1 + static_cast<int>(rng() % 2);
    c.dil_w = 1 + static_cast<int>(rng() % 2);
    c.layout = static_cast<int>(rng() % 3);
    c.bias = rng() % 2 == 0;
    if (c.dil_h * (c.r - 1) + 1 > c.h + c.pad_top + c.pad_bottom ||
        c.dil_w * (c.s - 1) + 1 > c.w + c.pad_left + c.pad_right) {
      continue;  // the dilated kernel must fit in the padded input
    }
    cases.push_back(c);
  }
  bool ok = true;
  for (const Case& c : cases) {
    ok = run_case<float, SimtTileMath<float>>(c, rng, "float-fma") && ok;
    ok = run_case<double, SimtTileMath<double>>(c, rng, "double-fma") && ok;
    ok = run_case<float, WmmaTileMath<float>>(c, rng, "float-tf32") && ok;
    ok = run_case<__half, WmmaTileMath<__half>>(c, rng, "half-wmma") && ok;
    ok = run_case<__nv_bfloat16, WmmaTileMath<__nv_bfloat16>>(c, rng, "bf16-wmma") && ok;
  }
  std::printf("%zu cases x 5 tile maths, %lld blocks emulated\n", cases.size(),
              static_cast<long long>(emu::blocks_run));
  if (!ok) return 1;
  std::printf("conv2d_act host: ok\n");
  return 0;
}
