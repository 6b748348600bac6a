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
// Launches go to the current stream of input's device.
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

// Host and device: the per-element functions below can be exercised on the host.
#define MTLCORE_HD __host__ __device__ __forceinline__

namespace mtlcore {

namespace {

constexpr int kBlockThreads = 256;

struct PoolShape {
  int64_t channels;
  int h, w, oh, ow;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool channels_last;  // layout of output and grad_input: the threads' element order
};

// A strided [N, C, rows, cols] tensor.
template <typename T>
struct View4 {
  T* data;
  int64_t stride_n, stride_c, stride_h, stride_w;

  MTLCORE_HD T& at(int64_t n, int64_t c, int y, int x) const {
    return data[n * stride_n + c * stride_c + y * stride_h + x * stride_w];
  }
};

template <typename T>
View4<T> view4(T* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Position {
  int64_t n, c;
  int y, x;
};

// Element e of an [N, C, rows, cols] tensor in memory order (NHWC when channels_last).
MTLCORE_HD Position unravel(int64_t e, int64_t channels, int rows, int cols, bool channels_last) {
  Position q;
  if (channels_last) {
    const int64_t pixel = e / channels;
    q.c = e - pixel * channels;
    const int64_t row = pixel / cols;
    q.x = static_cast<int>(pixel - row * cols);
    q.n = row / rows;
    q.y = static_cast<int>(row - q.n * rows);
  } else {
    const int64_t row = e / cols;
    q.x = static_cast<int>(e - row * cols);
    const int64_t plane = row / rows;
    q.y = static_cast<int>(row - plane * rows);
    q.n = plane / channels;
    q.c = plane - q.n * channels;
  }
  return q;
}

struct IndexRange {
  int begin, end;  // [begin, end)
};

// Taps of a window starting at `start` that fall inside [0, size); empty when none does.
MTLCORE_HD IndexRange valid_taps(int start, int k, int dil, int size) {
  const int begin = start < 0 ? (-start + dil - 1) / dil : 0;
  const int64_t end = start >= size ? 0 : (int64_t{size} - start + dil - 1) / dil;
  const int64_t clipped = end < k ? end : k;
  return {begin, static_cast<int>(clipped > begin ? clipped : begin)};
}

// Windows [begin, end) along one dimension, of out_size, that contain position pos.
MTLCORE_HD IndexRange windows_containing(int pos, int k, int stride, int pad, int dil,
                                         int out_size) {
  const int64_t last = int64_t{pos} + pad;            // tap 0: oh * stride <= last
  const int64_t first = last - int64_t{k - 1} * dil;  // tap k - 1: oh * stride >= first
  const int64_t begin = first <= 0 ? 0 : (first + stride - 1) / stride;
  const int64_t end = last / stride + 1;
  return {static_cast<int>(begin), static_cast<int>(end < out_size ? end : out_size)};
}

template <typename T>
struct Selection {
  T value;
  int ih, iw;
};

// The element window (oh, ow) of one [H, W] plane selects (see the header comment); -inf at
// (-1, -1) when no element of the window is inside the input.
template <typename T>
MTLCORE_HD Selection<T> select_window(const PoolShape& s, const View4<const T>& in, int64_t n,
                                      int64_t c, int oh, int ow) {
  using Acc = at::opmath_type<T>;
  const int ih0 = oh * s.stride_h - s.pad_h;
  const int iw0 = ow * s.stride_w - s.pad_w;
  const IndexRange rows = valid_taps(ih0, s.kh, s.dil_h, s.h);
  const IndexRange cols = valid_taps(iw0, s.kw, s.dil_w, s.w);
  if (rows.begin == rows.end || cols.begin == cols.end) {
    return {static_cast<T>(-std::numeric_limits<Acc>::infinity()), -1, -1};
  }
  Selection<T> best{in.at(n, c, ih0 + rows.begin * s.dil_h, iw0 + cols.begin * s.dil_w),
                    ih0 + rows.begin * s.dil_h, iw0 + cols.begin * s.dil_w};
  Acc best_value = static_cast<Acc>(best.value);
  // The first element is compared with itself too: a no-op (a NaN replaces itself).
  for (int i = rows.begin; i < rows.end; ++i) {
    const int ih = ih0 + i * s.dil_h;
    for (int j = cols.begin; j < cols.end; ++j) {
      const int iw = iw0 + j * s.dil_w;
      const T v = in.at(n, c, ih, iw);
      const Acc va = static_cast<Acc>(v);
      if (va > best_value || va != va) {  // va != va: NaN
        best = {v, ih, iw};
        best_value = va;
      }
    }
  }
  return best;
}

// Output element e (in output's memory order).
template <typename T>
MTLCORE_HD void max_pool2d_element(const PoolShape& s, const View4<const T>& in,
                                   const View4<T>& out, int64_t e) {
  const Position q = unravel(e, s.channels, s.oh, s.ow, s.channels_last);
  out.at(q.n, q.c, q.y, q.x) = select_window(s, in, q.n, q.c, q.y, q.x).value;
}

// grad_input element e (in grad_input's memory order): the windows containing it, in
// increasing (oh, ow) order, those between its dilated taps skipped (so never an empty one).
template <typename T>
MTLCORE_HD void max_pool2d_backward_element(const PoolShape& s, const View4<const T>& grad_output,
                                            const View4<const T>& in, const View4<T>& grad_input,
                                            int64_t e) {
  using Acc = at::opmath_type<T>;
  const Position q = unravel(e, s.channels, s.h, s.w, s.channels_last);
  const IndexRange rows = windows_containing(q.y, s.kh, s.stride_h, s.pad_h, s.dil_h, s.oh);
  const IndexRange cols = windows_containing(q.x, s.kw, s.stride_w, s.pad_w, s.dil_w, s.ow);
  Acc sum = Acc(0);
  for (int oh = rows.begin; oh < rows.end; ++oh) {
    if ((q.y + s.pad_h - oh * s.stride_h) % s.dil_h != 0) continue;
    for (int ow = cols.begin; ow < cols.end; ++ow) {
      if ((q.x + s.pad_w - ow * s.stride_w) % s.dil_w != 0) continue;
      const Selection<T> sel = select_window(s, in, q.n, q.c, oh, ow);
      if (sel.ih == q.y && sel.iw == q.x) {
        sum += static_cast<Acc>(grad_output.at(q.n, q.c, oh, ow));
      }
    }
  }
  grad_input.at(q.n, q.c, q.y, q.x) = static_cast<T>(sum);
}

template <typename T>
__global__ void max_pool2d_kernel(PoolShape s, View4<const T> in, View4<T> out, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    max_pool2d_element(s, in, out, e);
  }
}

template <typename T>
__global__ void max_pool2d_backward_kernel(PoolShape s, View4<const T> grad_output,
                                           View4<const T> in, View4<T> grad_input, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    max_pool2d_backward_element(s, grad_output, in, grad_input, e);
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
