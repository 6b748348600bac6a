// The device code of mtlcore.conv2d_act's CUDA kernels (csrc/cuda/conv2d_act.cu, whose
// header comment gives the data layout, the parallel split and the numerics, holds the host
// side): the shape, the three implicit GEMMs (forward, input gradient, weight gradient;
// interface in conv2d_act_gemm.cuh), the shape-only plans of the depth splits, and the direct
// kernels (depthwise convolutions, the backward first pass, the sums of partials) with their
// per-element functions. In a header so that tests/host/ can run it all on the host (the
// element functions are __host__ __device__; the kernels run under tests/host/cuda_emu.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/activation.h"
#include "cuda/conv2d_act_gemm.cuh"

namespace mtlcore::cuda {

struct ConvShape {
  int64_t n, c, k;
  int64_t c_per_group, k_per_group;
  int h, w, oh, ow, r, s;
  int stride_h, stride_w, pad_top, pad_left, dil_h, dil_w;
  int64_t input_plane;   // h * w
  int64_t output_plane;  // oh * ow
  int64_t kernel_area;   // r * s
  int64_t x_stride_n, x_stride_c, x_stride_h, x_stride_w;
};

// A strided [N, K, OH, OW] tensor read by the backward first pass.
template <typename T>
struct OutputView {
  const T* data;
  int64_t stride_n, stride_k, stride_h, stride_w;

  MTLCORE_HD T at(int64_t n, int64_t k, int64_t oh, int64_t ow) const {
    return data[n * stride_n + k * stride_k + oh * stride_h + ow * stride_w];
  }
};

// An input position of the forward gather: batch offset and the top-left corner of the
// receptive field (may be negative: padding).
struct InputPixel {
  int64_t x_batch;  // n * x_stride_n
  int ih0;          // oh * stride_h - pad_top
  int iw0;          // ow * stride_w - pad_left
};

// A kernel tap of the forward gather: input channel offset and dilated tap offsets.
struct KernelTap {
  int64_t x_channel;  // c * x_stride_c
  int r_dil;          // r * dil_h
  int s_dil;          // s * dil_w
};

template <typename T>
MTLCORE_HD T gather_input(const T* x, const ConvShape& sh, const InputPixel& px,
                          const KernelTap& tap) {
  const int ih = px.ih0 + tap.r_dil;
  const int iw = px.iw0 + tap.s_dil;
  if (static_cast<unsigned>(ih) >= static_cast<unsigned>(sh.h) ||
      static_cast<unsigned>(iw) >= static_cast<unsigned>(sh.w)) {
    return ElementTraits<T>::zero();
  }
  return x[px.x_batch + tap.x_channel + ih * sh.x_stride_h + iw * sh.x_stride_w];
}

MTLCORE_HD InputPixel input_pixel(const ConvShape& sh, int64_t n, int oh, int ow) {
  return {n * sh.x_stride_n, oh * sh.stride_h - sh.pad_top, ow * sh.stride_w - sh.pad_left};
}

MTLCORE_HD KernelTap kernel_tap(const ConvShape& sh, int64_t channel, int r, int s) {
  return {channel * sh.x_stride_c, r * sh.dil_h, s * sh.dil_w};
}

// Stores round(act(z)) at out[index] and, when preact is given, round(z) at preact[index].
template <Activation A, typename T>
MTLCORE_HD void store_activated(T* out, T* preact, int64_t index, acc_t<T> z,
                                acc_t<T> negative_slope) {
  out[index] = ElementTraits<T>::from_acc(act::forward<A, acc_t<T>>(z, negative_slope));
  if (preact != nullptr) preact[index] = ElementTraits<T>::from_acc(z);
}

// ---------------------------------------------------------------------------------------
// The three implicit GEMMs (interface in conv2d_act_gemm.cuh).
// ---------------------------------------------------------------------------------------

// out[n, k, oh, ow] = act(bias[k] + sum_{c', r, s} weight[k, c', r, s] * x[n, c, ih, iw]).
template <typename T, Activation A>
struct ForwardGemm {
  using Element = T;
  static constexpr bool kBLoadAlongCols = true;  // consecutive columns: consecutive ow
  struct ColEntry {
    InputPixel pixel;
    int64_t out_pixel;  // n * K * OH * OW + oh * OW + ow
  };
  struct DepthEntry {
    KernelTap tap;
    int64_t w_index;  // g * Kg * depth + d: weight[g * Kg + row] is at w_index + row * depth
  };

