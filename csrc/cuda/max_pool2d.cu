// CUDA kernels of mtlcore::max_pool2d and max_pool2d_backward (schemas in csrc/mtlcore.cpp;
// arguments, shapes and the selection rule in common/max_pool2d_args.h).
//
// Data layout. input [N, C, H, W] and grad_output [N, C, OH, OW] are read through their four
// strides (NCHW, channels_last or any strided view). output and grad_input are new tensors in
// the layout new_pool2d_tensor chooses (channels_last when input is, contiguous NCHW
// otherwise) and are written through their strides too. Window (oh, ow) covers input rows
// ih = oh * stride_h - pad_h + i * dil_h (i < kh) and columns likewise; rows and columns
// outside the input are skipped. Element offsets and thread indices are 64-bit; spatial
// coordinates are 32-bit (extents, strides and dilated kernels are checked below 2^30).
//
// Parallel split. Grid-stride loops, one thread per element of the tensor written, threads
// in that tensor's memory order (n, c, y, x for NCHW, n, y, x, c for channels_last) so the
// stores, and the loads of a like-laid-out input, are coalesced.
//   forward:  a thread per output element scans its window.
//   backward: a thread per input element (gather form) visits the windows that contain it in
//             increasing (oh, ow) row-major order, recomputes each window's selection from
//             input and adds that window's grad_output when the selection is this element.
//             Every grad_input element is written once: no atomics, no zero fill, and the
//             result does not vary from run to run (torch.use_deterministic_algorithms).
// Launches go to the current stream of input's device. The per-element functions live in
// cuda/max_pool2d_elements.cuh, __host__ __device__, so tests/host/ runs them on the host.
//
// Numerics. A window's valid elements are visited in row-major order, starting from the
// first; a later element v replaces the maximum when v > max or v is NaN, compared in float
// (double for double; half and bfloat16 converted exactly). The output is the selected
// element itself; a window with no element inside the input gives -inf and no gradient.
// Backward sums in float (double), starting from +0 in window order, and rounds once to the
// dtype; an element no window selects gets +0. Both match the CPU kernels bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/max_pool2d_args.h"
#include "cuda/max_pool2d_elements.cuh"

namespace mtlcore {

namespace {

using cuda::PoolShape;
using cuda::View4;

constexpr int kBlockThreads = 256;

template <typename T>
View4<T> view4(T* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
__global__ void max_pool2d_kernel(PoolShape s, View4<const T> in, View4<T> out, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cuda::max_pool2d_element(s, in, out, e);
  }
}

template <typename T>
__global__ void max_pool2d_backward_kernel(PoolShape s, View4<const T> grad_output,
                                           View4<const T> in, View4<T> grad_input, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    cuda::max_pool2d_backward_element(s, grad_output, in, grad_input, e);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

const std::vector<at::ScalarType>& cuda_dtypes() {
  static const std::vector<at::ScalarType> dtypes{at::kFloat, at::kDouble, at::kHalf,
                                                  at::kBFloat16};
  return dtypes;
}

PoolShape pool_shape(const Pool2dParams& p) {
  return {p.c,
          static_cast<int>(p.h),
          static_cast<int>(p.w),
          static_cast<int>(p.oh),
          static_cast<int>(p.ow),
          static_cast<int>(p.kh),
          static_cast<int>(p.kw),
          static_cast<int>(p.stride_h),
          static_cast<int>(p.stride_w),
          static_cast<int>(p.pad_h),
          static_cast<int>(p.pad_w),
          static_cast<int>(p.dil_h),
          static_cast<int>(p.dil_w),
          p.channels_last};
}

// Blocks of a grid-stride elementwise kernel over `total` elements.
unsigned elementwise_blocks(int64_t total) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  return static_cast<unsigned>(
      std::clamp<int64_t>((total + kBlockThreads - 1) / kBlockThreads, 1, kMaxBlocks));
}

}  // namespace

at::Tensor max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "mtlcore.max_pool2d";
  const Pool2dParams p = check_max_pool2d_args(op, input, kernel_size, stride, padding, dilation,
                                               ceil_mode, cuda_dtypes());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = new_pool2d_tensor(p, input, p.oh, p.ow);
  const int64_t total = output.numel();
  if (total == 0) return output;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    max_pool2d_kernel<scalar_t><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
        pool_shape(p), view4(input.const_data_ptr<scalar_t>(), input),
        view4(output.mutable_data_ptr<scalar_t>(), output), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    bool ceil_mode) {
  constexpr const char* op = "mtlcore.max_pool2d_backward";
  const Pool2dParams p = check_max_pool2d_args(op, input, kernel_size, stride, padding, dilation,
                                               ceil_mode, cuda_dtypes());
  check_max_pool2d_backward_args(op, p, input, grad_output);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = new_pool2d_tensor(p, input, p.h, p.w);
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    max_pool2d_backward_kernel<scalar_t><<<elementwise_blocks(total), kBlockThreads, 0, stream>>>(
        pool_shape(p), view4(grad_output.const_data_ptr<scalar_t>(), grad_output),
        view4(input.const_data_ptr<scalar_t>(), input),
        view4(grad_input.mutable_data_ptr<scalar_t>(), grad_input), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace mtlcore

TORCH_LIBRARY_IMPL(mtlcore, CUDA, m) {
  m.impl("max_pool2d", &mtlcore::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &mtlcore::max_pool2d_backward_cuda);
}
