// Per-element functions of the CUDA max_pool2d kernels (csrc/cuda/max_pool2d.cu, whose header
// comment gives the layout, the selection rule and the numerics): the window an output
// element selects and the gradient an input element gathers. They are __host__ __device__ so
// that tests/host/max_pool2d_host.cu can run them on the host against a brute-force pooling.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>

#ifndef MTLCORE_HD
#define MTLCORE_HD __host__ __device__ __forceinline__
#endif

namespace mtlcore::cuda {

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

}  // namespace mtlcore::cuda