  ConvShape sh;
  const T* x;
  const T* weight;
  const T* bias;  // may be null
  T* out;
  T* preact;  // may be null
  acc_t<T> negative_slope;
  int64_t m_size;      // Kg
  int64_t col_size;    // N * OH * OW
  int64_t depth_size;  // Cg * R * S

  MTLCORE_HD ColEntry col_entry(int64_t /*group*/, int64_t col) const {
    const int64_t n = col / sh.output_plane;
    const int64_t p = col - n * sh.output_plane;
    const int oh = static_cast<int>(p / sh.ow);
    const int ow = static_cast<int>(p - static_cast<int64_t>(oh) * sh.ow);
    return {input_pixel(sh, n, oh, ow), n * sh.k * sh.output_plane + p};
  }
  MTLCORE_HD DepthEntry depth_entry(int64_t group, int64_t d) const {
    const int64_t c = d / sh.kernel_area;
    const int64_t rs = d - c * sh.kernel_area;
    const int r = static_cast<int>(rs / sh.s);
    const int s = static_cast<int>(rs - static_cast<int64_t>(r) * sh.s);
    return {kernel_tap(sh, group * sh.c_per_group + c, r, s), group * m_size * depth_size + d};
  }
  MTLCORE_HD T a_at(int64_t row, const DepthEntry& de) const {
    return weight[de.w_index + row * depth_size];
  }
  MTLCORE_HD T b_at(const DepthEntry& de, const ColEntry& ce) const {
    return gather_input(x, sh, ce.pixel, de.tap);
  }
  MTLCORE_HD void store(int64_t k, int64_t /*split*/, const ColEntry& ce, acc_t<T> acc) const {
    const acc_t<T> z = bias != nullptr ? acc + ElementTraits<T>::to_acc(bias[k]) : acc;
    store_activated<A>(out, preact, ce.out_pixel + k * sh.output_plane, z, negative_slope);
  }
};

// grad_input[n, c, ih, iw] = sum_{k', r, s} weight[k, c', r, s] * g[n, k, oh, ow] with
// oh * stride_h = ih + pad_top - r * dil_h (exact, 0 <= oh < OH), likewise ow.
template <typename T>
struct InputGradGemm {
  using Element = T;
  static constexpr bool kBLoadAlongCols = true;  // consecutive columns: consecutive iw
  struct ColEntry {
    int64_t g_batch;   // n * K * OH * OW
    int64_t dx_pixel;  // n * C * H * W + ih * W + iw
    int ih_pad;        // ih + pad_top
    int iw_pad;        // iw + pad_left
  };
  struct DepthEntry {
    int64_t g_channel;  // k * OH * OW
    int64_t w_index;    // k * Cg * R * S + r * S + s: weight[k, row, r, s] at + row * R * S
    int r_dil;
    int s_dil;
  };

  ConvShape sh;
  const T* g;  // contiguous [N, K, OH, OW]
  const T* weight;
  T* grad_input;
  int64_t m_size;      // Cg
  int64_t col_size;    // N * H * W
  int64_t depth_size;  // Kg * R * S

  MTLCORE_HD ColEntry col_entry(int64_t /*group*/, int64_t col) const {
    const int64_t n = col / sh.input_plane;
    const int64_t q = col - n * sh.input_plane;
    const int ih = static_cast<int>(q / sh.w);
    const int iw = static_cast<int>(q - static_cast<int64_t>(ih) * sh.w);
    return {n * sh.k * sh.output_plane, n * sh.c * sh.input_plane + q, ih + sh.pad_top,
            iw + sh.pad_left};
  }
  MTLCORE_HD DepthEntry depth_entry(int64_t group, int64_t d) const {
    const int64_t kk = d / sh.kernel_area;
    const int64_t rs = d - kk * sh.kernel_area;
    const int r = static_cast<int>(rs / sh.s);
    const int s = static_cast<int>(rs - static_cast<int64_t>(r) * sh.s);
    const int64_t k = group * sh.k_per_group + kk;
    return {k * sh.output_plane, k * sh.c_per_group * sh.kernel_area + rs, r * sh.dil_h,
            s * sh.dil_w};
  }
  MTLCORE_HD T a_at(int64_t row, const DepthEntry& de) const {
    return weight[de.w_index + row * sh.kernel_area];
  }
  MTLCORE_HD T b_at(const DepthEntry& de, const ColEntry& ce) const {
    const int oh_scaled = ce.ih_pad - de.r_dil;
    const int ow_scaled = ce.iw_pad - de.s_dil;
    if (oh_scaled < 0 || ow_scaled < 0) return ElementTraits<T>::zero();
    const int oh = oh_scaled / sh.stride_h;
    const int ow = ow_scaled / sh.stride_w;
    if (oh * sh.stride_h != oh_scaled || ow * sh.stride_w != ow_scaled || oh >= sh.oh ||
        ow >= sh.ow) {
      return ElementTraits<T>::zero();
    }
    return g[ce.g_batch + de.g_channel + static_cast<int64_t>(oh) * sh.ow + ow];
  }
  MTLCORE_HD void store(int64_t c, int64_t /*split*/, const ColEntry& ce, acc_t<T> acc) const {
    grad_input[ce.dx_pixel + c * sh.input_plane] = ElementTraits<T>::from_acc(acc);
  }
};

// partial[split, k, (c', r, s)] = sum over the split's (n, oh, ow) of g[n, k, oh, ow] *
// x[n, c, ih, iw].
template <typename T>
struct WeightGradGemm {
  using Element = T;
  static constexpr bool kBLoadAlongCols = false;  // consecutive depth: consecutive ow
  struct ColEntry {
    KernelTap tap;
    int64_t col;  // c' * R * S + r * S + s
  };
  struct DepthEntry {
    InputPixel pixel;
    int64_t g_offset;  // n * K * OH * OW + g * Kg * OH * OW + oh * OW + ow
  };

