// Compute kernels of mtlcore.conv2d_act on the CPU, one table per instruction set.
//
// conv2d_act_kernels.cpp is compiled once per ISA (base, avx2, avx512) into namespace
// mtlcore::cpu::<isa>; csrc/cpu/conv2d_act.cpp checks arguments, allocates, splits the work over
// threads and calls these functions, each of which runs on one thread.
//
// Every product of the op is a GEMM whose right operand is gathered from an image on the fly
// (implicit im2col, never materialised for a whole image):
//   forward      C[k][pixel]  = W[k][c,r,s]   * X[c,r,s][pixel]   then bias + activation
//   grad_input   C[c][pixel]  = W'[c][k,r,s]  * G[k,r,s][pixel]   (transposed convolution)
//   grad_weight  dW[k][c,r,s] = sum_pixels G[k][pixel] * X[c,r,s][pixel]
// where G is grad_output times the activation derivative, in a zero-padded row layout.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace mtlcore::cpu {

// How the GEMM operand B[depth][pixel] is read from an image (a source tensor of one image and
// one group). Output pixel p = y * dst_w + x; depth index d = (chan * r + ry) * s + sx. The
// source row is src_y = (y * ay + by + ry * cy) / qy, taken only when the division is exact and
// 0 <= src_y < src_h (zero otherwise); the same for columns with the x coefficients.
//   forward:    a = stride, b = -pad, c = dilation, q = 1
//   grad_input: a = 1,      b = pad,  c = -dilation, q = stride
template <typename T>
struct Gather {
  const T* src;
  int64_t stride_c, stride_y, stride_x;
  int64_t src_h, src_w;
  int64_t dst_w;
  int64_t chans, r, s;
  int64_t ay, by, cy, qy;
  int64_t ax, bx, cx, qx;
};

// What happens to the GEMM result: z = C[i][p] + bias[i] (no bias when null) is stored to
// preact[i * ld + p] when preact is not null, and act(z) to out[i * ld + p] (i < m, p in the
// job's pixel range). The gradient GEMMs use the identity without bias or preact.
template <typename T>
struct Epilogue {
  T* out;
  T* preact;
  int64_t ld;
  const T* bias;
  Activation activation;
  T negative_slope;
};

// One implicit-GEMM job: rows [0, m) of C for the pixels [p_begin, p_end) of one image/group.
template <typename T>
struct GemmJob {
  const T* a_packed;  // the group's A, packed by pack_a
  int64_t m, depth;
  Gather<T> b;
  int64_t p_begin, p_end;
  Epilogue<T> epilogue;
};

// One implicit-GEMM job on a zero-padded image: B[d][pixel (y, x)] =
// src[y * row_step + x * col_step + offsets[d]] (no bounds checks: the caller pads the image so
// that every window is inside, with kNr elements of slack at the end). Rows [0, m) of C for the
// pixels [p_begin, p_end) of one image/group. direct_gemm needs col_step == 1 (it loads kNr
// consecutive pixels); channel_gemm takes any.
template <typename T>
struct DirectGemmJob {
  const T* a_packed;
  int64_t m, depth;
  const T* src;
  const int64_t* offsets;
  int64_t row_step, col_step, out_w;
  int64_t p_begin, p_end;
  Epilogue<T> epilogue;
};

// G computed where it is read instead of read from memory: grad_output * act'(saved), both
// read through their element strides (n: image, c: channel, y, x; pointers at image 0, first
// channel of the group), ow pixels per output row. When bias is not null, each channel's sum
// of G over the job's images and pixels is added to bias[k] (k < m).
template <typename T>
struct GradSource {
  const T* grad_output;
  int64_t go_n, go_c, go_y, go_x;
  const T* saved;
  int64_t sv_n, sv_c, sv_y, sv_x;
  int64_t ow;
  Activation activation;
  T negative_slope;
  double* bias;
};

// One weight-gradient job: dW[k][d] for k < m and depth rows d in [d_begin, d_end), summed
// over images [0, num_images) and all their pixels (X gathered max_weight_grad_rows depth rows
// at a time against each chunk of G). G is read from g (rows zero-padded to g_ld, a multiple of the
// vector width) or, when g is null, computed from `source` block by block into g_block (m *
// weight_grad_block elements); dw[k * dw_ld + d] is overwritten.
template <typename T>
struct WeightGradJob {
  const T* g;  // image 0, first channel of the group
  GradSource<T> source;
  T* g_block;
  int64_t g_ld, g_image_stride, pixels;
  int64_t m;
  Gather<T> x;  // per image: x.src + image * x_image_stride
  int64_t x_image_stride;
  int64_t num_images;
  int64_t d_begin, d_end;
  T* dw;
  int64_t dw_ld;
};

