// CUDA kernels of mtlcore::conv2d_act, conv2d_act_with_preact and conv2d_act_backward (schemas
// in csrc/mtlcore.cpp): act(conv2d(input, weight, bias)) and its gradients.
//
// Data layout. input x [N, C, H, W] is read through its four strides (NCHW, channels_last or
// any strided view); weight [K, C/groups, R, S] and bias [K] are made contiguous. Outputs
// (out, preact, grad_input, grad_weight, grad_bias) are new contiguous tensors. grad_output
// and saved [N, K, OH, OW] are read through their strides. Index mapping: input row
// ih = oh * stride_h - pad_top + r * dil_h (likewise for columns with pad_left); pad_bottom
// and pad_right only shape OH and OW. Element offsets, and offsets among a kernel's R x S
// taps (r * S + s), are 64-bit; spatial coordinates (ih, iw, oh, ow, r, s and the dilated tap
// offsets) are 32-bit: padded sizes, strides and dilations are checked to be below 2^30, and
// the dilated kernel fits in the padded input.
//
// Parallel split. Three convolutions run as one tiled implicit GEMM (conv2d_act_gemm.cuh), per
// group g (Cg = C/groups input and Kg = K/groups output channels per group):
//   forward:      rows k' < Kg, columns (n, oh, ow) over the whole batch, depth (c', r, s);
//                 A = weight rows, B = input gathered with zero padding. Epilogue: z = acc +
//                 bias, out = act(z) (and preact = z) stored once per element.
//   grad_input:   rows c' < Cg, columns (n, ih, iw), depth (k', r, s); A = weight, B = the
//                 scratch g gathered at oh = (ih + pad_top - r dil_h) / stride_h where that is
//                 exact and in range (zero elsewhere). Every grad_input element is written
//                 once.
//   grad_weight:  rows k' < Kg, columns (c', r, s), depth (n, oh, ow) = N*OH*OW; A = g, B =
//                 input gathered. The depth is split into ranges (blocks on blockIdx.z) whose
//                 fp32 (double for double) partial sums go to a [splits, K, Cg*R*S] buffer;
//                 a second kernel adds them in split order and rounds to the weight dtype.
// Depthwise convolutions (groups > 1 and one input channel per group, any channel
// multiplier) make M tiny, so they use direct kernels instead: one thread per output element
// (forward), one thread per input element (grad_input), and for grad_weight one block per
// (weight element, depth range) reducing into the same partial buffer and second kernel.
// Backward first pass: one block per (k, range of the N*OH*OW pixels) computes
// g = grad_output * act'(saved), writes it to a contiguous [N, K, OH, OW] scratch and reduces
// its sum into a [ranges, K] partial buffer, summed in range order by the second kernel for
// grad_bias. No atomics anywhere: every sum is taken in an order fixed by the shape, so
// results do not vary from run to run. Launches go to the current stream of input's device;
// ranges and splits depend only on the shape, never on the device. The device code (the GEMM
// problem classes, the direct kernels and their per-element functions) is in
// conv2d_act_problems.cuh, which tests/host/ also runs on the host.
//
// Numerics. Accumulation is in fp32 for float, half and bfloat16 (double for double). The
// GEMM operands enter the multiply in the input dtype: half and bfloat16 on tensor cores
// (wmma, fp32 accumulators); float on TF32 tensor cores when cuDNN convolutions may use TF32
// (torch.backends.cudnn.conv.fp32_precision, or the older allow_tf32: the flag F.conv2d
// follows, read for the conv operator; operands rounded to TF32 on the way in), otherwise on an FMA
// kernel in fp32; double on an FMA kernel in double. The depthwise kernels use FMA in fp32 (double)
// for every dtype. The bias is added and the activation applied in fp32 before the one rounding of
// each stored output (out = round(act(z)), preact = round(z), both from the unrounded z). Backward:
// g = grad_output * act'(saved) is computed in fp32 (double) from the stored values; grad_bias sums
// the unrounded g, while the GEMMs read g rounded to the input dtype (what the tensor cores take
// for half and bfloat16; for float it is exact). grad_input and grad_weight are rounded once, from
// their fp32 sums.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/activation.h"
#include "common/conv2d_act_args.h"
#include "cuda/conv2d_act_gemm.cuh"
#include "cuda/conv2d_act_problems.cuh"