  ConvShape sh;
  const T* g;  // contiguous [N, K, OH, OW]
  const T* x;
  acc_t<T>* partial;   // [splits, K, Cg * R * S]
  int64_t m_size;      // Kg
  int64_t col_size;    // Cg * R * S
  int64_t depth_size;  // N * OH * OW

  MTLCORE_HD ColEntry col_entry(int64_t group, int64_t col) const {
    const int64_t c = col / sh.kernel_area;
    const int64_t rs = col - c * sh.kernel_area;
    const int r = static_cast<int>(rs / sh.s);
    const int s = static_cast<int>(rs - static_cast<int64_t>(r) * sh.s);
    return {kernel_tap(sh, group * sh.c_per_group + c, r, s), col};
  }
  MTLCORE_HD DepthEntry depth_entry(int64_t group, int64_t d) const {
    const int64_t n = d / sh.output_plane;
    const int64_t p = d - n * sh.output_plane;
    const int oh = static_cast<int>(p / sh.ow);
    const int ow = static_cast<int>(p - static_cast<int64_t>(oh) * sh.ow);
    return {input_pixel(sh, n, oh, ow), (n * sh.k + group * sh.k_per_group) * sh.output_plane + p};
  }
  MTLCORE_HD T a_at(int64_t row, const DepthEntry& de) const {
    return g[de.g_offset + row * sh.output_plane];
  }
  MTLCORE_HD T b_at(const DepthEntry& de, const ColEntry& ce) const {
    return gather_input(x, sh, de.pixel, ce.tap);
  }
  MTLCORE_HD void store(int64_t k, int64_t split, const ColEntry& ce, acc_t<T> acc) const {
    partial[(split * sh.k + k) * col_size + ce.col] = acc;
  }
};

// Depthwise forward, output element e (contiguous index) = (n, k, oh, ow).
template <typename T, Activation A>
MTLCORE_HD void depthwise_forward_element(const ConvShape& sh, const T* x, const T* weight,
                                          const T* bias, T* out, T* preact, acc_t<T> negative_slope,
                                          int64_t e) {
  using Acc = acc_t<T>;
  const int64_t nk = e / sh.output_plane;
  const int64_t p = e - nk * sh.output_plane;
  const int64_t n = nk / sh.k;
  const int64_t k = nk - n * sh.k;
  const int oh = static_cast<int>(p / sh.ow);
  const int ow = static_cast<int>(p - static_cast<int64_t>(oh) * sh.ow);
  const InputPixel px = input_pixel(sh, n, oh, ow);
  const int64_t channel = k / sh.k_per_group;  // one input channel per group
  const T* w = weight + k * sh.kernel_area;
  Acc acc = Acc(0);
  for (int r = 0; r < sh.r; ++r) {
    for (int s = 0; s < sh.s; ++s) {
      const Acc xv =
          ElementTraits<T>::to_acc(gather_input(x, sh, px, kernel_tap(sh, channel, r, s)));
      acc = cuda::fused_multiply_add(
          ElementTraits<T>::to_acc(w[static_cast<int64_t>(r) * sh.s + s]), xv, acc);
    }
  }
  const Acc z = bias != nullptr ? acc + ElementTraits<T>::to_acc(bias[k]) : acc;
  store_activated<A>(out, preact, e, z, negative_slope);
}

// Depthwise grad_input, input element e (contiguous index) = (n, c, ih, iw); channel c's group
// holds output channels c * Kg ... c * Kg + Kg - 1.
template <typename T>
MTLCORE_HD void depthwise_input_grad_element(const ConvShape& sh, const T* g, const T* weight,
                                             T* grad_input, int64_t e) {
  using Acc = acc_t<T>;
  const int64_t nc = e / sh.input_plane;
  const int64_t q = e - nc * sh.input_plane;
  const int64_t n = nc / sh.c;
  const int64_t c = nc - n * sh.c;
  const int ih_pad = static_cast<int>(q / sh.w) + sh.pad_top;
  const int iw_pad = static_cast<int>(q % sh.w) + sh.pad_left;
  Acc acc = Acc(0);
  for (int64_t k = c * sh.k_per_group; k < (c + 1) * sh.k_per_group; ++k) {
    const T* gk = g + (n * sh.k + k) * sh.output_plane;
    const T* wk = weight + k * sh.kernel_area;
    for (int r = 0; r < sh.r; ++r) {
      const int oh_scaled = ih_pad - r * sh.dil_h;
      if (oh_scaled < 0) break;  // only decreases with r
      const int oh = oh_scaled / sh.stride_h;
      if (oh * sh.stride_h != oh_scaled || oh >= sh.oh) continue;
      for (int s = 0; s < sh.s; ++s) {
        const int ow_scaled = iw_pad - s * sh.dil_w;
        if (ow_scaled < 0) break;  // only decreases with s
        const int ow = ow_scaled / sh.stride_w;
        if (ow * sh.stride_w != ow_scaled || ow >= sh.ow) continue;
        acc = cuda::fused_multiply_add(
            ElementTraits<T>::to_acc(wk[static_cast<int64_t>(r) * sh.s + s]),
            ElementTraits<T>::to_acc(gk[static_cast<int64_t>(oh) * sh.ow + ow]), acc);
      }
    }
  }
  grad_input[e] = ElementTraits<T>::from_acc(acc);
}

// The depthwise weight element o = k * R * S + r * S + s, as its output channel and input tap.
struct DepthwiseTap {
  int64_t k;
  KernelTap tap;
};

MTLCORE_HD DepthwiseTap depthwise_tap(const ConvShape& sh, int64_t o) {
  const int64_t k = o / sh.kernel_area;
  const int64_t rs = o - k * sh.kernel_area;
  return {k, kernel_tap(sh, k / sh.k_per_group, static_cast<int>(rs / sh.s),
                        static_cast<int>(rs % sh.s))};
}

// Depthwise grad_weight: the term of pixel j = (n, oh, ow) in the sum of weight element `dt`.
template <typename T>
MTLCORE_HD acc_t<T> depthwise_weight_grad_term(const ConvShape& sh, const T* g, const T* x,
                                               const DepthwiseTap& dt, int64_t j) {
  const int64_t n = j / sh.output_plane;
  const int64_t p = j - n * sh.output_plane;
  const int oh = static_cast<int>(p / sh.ow);
  const int ow = static_cast<int>(p - static_cast<int64_t>(oh) * sh.ow);
  const T xv = gather_input(x, sh, input_pixel(sh, n, oh, ow), dt.tap);
  return ElementTraits<T>::to_acc(g[(n * sh.k + dt.k) * sh.output_plane + p]) *
         ElementTraits<T>::to_acc(xv);
}

// Backward first pass at channel k, pixel j = (n, oh, ow): dz = grad_output * act'(saved),
// stored rounded into g when g is given; returns the unrounded dz.
template <typename T, Activation A>
MTLCORE_HD acc_t<T> activation_grad_element(const ConvShape& sh, const OutputView<T>& grad_output,
                                            const OutputView<T>& saved, T* g,
                                            acc_t<T> negative_slope, int64_t k, int64_t j) {
  using Acc = acc_t<T>;
  const int64_t n = j / sh.output_plane;
  const int64_t p = j - n * sh.output_plane;
  const int64_t oh = p / sh.ow;
  const int64_t ow = p - oh * sh.ow;
  const Acc dy = ElementTraits<T>::to_acc(grad_output.at(n, k, oh, ow));
  const Acc sv = ElementTraits<T>::to_acc(saved.at(n, k, oh, ow));
  const Acc dz = act::backward<A, Acc>(dy, sv, negative_slope);
  if (g != nullptr) g[(n * sh.k + k) * sh.output_plane + p] = ElementTraits<T>::from_acc(dz);
  return dz;
}

// How a sum over `length` terms for each of `outputs` results is cut into ranges: enough
// blocks to fill the GPU, each range long enough to amortise its partial. Depends on the
// shape only.
struct RangeSplit {
  int64_t ranges;
  int64_t range_len;
};

inline RangeSplit plan_ranges(int64_t outputs, int64_t length) {
  constexpr int64_t kTargetBlocks = 1024;
  constexpr int64_t kMinRangeLen = 4096;
  const int64_t max_ranges = std::max<int64_t>(1, ceil_div(length, kMinRangeLen));
  const int64_t wanted = std::clamp<int64_t>(ceil_div(kTargetBlocks, outputs), 1, max_ranges);
  const int64_t range_len = ceil_div(length, wanted);
  return {ceil_div(length, range_len), range_len};
}

// The depth split of the weight-gradient GEMM: `tiles` output tiles over all groups, depth
// N*OH*OW, ranges that are multiples of bk with at least kMinTilesPerSplit steps each.
inline RangeSplit plan_depth_split(int64_t tiles, int64_t groups, int64_t depth, int64_t bk) {
  constexpr int64_t kTargetBlocks = 512;
  constexpr int64_t kMinTilesPerSplit = 8;
  int64_t splits = ceil_div(kTargetBlocks, tiles);
  splits = std::min(splits, ceil_div(depth, kMinTilesPerSplit * bk));
  // gridDim.z = groups * splits: with more groups than that, one split and several launches.
  splits = std::min(splits, 65535 / groups);
  splits = std::max<int64_t>(splits, 1);
  const int64_t chunk = ceil_div(ceil_div(depth, splits), bk) * bk;
  return {ceil_div(depth, chunk), chunk};
}

// Threads per block of the direct and reduction kernels.
constexpr int kBlockThreads = 256;

// ---------------------------------------------------------------------------------------
// Direct kernels: depthwise convolutions, the backward first pass, reductions.
// ---------------------------------------------------------------------------------------

// Sum of v over the block, valid in thread 0; a fixed tree (deterministic). All threads call.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ Acc warp_sums[kWarps];
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : Acc(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kBlockThreads)
    depthwise_forward_kernel(ConvShape sh, const T* x, const T* weight, const T* bias, T* out,
                             T* preact, acc_t<T> negative_slope, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    depthwise_forward_element<T, A>(sh, x, weight, bias, out, preact, negative_slope, e);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    depthwise_input_grad_kernel(ConvShape sh, const T* g, const T* weight, T* grad_input,
                                int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    depthwise_input_grad_element(sh, g, weight, grad_input, e);
  }
}

// Block (o = k * R * S + r * S + s, range) sums the range's terms into partial[range, o].
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    depthwise_weight_grad_kernel(ConvShape sh, const T* g, const T* x, acc_t<T>* partial,
                                 int64_t pixels, int64_t range_len) {
  const int64_t o = blockIdx.x;
  const int64_t range = blockIdx.y;
  const DepthwiseTap dt = depthwise_tap(sh, o);
  const int64_t begin = range * range_len;
  const int64_t end = min(pixels, begin + range_len);
  acc_t<T> sum = acc_t<T>(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += kBlockThreads) {
    sum += depthwise_weight_grad_term(sh, g, x, dt, j);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[range * gridDim.x + o] = sum;
}

// Block (k, range) runs the first pass over the range's pixels and, when bias_partial is
// given, stores the sum of dz at bias_partial[range, k].
template <typename T, Activation A>
__global__ void __launch_bounds__(kBlockThreads)
    activation_grad_kernel(ConvShape sh, OutputView<T> grad_output, OutputView<T> saved, T* g,
                           acc_t<T>* bias_partial, acc_t<T> negative_slope, int64_t pixels,
                           int64_t range_len) {
  const int64_t k = blockIdx.x;
  const int64_t range = blockIdx.y;
  const int64_t begin = range * range_len;
  const int64_t end = min(pixels, begin + range_len);
  acc_t<T> sum = acc_t<T>(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += kBlockThreads) {
    sum += activation_grad_element<T, A>(sh, grad_output, saved, g, negative_slope, k, j);
  }
  if (bias_partial != nullptr) {
    sum = block_sum(sum);
    if (threadIdx.x == 0) bias_partial[range * sh.k + k] = sum;
  }
}

// out[i] = round(sum_{p < parts} partial[p * len + i]), p in increasing order; zeros when
// parts == 0.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    sum_partials_kernel(const acc_t<T>* partial, int64_t parts, int64_t len, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> sum = acc_t<T>(0);
    for (int64_t p = 0; p < parts; ++p) sum += partial[p * len + i];
    out[i] = ElementTraits<T>::from_acc(sum);
  }
}

}  // namespace mtlcore::cuda