// One weight-gradient job on G^T and a zero-padded input read in place (the layout of
// DirectGemmJob: depth row d of output pixel (y, x) at src + offsets[d] + y * row_step +
// x * col_step): dW[k][d] for k < m and depth rows d in [d_begin, d_end), summed over images
// [0, num_images) and all their out_h * out_w pixels; dw[k * dw_ld + d] is overwritten. G^T
// holds G transposed into panels of nr channels (transpose_g): channel j * nr + v of pixel p
// at gt[j * gt_panel + p * nr + v], channels beyond m zero.
template <typename T>
struct DirectWeightGradJob {
  const T* gt;  // image 0, first channel of the group
  int64_t gt_panel, gt_image;
  int64_t m;
  const T* src;  // image 0, first channel of the group
  const int64_t* offsets;
  int64_t src_image, row_step, col_step, out_h, out_w;
  int64_t num_images;
  int64_t d_begin, d_end;
  T* dw;
  int64_t dw_ld;
};

// Scatter-add of a block of GEMM columns into one image (and group) of the input gradient
// (col2im), in padded coordinates: for the whole output rows y in [y_begin, y_end), columns
// x < out_w and every depth row (chan, ry, sx),
//   dx[chan * plane + (y * stride_h + ry * dil_h) * row + x * stride_w + sx * dil_w]
//     += cols[((chan * r + ry) * s + sx) * ld + (y - y_begin) * out_w + x].
// dx is a zero-padded image (pad_top rows and pad_left columns before the real ones), so no
// target needs a bounds check. With stride_w == 1 the rows run as whole vectors: x goes up to
// round_up(out_w, lanes), which needs that many more columns in `row` (the extra lanes add
// zero).
template <typename T>
struct Col2ImJob {
  const T* cols;
  int64_t ld;
  int64_t y_begin, y_end, out_w;
  int64_t chans, r, s;
  int64_t stride_h, stride_w, dil_h, dil_w;
  T* dx;
  int64_t plane, row;
};

template <typename T>
struct ConvKernels {
  int64_t nr;                    // pixels per B panel (pixel-vectorised kernels)
  int64_t mr;                    // A row block of gemm / direct_gemm
  int64_t channel_block;         // A row block of channel_gemm (output channels per tile)
  int64_t lanes;                 // vector width in elements: G rows are padded to a multiple
  int64_t max_weight_grad_rows;  // depth rows weight_grad gathers at a time
  int64_t weight_grad_block;     // most pixels of G a weight-gradient job computes at a time
  int64_t workspace;             // elements of scratch memory one thread needs
  int64_t (*packed_a_size)(int64_t m, int64_t depth, int64_t block);
  // Packs row-major A [m][depth] (row stride lda) in row blocks of `block` (mr for gemm and
  // direct_gemm, channel_block for channel_gemm).
  void (*pack_a)(const T* a, int64_t lda, int64_t m, int64_t depth, int64_t block, T* packed);
  void (*gemm)(const GemmJob<T>& job, T* workspace);
  void (*direct_gemm)(const DirectGemmJob<T>& job);
  void (*channel_gemm)(const DirectGemmJob<T>& job);
  void (*weight_grad)(const WeightGradJob<T>& job, T* workspace);
  void (*direct_weight_grad)(const DirectWeightGradJob<T>& job);
  // xt[pn * ld_xt + t * nr + r] = rows[(pn * nr + r) * ld + t] for t < width (a multiple of
  // lanes) and every panel pn of nr rows; rows beyond `count` read as zero.
  void (*transpose_g)(const T* rows, int64_t count, int64_t ld, int64_t width, T* xt,
                      int64_t ld_xt);
  void (*col2im)(const Col2ImJob<T>& job);
  // G = grad_output * act'(saved) of channels [0, m) of image n at output pixels
  // [p0, p0 + pixels) (row after row) into rows of `out` (row stride ld), zero up to len; with
  // source.bias, each channel's sum of G is added to it. The backward's first pass (one plane
  // per call) and the weight gradient without G in memory (blocks) both use it.
  void (*grad_block)(const GradSource<T>& source, int64_t n, int64_t p0, int64_t pixels,
                     int64_t len, int64_t m, T* out, int64_t ld);
  // G of one channel plane (source at its image and channel, oh output rows) into a
  // zero-padded hp x wp plane, output row y at out + (top + y) * wp + left, every other element
  // zero; with source.bias, the plane's sum of G is added to source.bias[0]. The backward's
  // first pass when the input gradient reads G in place as a padded image.
  void (*grad_plane_padded)(const GradSource<T>& source, int64_t oh, int64_t top, int64_t left,
                            int64_t hp, int64_t wp, T* out);
};

struct ConvKernelTable {
  ConvKernels<float> f32;
  ConvKernels<double> f64;
};

namespace base {
extern const ConvKernelTable conv_kernels;
}
namespace avx2 {
extern const ConvKernelTable conv_kernels;
}
namespace avx512 {
extern const ConvKernelTable conv_kernels;
}

}  // namespace mtlcore::cpu