namespace mtlcore {

namespace {

// The device code and the plans (conv2d_act_problems.cuh), and the GEMM's types.
using namespace cuda;  // NOLINT(google-build-using-namespace)

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the CUDA storage type of dtype.
template <typename Fn>
void dispatch_cuda_dtype(const char* op, at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kHalf:
      fn(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kDouble:
      fn(TypeTag<double>{});
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": the CUDA kernel does not support dtype ", dtype);
  }
}

// Calls fn(TypeTag<Math>{}) with the tile math for storage type T (see the header comment).
template <typename T, typename Fn>
void dispatch_tile_math(bool allow_tf32, Fn&& fn) {
  if constexpr (std::is_same_v<T, double>) {
    fn(TypeTag<cuda::SimtTileMath<double>>{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (allow_tf32) {
      fn(TypeTag<cuda::WmmaTileMath<float>>{});
    } else {
      fn(TypeTag<cuda::SimtTileMath<float>>{});
    }
  } else {
    fn(TypeTag<cuda::WmmaTileMath<T>>{});
  }
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// Blocks of a grid-stride elementwise kernel over `total` elements.
unsigned elementwise_blocks(int64_t total) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(total, kBlockThreads), 1, kMaxBlocks));
}

ConvShape make_conv_shape(const char* op, const Conv2dParams& p, const at::Tensor& input) {
  constexpr int64_t kMaxCoordinate = int64_t{1} << 30;
  const int64_t padded_h = p.h + p.pad_top + p.pad_bottom;
  const int64_t padded_w = p.w + p.pad_left + p.pad_right;
  // Coordinates are 32-bit in the kernels (see the header comment). The kernel's R and S need
  // no check of their own: the argument checks keep the dilated kernel within the padded input.
  TORCH_CHECK_VALUE(padded_h < kMaxCoordinate && padded_w < kMaxCoordinate, op,
                    ": the CUDA kernel needs the input's height and width plus padding below "
                    "2^30, got ",
                    padded_h, "x", padded_w, " (input ", p.h, "x", p.w, ")");
  TORCH_CHECK_VALUE(p.stride_h < kMaxCoordinate && p.stride_w < kMaxCoordinate, op,
                    ": the CUDA kernel needs stride below 2^30, got (", p.stride_h, ", ",
                    p.stride_w, ")");
  TORCH_CHECK_VALUE(p.dil_h < kMaxCoordinate && p.dil_w < kMaxCoordinate, op,
                    ": the CUDA kernel needs dilation below 2^30, got (", p.dil_h, ", ", p.dil_w,
                    ")");
  ConvShape sh{};
  sh.n = p.n;
  sh.c = p.c;
  sh.k = p.k;
  sh.c_per_group = p.c_per_group();
  sh.k_per_group = p.k_per_group();
  sh.h = static_cast<int>(p.h);
  sh.w = static_cast<int>(p.w);
  sh.oh = static_cast<int>(p.oh);
  sh.ow = static_cast<int>(p.ow);
  sh.r = static_cast<int>(p.r);
  sh.s = static_cast<int>(p.s);
  sh.stride_h = static_cast<int>(p.stride_h);
  sh.stride_w = static_cast<int>(p.stride_w);
  sh.pad_top = static_cast<int>(p.pad_top);
  sh.pad_left = static_cast<int>(p.pad_left);
  sh.dil_h = static_cast<int>(p.dil_h);
  sh.dil_w = static_cast<int>(p.dil_w);
  sh.input_plane = p.h * p.w;
  sh.output_plane = p.oh * p.ow;
  sh.kernel_area = p.r * p.s;
  sh.x_stride_n = input.stride(0);
  sh.x_stride_c = input.stride(1);
  sh.x_stride_h = input.stride(2);
  sh.x_stride_w = input.stride(3);
  return sh;
}

// Depthwise: several groups of one input channel each. The GEMMs would have M = K/groups
// (often 1) there; the direct kernels read each element a bounded number of times instead.
bool use_depthwise_kernels(const Conv2dParams& p) { return p.groups > 1 && p.c_per_group() == 1; }

template <typename T>
void launch_sum_partials(const acc_t<T>* partial, int64_t parts, int64_t len, T* out,
                         cudaStream_t stream) {
  if (len == 0) return;
  sum_partials_kernel<T>
      <<<elementwise_blocks(len), kBlockThreads, 0, stream>>>(partial, parts, len, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::TensorOptions accumulator_options(const at::Tensor& like, bool is_double) {
  return like.options().dtype(is_double ? at::kDouble : at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> conv2d_act_forward_cuda(
    const char* op, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, double negative_slope,
    bool with_preact) {
  const Conv2dParams p =
      check_conv2d_act_args(op, input, weight, bias, stride, padding, dilation, groups,
                            std::string_view(activation.data(), activation.size()), negative_slope,
                            {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_VALUE(input.is_cuda(), op, ": the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(p.output_sizes(), input.options());
  at::Tensor preact = with_preact ? at::empty(p.output_sizes(), input.options()) : at::Tensor();
  if (out.numel() == 0) return {out, preact};

  const ConvShape sh = make_conv_shape(op, p, input);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool allow_tf32 = at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_cuda_dtype(op, input.scalar_type(), [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const T* x_ptr = data_or_null<T>(input);
    const T* w_ptr = data_or_null<T>(w);
    const T* b_ptr = data_or_null<T>(b);
    T* out_ptr = mutable_data_or_null<T>(out);
    T* preact_ptr = mutable_data_or_null<T>(preact);
    const auto slope = static_cast<acc_t<T>>(negative_slope);
    dispatch_activation(p.activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
      if (use_depthwise_kernels(p)) {
        const int64_t total = out.numel();
        depthwise_forward_kernel<T, A><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
            sh, x_ptr, w_ptr, b_ptr, out_ptr, preact_ptr, slope, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const ForwardGemm<T, A> gemm{sh,
                                   x_ptr,
                                   w_ptr,
                                   b_ptr,
                                   out_ptr,
                                   preact_ptr,
                                   slope,
                                   sh.k_per_group,
                                   p.n * sh.output_plane,
                                   sh.c_per_group * sh.kernel_area};
      dispatch_tile_math<T>(allow_tf32, [&](auto math_tag) {
        using Math = typename decltype(math_tag)::type;
        cuda::launch_implicit_gemm<Math>(op, gemm, p.groups, 1, gemm.depth_size, stream);
      });
    });
  });
  return {out, preact};
}

}  // namespace

at::Tensor conv2d_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, double negative_slope) {
  return std::get<0>(conv2d_act_forward_cuda("mtlcore.conv2d_act", input, weight, bias, stride,
                                             padding, dilation, groups, activation, negative_slope,
                                             /*with_preact=*/false));
}

std::tuple<at::Tensor, at::Tensor> conv2d_act_with_preact_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, double negative_slope) {
  return conv2d_act_forward_cuda("mtlcore.conv2d_act_with_preact", input, weight, bias, stride,
                                 padding, dilation, groups, activation, negative_slope,
                                 /*with_preact=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_act_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  const char* op = "mtlcore.conv2d_act_backward";
  const Conv2dParams p =
      check_conv2d_act_args(op, input, weight, std::nullopt, stride, padding, dilation, groups,
                            std::string_view(activation.data(), activation.size()), negative_slope,
                            {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_conv2d_act_backward_args(op, p, input, grad_output, saved);
  TORCH_CHECK_VALUE(input.is_cuda(), op, ": the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());

  const auto [want_input, want_weight, want_bias] = output_mask;
  // Gradients not asked for come back as empty tensors.
  const std::vector<int64_t> not_requested{0};
  const std::vector<int64_t> input_sizes{p.n, p.c, p.h, p.w};
  const std::vector<int64_t> bias_sizes{p.k};
  at::Tensor grad_input = at::empty(want_input ? input_sizes : not_requested, input.options());
  at::Tensor grad_weight =
      at::empty(want_weight ? weight.sizes() : at::IntArrayRef(not_requested), weight.options());
  at::Tensor grad_bias = at::empty(want_bias ? bias_sizes : not_requested, weight.options());
  if (!want_input && !want_weight && !want_bias) return {grad_input, grad_weight, grad_bias};

  const ConvShape sh = make_conv_shape(op, p, input);
  const at::Tensor w = weight.contiguous();
  const bool allow_tf32 = at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
  const bool depthwise = use_depthwise_kernels(p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t pixels = p.n * sh.output_plane;  // N * OH * OW

  dispatch_cuda_dtype(op, input.scalar_type(), [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    using Acc = acc_t<T>;
    const at::TensorOptions acc_options = accumulator_options(input, std::is_same_v<T, double>);
    T* grad_weight_ptr = mutable_data_or_null<T>(grad_weight);
    T* grad_bias_ptr = mutable_data_or_null<T>(grad_bias);
    if (pixels == 0) {
      // Empty batch: grad_input is empty; the weight and bias gradients are empty sums.
      if (want_weight)
        launch_sum_partials<T>(nullptr, 0, grad_weight.numel(), grad_weight_ptr, stream);
      if (want_bias) launch_sum_partials<T>(nullptr, 0, p.k, grad_bias_ptr, stream);
      return;
    }

    // First pass: g = grad_output * act'(saved) and the bias partial sums.
    const at::Tensor g =
        want_input || want_weight ? at::empty(p.output_sizes(), input.options()) : at::Tensor();
    const RangeSplit bias_ranges = plan_ranges(p.k, pixels);
    const at::Tensor bias_partial =
        want_bias ? at::empty({bias_ranges.ranges, p.k}, acc_options) : at::Tensor();
    const OutputView<T> grad_output_view{data_or_null<T>(grad_output), grad_output.stride(0),
                                         grad_output.stride(1), grad_output.stride(2),
                                         grad_output.stride(3)};
    const OutputView<T> saved_view{data_or_null<T>(saved), saved.stride(0), saved.stride(1),
                                   saved.stride(2), saved.stride(3)};
    TORCH_CHECK_VALUE(p.k <= INT32_MAX, op, ": weight has ", p.k,
                      " output channels; the CUDA kernel supports at most 2^31 - 1");
    const dim3 first_pass_grid(static_cast<unsigned>(p.k),
                               static_cast<unsigned>(bias_ranges.ranges));
    dispatch_activation(p.activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
      activation_grad_kernel<T, A><<<first_pass_grid, kBlockThreads, 0, stream>>>(
          sh, grad_output_view, saved_view, mutable_data_or_null<T>(g),
          mutable_data_or_null<Acc>(bias_partial), static_cast<Acc>(negative_slope), pixels,
          bias_ranges.range_len);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (want_bias) {
      launch_sum_partials<T>(data_or_null<Acc>(bias_partial), bias_ranges.ranges, p.k,
                             grad_bias_ptr, stream);
    }

    const T* g_ptr = data_or_null<T>(g);
    const T* x_ptr = data_or_null<T>(input);
    const T* w_ptr = data_or_null<T>(w);
    if (want_input && grad_input.numel() > 0) {
      T* grad_input_ptr = mutable_data_or_null<T>(grad_input);
      if (depthwise) {
        const int64_t total = grad_input.numel();
        depthwise_input_grad_kernel<T><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
            sh, g_ptr, w_ptr, grad_input_ptr, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const InputGradGemm<T> gemm{sh,
                                    g_ptr,
                                    w_ptr,
                                    grad_input_ptr,
                                    sh.c_per_group,
                                    p.n * sh.input_plane,
                                    sh.k_per_group * sh.kernel_area};
        dispatch_tile_math<T>(allow_tf32, [&](auto math_tag) {
          using Math = typename decltype(math_tag)::type;
          cuda::launch_implicit_gemm<Math>(op, gemm, p.groups, 1, gemm.depth_size, stream);
        });
      }
    }

    if (want_weight) {
      const int64_t weight_numel = grad_weight.numel();  // K * Cg * R * S
      if (depthwise) {
        const RangeSplit ranges = plan_ranges(weight_numel, pixels);
        TORCH_CHECK_VALUE(weight_numel <= INT32_MAX, op, ": weight has ", weight_numel,
                          " elements; the depthwise CUDA kernel supports at most 2^31 - 1");
        const at::Tensor partial = at::empty({ranges.ranges, weight_numel}, acc_options);
        const dim3 grid(static_cast<unsigned>(weight_numel), static_cast<unsigned>(ranges.ranges));
        depthwise_weight_grad_kernel<T><<<grid, kBlockThreads, 0, stream>>>(
            sh, g_ptr, x_ptr, mutable_data_or_null<Acc>(partial), pixels, ranges.range_len);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_sum_partials<T>(data_or_null<Acc>(partial), ranges.ranges, weight_numel,
                               grad_weight_ptr, stream);
        return;
      }
      dispatch_tile_math<T>(allow_tf32, [&](auto math_tag) {
        using Math = typename decltype(math_tag)::type;
        const int64_t cols = sh.c_per_group * sh.kernel_area;
        const int64_t tiles =
            ceil_div(sh.k_per_group, Math::kBM) * ceil_div(cols, Math::kBN) * p.groups;
        const RangeSplit split = plan_depth_split(tiles, p.groups, pixels, Math::kBK);
        const at::Tensor partial = at::empty({split.ranges, p.k, cols}, acc_options);
        const WeightGradGemm<T> gemm{
            sh, g_ptr, x_ptr, mutable_data_or_null<Acc>(partial), sh.k_per_group, cols, pixels};
        cuda::launch_implicit_gemm<Math>(op, gemm, p.groups, split.ranges, split.range_len, stream);
        launch_sum_partials<T>(data_or_null<Acc>(partial), split.ranges, weight_numel,
                               grad_weight_ptr, stream);
      });
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace mtlcore

TORCH_LIBRARY_IMPL(mtlcore, CUDA, m) {
  m.impl("conv2d_act", &mtlcore::conv2d_act_cuda);
  m.impl("conv2d_act_with_preact", &mtlcore::conv2d_act_with_preact_cuda);
  m.impl("conv2d_act_backward", &mtlcore::conv2d_act_backward_cuda);
}
