// mtlcore.conv2d_act on the CPU: argument checks, allocation and the split over threads. The
// arithmetic is in conv2d_act_kernels.cpp (compiled per ISA, chosen at run time).
//
// Layout. input [N, C, H, W] is read through its strides (NCHW, channels_last and views alike)
//   into a zero-padded NCHW copy that the micro-kernels read in place; weight and bias are made
//   contiguous (small). Outputs are new contiguous NCHW tensors.
// Kernels. Forward and (unit-stride) input gradient run one of two implicit GEMMs on padded
//   images: pixel-vectorised (6 channels x 16 pixels of one output row) or channel-vectorised
//   (16 channels x 6 pixels, any column stride), whichever prefer_channel_tiles() expects to
//   leave fewer lanes idle. The input gradient of a strided layer, or of one whose padded
//   gradient would be more than an eighth zero border (valid convolutions of small images), is
//   computed by columns instead (a GEMM on G's rows, then a vectorised scatter-add into a
//   padded image); with fewer than 4 (image, group) jobs a strided one gathers panels.
// Parallel split (one parallel region per product, torch.set_num_threads governs it; the
//   threads take the jobs one at a time from a shared counter, cpu/parallel.h, so a core slowed
//   by another process does not hold up the op; each job writes its own outputs or partial
//   sums, so which thread runs it does not change the result):
//   grad_input by columns: one job per (image, group), in blocks of whole output rows;
//   forward and grad_input: jobs = (image, group, block of up to 8 pixel panels), at least
//     four jobs per thread when the problem allows; every output element is computed by one
//     job, so the result does not depend on the thread count;
//   first backward pass: jobs of whole (image, channel) planes, about 4096 pixels each
//     (not one per plane: two threads taking 4096 jobs of 169 pixels each from one counter
//     spent more time on the counter's cache line than on the planes): g = grad_output *
//     act'(saved) in a zero-padded row layout (or, when the input gradient is a direct
//     convolution of G and the weight gradient can take G transposed, straight into the
//     zero-padded image layout that the input gradient reads in place: GradInMemory), and
//     each plane's bias-gradient sum (in double); planes are then summed per channel in image
//     order;
//   grad_weight: jobs = (image split, group, band of depth rows). The image splits depend
//     only on the shapes (up to 8; 1 with 8 groups or more) and their partial sums are added
//     in split order, so grad_weight does not depend on the thread count either; a job reads
//     its images' G once for all its depth rows, so bands (any number of depth rows) are cut
//     only when there are fewer than four (split, group) jobs per thread. With G in memory and
//     channels that fill the vectors, G is first transposed into panels of channels, one job
//     per (image, group), and the jobs read it and a zero-padded input copy in place
//     (use_direct_weight_grad).
//   Without an input gradient and with at most max_weight_grad_rows depth rows per group (a
//     first layer), there is no first pass: each grad_weight job takes every depth row of up
//     to an eighth of the images (a shape-only split) and computes G block by block (in L2) as
//     it reads it, with the bias-gradient sums of its channels (per split, in double, added in
//     split order). G then never goes through memory: grad_output and saved are read once.
// Memory. The forward keeps nothing besides its outputs; while it runs it uses the padded
//   input copy. The backward uses G (the size of grad_output, rows padded to the vector
//   width; without an input gradient, one block of G per thread instead: at most 2048 pixels
//   of every channel of a group, 256 kB for 32 channels; in the padded image layout, the
//   size of the input gradient's padded image), a padded copy of G for a unit-stride input
//   gradient when G is in rows, the weights rearranged and packed, and one small workspace per
//   thread (by columns: a block of columns, at most about 256 kB, and the padded image);
//   grad_weight adds partial sums of up to 8 weight-sized buffers and, on the direct path, G^T (G's
//   size, the channels rounded up to the vector panels) and a zero-padded input copy. The padded
//   copies, G and the workspaces are scratch memory that the thread keeps for the next call
//   (cpu/scratch.h: no page faults on every call; at most 256 MB per buffer is kept).
//   bench/bench_conv.py measures the peak against eager.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common/conv2d_act_args.h"
#include "common/cpu_isa.h"
#include "cpu/conv2d_act_kernels.h"
#include "cpu/output_cache.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"

namespace mtlcore::cpu {

namespace {

const ConvKernelTable& kernel_table() { MTLCORE_ISA_SELECT(conv_kernels); }

template <typename T>
const ConvKernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) {
    return kernel_table().f32;
  } else {
    return kernel_table().f64;
  }
}

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(tag) with tag a value of the op's element type (float or double; checked before).
template <typename Fn>
void dispatch_float(const at::Tensor& t, const Fn& fn) {
  if (t.scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(double{});
  }
}

// Packs `groups` row-major matrices a[g] ([m][depth], contiguous one after another) in row
// blocks of `block` for the GEMM kernels.
template <typename T>
at::Tensor pack_groups(const ConvKernels<T>& k, const T* a, int64_t groups, int64_t m,
                       int64_t depth, int64_t block, const at::TensorOptions& options) {
  const int64_t size = k.packed_a_size(m, depth, block);
  at::Tensor packed = at::empty({groups * size}, options);
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      k.pack_a(a + g * m * depth, depth, m, depth, block, dst + g * size);
    }
  });
  return packed;
}

// Whether channel_gemm is expected to beat direct_gemm on an m x (out_w-wide rows) x depth
// problem: the pixel-vectorised kernel idles the lanes beyond each output row's end and the
// rows beyond m in its last row block; the channel-vectorised one idles channels beyond m and
// pays a costlier epilogue (the tile goes through L1 to be transposed), which deep sums hide.
template <typename T>
bool prefer_channel_tiles(const ConvKernels<T>& k, int64_t m, int64_t depth, int64_t out_w) {
  const auto used = [](int64_t n, int64_t block) {
    return static_cast<double>(n) / static_cast<double>(ceil_div(n, block) * block);
  };
  // (The pixel kernel's balanced row blocks leave fewer rows idle than used(m, k.mr) counts,
  // but the channel kernel measured faster on the shapes where the exact count would tip the
  // choice.)
  const double d = static_cast<double>(depth);
  // Pixel tiles: whole two-vector tiles of a row, then its remainder in one vector if it fits
  // (direct_gemm), else in two.
  const int64_t rest = out_w % k.nr;
  const int64_t tail = rest == 0 ? 0 : (rest <= k.nr / 2 ? k.nr / 2 : k.nr);
  const double row_work = static_cast<double>(out_w - rest + tail);
  const double pixel = static_cast<double>(out_w) / row_work * used(m, k.mr) * d / (d + 4.0);
  const double channel = used(m, k.channel_block) * 0.97 * d / (d + 24.0);
  return channel > 1.05 * pixel;
}

// Calls fn(n, g, p_begin, p_end, workspace) for every (image, group, pixel block) of a problem
// with `pixels` output pixels per image, the blocks spread over the threads. Each thread gets
// `workspace` elements of scratch (0 for the direct kernels, which read the image in place).
// row > 0: blocks hold whole output rows of `row` pixels (the pixel-vectorised kernel's tiles
// never cross a row, so a block boundary inside one would split a tile in two).
template <typename T, typename Fn>
void for_each_gemm_job(const ConvKernels<T>& k, int64_t images, int64_t groups, int64_t pixels,
                       int64_t workspace_size, int64_t row, const Fn& fn) {
  const int64_t units = row > 0 ? pixels / row : ceil_div(pixels, k.nr);
  const int64_t unit = row > 0 ? row : k.nr;
  const int64_t per_image = images * groups;
  int64_t blocks = std::min(units, ceil_div(pixels, 8 * k.nr));
  const int64_t wanted = 4 * at::get_num_threads();
  if (per_image * blocks < wanted) blocks = std::min(units, ceil_div(wanted, per_image));
  for_each_job(
      per_image * blocks,
      [&] {
        ScratchBuffer<T> workspace(ScratchSlot::kWorkerWorkspace, workspace_size);
        std::fill(workspace.data(), workspace.data() + workspace_size, T(0));
        return workspace;
      },
      [&](int64_t job_index, const ScratchBuffer<T>& workspace) {
        const int64_t blk = job_index % blocks, ng = job_index / blocks;
        const int64_t p_begin = blk * units / blocks * unit;
        const int64_t p_end = std::min(pixels, (blk + 1) * units / blocks * unit);
        if (p_begin < p_end) fn(ng / groups, ng % groups, p_begin, p_end, workspace.data());
      });
}

// A zero-padded copy of a [n, c, h, w] array (element strides `st`) as [n, c, h + top + bottom,
// w + left + right] rows, plus `slack` zero elements at the end, for direct_gemm(), in scratch
// memory.
template <typename T>
ScratchBuffer<T> pad_images(ScratchSlot slot, const T* src, std::array<int64_t, 4> st, int64_t n,
                            int64_t c, int64_t h, int64_t w, int64_t top, int64_t bottom,
                            int64_t left, int64_t right, int64_t slack) {
  const int64_t hp = h + top + bottom, wp = w + left + right, plane = hp * wp;
  ScratchBuffer<T> padded(slot, n * c * plane + slack);
  T* dst = padded.data();
  std::fill(dst + n * c * plane, dst + n * c * plane + slack, T(0));
  at::parallel_for(0, n * c, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* out = dst + i * plane;
      const T* in = src + (i / c) * st[0] + (i % c) * st[1];
      std::fill(out, out + top * wp, T(0));
      for (int64_t y = 0; y < h; ++y) {
        T* row = out + (top + y) * wp;
        std::fill(row, row + left, T(0));
        const T* s = in + y * st[2];
        if (st[3] == 1) {
          std::copy(s, s + w, row + left);
        } else {
          for (int64_t x = 0; x < w; ++x) row[left + x] = s[x * st[3]];
        }
        std::fill(row + left + w, row + wp, T(0));
      }
      std::fill(out + (top + h) * wp, out + plane, T(0));
    }
  });
  return padded;
}

// offsets[d] of depth index d = (chan, ry, sx) in a padded image of hp x wp planes.
std::vector<int64_t> window_offsets(int64_t chans, int64_t r, int64_t s, int64_t hp, int64_t wp,
                                    int64_t dil_h, int64_t dil_w) {
  std::vector<int64_t> offsets;
  offsets.reserve(chans * r * s);
  for (int64_t c = 0; c < chans; ++c) {
    for (int64_t y = 0; y < r; ++y) {
      for (int64_t x = 0; x < s; ++x) offsets.push_back(c * hp * wp + y * dil_h * wp + x * dil_w);
    }
  }
  return offsets;
}

std::array<int64_t, 4> strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The forward's B operand (input windows) for image n and group g, read through the strides.
template <typename T>
Gather<T> input_gather(const Conv2dParams& p, const at::Tensor& input, const T* x, int64_t n,
                       int64_t g) {
  const int64_t cg = p.c_per_group();
  return {x + n * input.stride(0) + g * cg * input.stride(1),
          input.stride(1),
          input.stride(2),
          input.stride(3),
          p.h,
          p.w,
          p.ow,
          cg,
          p.r,
          p.s,
          p.stride_h,
          -p.pad_top,
          p.dil_h,
          1,
          p.stride_w,
          -p.pad_left,
          p.dil_w,
          1};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups,
                                           c10::string_view activation, double negative_slope,
                                           bool with_preact) {
  const Conv2dParams p =
      check_conv2d_act_args("mtlcore.conv2d_act", input, weight, bias, stride, padding, dilation,
                            groups, activation, negative_slope, kDtypes);
  at::Tensor out = empty_output(p.output_sizes(), input.options());
  at::Tensor preact =
      empty_output(with_preact ? p.output_sizes() : std::vector<int64_t>{0}, input.options());
  if (out.numel() == 0) return {out, preact};
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();

  dispatch_float(input, [&](auto tag) {
    using T = decltype(tag);
    const ConvKernels<T>& k = kernels<T>();
    const int64_t kg = p.k_per_group(), cg = p.c_per_group(), depth = p.depth();
    const int64_t pixels = p.oh * p.ow;
    T* o = out.data_ptr<T>();
    T* pre = with_preact ? preact.data_ptr<T>() : nullptr;
    const T* bias_ptr = b.defined() ? b.data_ptr<T>() : nullptr;
    const auto epilogue = [&](int64_t n, int64_t g) {
      const int64_t offset = (n * p.k + g * kg) * pixels;
      return Epilogue<T>{o + offset,   pre != nullptr ? pre + offset : nullptr,
                         pixels,       bias_ptr != nullptr ? bias_ptr + g * kg : nullptr,
                         p.activation, static_cast<T>(p.negative_slope)};
    };
    // A zero-padded copy of the input, read in place by the micro-kernels: the
    // channel-vectorised kernel for any column stride, the pixel-vectorised one for unit
    // stride when it wastes fewer lanes.
    const bool channels = p.stride_w != 1 || prefer_channel_tiles(k, kg, depth, p.ow);
    const int64_t block = channels ? k.channel_block : k.mr;
    const at::Tensor packed =
        pack_groups(k, w.data_ptr<T>(), p.groups, kg, depth, block, w.options());
    const int64_t packed_size = k.packed_a_size(kg, depth, block);
    const int64_t hp = p.h + p.pad_top + p.pad_bottom, wp = p.w + p.pad_left + p.pad_right;
    const ScratchBuffer<T> padded =
        pad_images(ScratchSlot::kConvPaddedInput, input.data_ptr<T>(), strides4(input), p.n, p.c,
                   p.h, p.w, p.pad_top, p.pad_bottom, p.pad_left, p.pad_right, k.nr);
    const std::vector<int64_t> offsets = window_offsets(cg, p.r, p.s, hp, wp, p.dil_h, p.dil_w);
    const T* xp = padded.data();
    for_each_gemm_job(k, p.n, p.groups, pixels, 0, channels ? 0 : p.ow,
                      [&](int64_t n, int64_t g, int64_t pb, int64_t pe, T*) {
                        const DirectGemmJob<T> job{packed.data_ptr<T>() + g * packed_size,
                                                   kg,
                                                   depth,
                                                   xp + (n * p.c + g * cg) * hp * wp,
                                                   offsets.data(),
                                                   p.stride_h * wp,
                                                   p.stride_w,
                                                   p.ow,
                                                   pb,
                                                   pe,
                                                   epilogue(n, g)};
                        (channels ? k.channel_gemm : k.direct_gemm)(job);
                      });
  });
  return {out, preact};
}

at::Tensor conv2d_act_cpu(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          c10::string_view activation, double negative_slope) {
  return std::get<0>(forward(input, weight, bias, stride, padding, dilation, groups, activation,
                             negative_slope, false));
}

std::tuple<at::Tensor, at::Tensor> conv2d_act_with_preact_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, double negative_slope) {
  return forward(input, weight, bias, stride, padding, dilation, groups, activation, negative_slope,
                 true);
}

// Where G = grad_output * act'(saved) comes from, for image n and channels from `channel` on;
// each channel's sum of G is added to bias[] unless bias is null.
template <typename T>
GradSource<T> grad_source(const Conv2dParams& p, const at::Tensor& grad_out,
                          const at::Tensor& saved, int64_t n, int64_t channel, double* bias) {
  return {grad_out.const_data_ptr<T>() + n * grad_out.stride(0) + channel * grad_out.stride(1),
          grad_out.stride(0),
          grad_out.stride(1),
          grad_out.stride(2),
          grad_out.stride(3),
          saved.const_data_ptr<T>() + n * saved.stride(0) + channel * saved.stride(1),
          saved.stride(0),
          saved.stride(1),
          saved.stride(2),
          saved.stride(3),
          p.ow,
          p.activation,
          static_cast<T>(p.negative_slope),
          bias};
}

// G = grad_output * act'(saved) in memory, in one of two layouts. Rows: [N, K, row_len], zero
// beyond oh * ow. Padded (when the input gradient takes the direct path): zero-padded planes
// [N, K, hp, wp], output pixel (y, x) at (top + y) * wp + left + x, which the input gradient
// reads in place as its padded image (no copy of G into that layout) and the direct weight
// gradient transposes row by row. data is null when the weight gradient computes G itself.
template <typename T>
struct GradInMemory {
  T* data = nullptr;
  int64_t row_len = 0;  // rows
  bool padded = false;
  int64_t top = 0, left = 0, hp = 0, wp = 0;  // padded
  int64_t plane() const { return padded ? hp * wp : row_len; }
};

// The zero border of G for the direct input gradient (a convolution of G with the flipped
// weights): extent - 1 - pad on each side.
std::array<int64_t, 4> direct_grad_border(const Conv2dParams& p) {
  const int64_t ext_h = p.dil_h * (p.r - 1), ext_w = p.dil_w * (p.s - 1);
  return {ext_h - p.pad_top, ext_h - p.pad_bottom, ext_w - p.pad_left, ext_w - p.pad_right};
}

// Fills G (layout and buffer set in g) and, unless db is null, the bias gradient db[K] (sum of
// G per channel).
template <typename T>
void activation_grad(const ConvKernels<T>& k, const Conv2dParams& p, const at::Tensor& grad_out,
                     const at::Tensor& saved, const GradInMemory<T>& g, T* db) {
  const int64_t planes = p.n * p.k;
  std::vector<double> plane_sums(db != nullptr ? planes : 0, 0.0);
  // Jobs of whole planes, about 4096 pixels each: a job per plane of a small image (169 pixels
  // in SmallCNN's second layer) spent more on taking the job than on the plane.
  const int64_t per_job = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.oh * p.ow));
  const GradSource<T> first = grad_source<T>(p, grad_out, saved, 0, 0, nullptr);
  for_each_job(ceil_div(planes, per_job), [&](int64_t job) {
    for (int64_t i = job * per_job; i < std::min(planes, (job + 1) * per_job); ++i) {
      const int64_t n = i / p.k, c = i % p.k;
      GradSource<T> source = first;
      source.grad_output += n * first.go_n + c * first.go_c;
      source.saved += n * first.sv_n + c * first.sv_c;
      source.bias = db != nullptr ? &plane_sums[i] : nullptr;
      T* out = g.data + i * g.plane();
      if (g.padded) {
        k.grad_plane_padded(source, p.oh, g.top, g.left, g.hp, g.wp, out);
      } else {
        k.grad_block(source, 0, 0, p.oh * p.ow, g.row_len, 1, out, g.row_len);
      }
    }
  });
  if (db == nullptr) return;
  for (int64_t c = 0; c < p.k; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < p.n; ++n) sum += plane_sums[n * p.k + c];
    db[c] = static_cast<T>(sum);
  }
}

// grad_input by columns: per (image, group), blocks of whole output rows of
//   cols[(c, ry, sx)][pixel] = sum_k W[group * kg + k][c][ry][sx] * G[k][pixel]
// (a GEMM on G's rows read in place: exactly the forward's work), each block scattered into a
// zero-padded copy of the image's input gradient right after (col2im) while it is in cache;
// the copy's interior is the result. G needs k.nr elements of readable slack after its end.
template <typename T>
void input_grad_columns(const ConvKernels<T>& k, const Conv2dParams& p, const T* g, int64_t row_len,
                        const T* w, at::Tensor& grad_input) {
  const int64_t kg = p.k_per_group(), cg = p.c_per_group(), rs = p.r * p.s;
  const int64_t rows = cg * rs, out_pixels = p.oh * p.ow, pixels = p.h * p.w;
  // A[group][(c, ry, sx)][k] = W[group * kg + k][c][ry][sx].
  std::vector<T> a(p.groups * rows * kg);
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    for (int64_t kk = 0; kk < kg; ++kk) {
      const T* src = w + (grp * kg + kk) * rows;
      T* dst = a.data() + grp * rows * kg + kk;
      for (int64_t i = 0; i < rows; ++i) dst[i * kg] = src[i];
    }
  }
  // A block of whole output rows whose columns stay within L2 (about 256 kB).
  const int64_t block_rows = std::clamp<int64_t>(65536 / rows / p.ow, 1, p.oh);
  const int64_t block = block_rows * p.ow;
  const int64_t ld = ceil_div(block, k.lanes) * k.lanes;
  const bool channels = prefer_channel_tiles(k, rows, kg, block);
  const int64_t pack_block = channels ? k.channel_block : k.mr;
  const at::Tensor packed =
      pack_groups(k, a.data(), p.groups, rows, kg, pack_block, grad_input.options());
  const int64_t packed_size = k.packed_a_size(rows, kg, pack_block);
  std::vector<int64_t> offsets(kg);
  for (int64_t d = 0; d < kg; ++d) offsets[d] = d * row_len;
  // The padded image: pad_top + h + pad_bottom rows of pad_left + w + pad_right columns, plus
  // the columns col2im's whole vectors reach with unit column stride.
  const int64_t hp = p.pad_top + p.h + p.pad_bottom;
  const int64_t wp = p.pad_left + p.w + p.pad_right +
                     (p.stride_w == 1 ? ceil_div(p.ow, k.lanes) * k.lanes - p.ow : 0);
  T* dx = grad_input.data_ptr<T>();
  struct Workspace {
    ScratchBuffer<T> cols, image;
  };
  for_each_job(
      p.n * p.groups,
      [&] {
        Workspace ws{ScratchBuffer<T>(ScratchSlot::kWorkerColumns, rows * ld),
                     ScratchBuffer<T>(ScratchSlot::kWorkerImage, cg * hp * wp)};
        std::fill(ws.cols.data(), ws.cols.data() + rows * ld, T(0));
        return ws;
      },
      [&](int64_t job_index, const Workspace& ws) {
        T* cols = ws.cols.data();
        T* padded = ws.image.data();
        const int64_t n = job_index / p.groups, grp = job_index % p.groups;
        std::fill(padded, padded + cg * hp * wp, T(0));
        const T* rows_of_g = g + (n * p.k + grp * kg) * row_len;
        for (int64_t y0 = 0; y0 < p.oh; y0 += block_rows) {
          const int64_t y1 = std::min(p.oh, y0 + block_rows);
          // G's rows as one image row of `block` pixels starting at pixel y0 * ow.
          const DirectGemmJob<T> job{packed.data_ptr<T>() + grp * packed_size,
                                     rows,
                                     kg,
                                     rows_of_g + y0 * p.ow,
                                     offsets.data(),
                                     0,
                                     1,
                                     block,
                                     0,
                                     (y1 - y0) * p.ow,
                                     {cols, nullptr, ld, nullptr, Activation::kIdentity, T(0)}};
          (channels ? k.channel_gemm : k.direct_gemm)(job);
          k.col2im({cols, ld, y0, y1, p.ow, cg, p.r, p.s, p.stride_h, p.stride_w, p.dil_h, p.dil_w,
                    padded, hp * wp, wp});
        }
        T* image = dx + (n * p.c + grp * cg) * pixels;
        for (int64_t c = 0; c < cg; ++c) {
          for (int64_t y = 0; y < p.h; ++y) {
            const T* src = padded + (c * hp + p.pad_top + y) * wp + p.pad_left;
            std::copy(src, src + p.w, image + (c * p.h + y) * p.w);
          }
        }
      });
}

// How the input gradient is computed.
enum class InputGradPath { kColumns, kDirect, kGathered };

InputGradPath input_grad_path(const Conv2dParams& p) {
  // With unit strides it is a plain convolution of G, zero-padded by extent - 1 - pad on each
  // side, with the weights flipped: the direct path. Otherwise (or when a pad exceeds the
  // extent) G is gathered with the exact-division mapping of the Gather description.
  const std::array<int64_t, 4> border = direct_grad_border(p);
  const bool direct =
      p.stride_h == 1 && p.stride_w == 1 && *std::min_element(border.begin(), border.end()) >= 0;
  // The direct path computes h * w outputs from windows of G that are partly zero border; by
  // columns the GEMM does exactly the forward's work (and its output adds one scatter pass).
  // Columns when the border costs more than an eighth, or for strides, given enough (image,
  // group) jobs to share out: a choice that depends on the shapes only, not on the threads.
  const int64_t out_pixels = p.oh * p.ow, pixels = p.h * p.w;
  if (p.n * p.groups >= 4 && (!direct || pixels > out_pixels + out_pixels / 8)) {
    return InputGradPath::kColumns;
  }
  return direct ? InputGradPath::kDirect : InputGradPath::kGathered;
}

// grad_input = the transposed convolution of G with the weights.
template <typename T>
void input_grad(const ConvKernels<T>& k, const Conv2dParams& p, const GradInMemory<T>& g,
                const T* w, at::Tensor& grad_input) {
  const int64_t kg = p.k_per_group(), cg = p.c_per_group(), rs = p.r * p.s;
  const int64_t depth = kg * rs, pixels = p.h * p.w;
  const InputGradPath path = input_grad_path(p);
  TORCH_INTERNAL_ASSERT(!g.padded || path == InputGradPath::kDirect);
  if (path == InputGradPath::kColumns) {
    input_grad_columns(k, p, g.data, g.row_len, w, grad_input);
    return;
  }
  const bool direct = path == InputGradPath::kDirect;
  // W'[group][c][k, r, s] = W[group * kg + k][c][r, s], flipped in r and s for the direct path.
  std::vector<T> wt(p.groups * cg * depth);
  for (int64_t grp = 0; grp < p.groups; ++grp) {
    for (int64_t c = 0; c < cg; ++c) {
      for (int64_t kk = 0; kk < kg; ++kk) {
        const T* src = w + ((grp * kg + kk) * cg + c) * rs;
        T* dst = wt.data() + (grp * cg + c) * depth + kk * rs;
        if (direct) {
          std::reverse_copy(src, src + rs, dst);
        } else {
          std::copy(src, src + rs, dst);
        }
      }
    }
  }
  const bool channels = direct && prefer_channel_tiles(k, cg, depth, p.w);
  const int64_t block = channels ? k.channel_block : k.mr;
  const at::Tensor packed =
      pack_groups(k, wt.data(), p.groups, cg, depth, block, grad_input.options());
  const int64_t packed_size = k.packed_a_size(cg, depth, block);
  T* dx = grad_input.data_ptr<T>();
  const auto epilogue = [&](int64_t n, int64_t grp) {
    return Epilogue<T>{
        dx + (n * p.c + grp * cg) * pixels, nullptr, pixels, nullptr, Activation::kIdentity, T(0)};
  };
  if (direct) {
    const int64_t hp = p.h + p.dil_h * (p.r - 1), wp = p.w + p.dil_w * (p.s - 1);
    const auto [top, bottom, left, right] = direct_grad_border(p);
    // G already in the padded layout, or a padded copy of its rows.
    const ScratchBuffer<T> copy = g.padded
                                      ? ScratchBuffer<T>(ScratchSlot::kConvPaddedGrad, 0)
                                      : pad_images(ScratchSlot::kConvPaddedGrad, g.data,
                                                   {p.k * g.row_len, g.row_len, p.ow, 1}, p.n, p.k,
                                                   p.oh, p.ow, top, bottom, left, right, k.nr);
    const std::vector<int64_t> offsets = window_offsets(kg, p.r, p.s, hp, wp, p.dil_h, p.dil_w);
    const T* gp = g.padded ? g.data : copy.data();
    for_each_gemm_job(k, p.n, p.groups, pixels, 0, channels ? 0 : p.w,
                      [&](int64_t n, int64_t grp, int64_t pb, int64_t pe, T*) {
                        const DirectGemmJob<T> job{packed.data_ptr<T>() + grp * packed_size,
                                                   cg,
                                                   depth,
                                                   gp + (n * p.k + grp * kg) * hp * wp,
                                                   offsets.data(),
                                                   wp,
                                                   1,
                                                   p.w,
                                                   pb,
                                                   pe,
                                                   epilogue(n, grp)};
                        (channels ? k.channel_gemm : k.direct_gemm)(job);
                      });
    return;
  }
  for_each_gemm_job(k, p.n, p.groups, pixels, k.workspace, 0,
                    [&](int64_t n, int64_t grp, int64_t pb, int64_t pe, T* workspace) {
                      GemmJob<T> job{};
                      job.a_packed = packed.data_ptr<T>() + grp * packed_size;
                      job.m = cg;
                      job.depth = depth;
                      job.b = {g.data + (n * p.k + grp * kg) * g.row_len,
                               g.row_len,
                               p.ow,
                               1,
                               p.oh,
                               p.ow,
                               p.w,
                               kg,
                               p.r,
                               p.s,
                               1,
                               p.pad_top,
                               -p.dil_h,
                               p.stride_h,
                               1,
                               p.pad_left,
                               -p.dil_w,
                               p.stride_w};
                      job.p_begin = pb;
                      job.p_end = pe;
                      job.epilogue = epilogue(n, grp);
                      k.gemm(job, workspace);
                    });
}

// Whether the weight-gradient jobs compute G themselves (no G in memory): when no input
// gradient reads G and one job can take all depth rows, so each job reads grad_output and
// saved once instead of G being written and read back.
template <typename T>
bool weight_grad_computes_g(const ConvKernels<T>& k, const Conv2dParams& p,
                            std::array<bool, 3> output_mask) {
  return !output_mask[0] && output_mask[1] && p.depth() <= k.max_weight_grad_rows;
}

// Whether grad_weight runs the direct kernel (from G^T and the padded input) rather than
// gathering and transposing X per job: with G in memory, when the channels fill the vectors
// (at most a fifth of G^T's lanes padding).
template <typename T>
bool use_direct_weight_grad(const ConvKernels<T>& k, const Conv2dParams& p, bool computed) {
  const int64_t kg = p.k_per_group();
  return !computed && 4 * ceil_div(kg, k.nr) * k.nr <= 5 * kg;
}

// grad_weight from G in memory (db must be null: the first pass computed it) or, with g.data
// null, from grad_output and saved (weight_grad_computes_g), then also the bias gradient into
// db unless db is null. G in the padded layout needs the direct kernel.
template <typename T>
void weight_grad(const ConvKernels<T>& k, const Conv2dParams& p, const GradInMemory<T>& g,
                 const at::Tensor& input, at::Tensor& grad_weight, const at::Tensor& grad_output,
                 const at::Tensor& saved, T* db) {
  const int64_t kg = p.k_per_group(), cg = p.c_per_group(), depth = p.depth();
  const bool computed = g.data == nullptr;
  // Image splits: a function of the shapes only, so the sums do not depend on the threads. A
  // job reads its images' G once for all its depth rows, so the work is split by images first
  // (G read once in all) and by bands of depth rows only when there are too few image jobs.
  const int64_t splits = p.groups >= 8 ? 1 : std::min<int64_t>(p.n, 8);
  const int64_t wanted = 4 * at::get_num_threads();
  const int64_t bands_wanted = computed ? 1 : ceil_div(wanted, splits * p.groups);
  // Bands of whole panels of k.nr depth rows (the kernel's tile width).
  const int64_t band = ceil_div(ceil_div(depth, bands_wanted), k.nr) * k.nr;
  const int64_t bands = ceil_div(depth, band);
  // The direct kernel: G transposed once into panels of k.nr channels per (image, group), the
  // input zero-padded, both read in place by every job.
  const bool direct = use_direct_weight_grad(k, p, computed);
  TORCH_INTERNAL_ASSERT(direct || !g.padded);
  // Pixels per panel of G^T. Padded G is transposed one output row at a time, whole vectors
  // wide: a row's extra pixels land where the next row's go (written over right after) and the
  // last row's beyond oh * ow.
  const int64_t width = ceil_div(p.ow, k.lanes) * k.lanes;
  const int64_t gt_len =
      g.padded ? ceil_div((p.oh - 1) * p.ow + width, k.lanes) * k.lanes : g.row_len;
  const int64_t gt_group = ceil_div(kg, k.nr) * k.nr * gt_len, gt_image = p.groups * gt_group;
  const ScratchBuffer<T> gt(ScratchSlot::kConvGradT, direct ? p.n * gt_image : 0);
  const int64_t hp = p.h + p.pad_top + p.pad_bottom, wp = p.w + p.pad_left + p.pad_right;
  const ScratchBuffer<T> padded =
      direct ? pad_images(ScratchSlot::kConvPaddedInput, input.data_ptr<T>(), strides4(input), p.n,
                          p.c, p.h, p.w, p.pad_top, p.pad_bottom, p.pad_left, p.pad_right, 0)
             : ScratchBuffer<T>(ScratchSlot::kConvPaddedInput, 0);
  const std::vector<int64_t> offsets =
      direct ? window_offsets(cg, p.r, p.s, hp, wp, p.dil_h, p.dil_w) : std::vector<int64_t>();
  if (direct) {
    at::parallel_for(0, p.n * p.groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        T* dst = gt.data() + i * gt_group;
        if (!g.padded) {
          k.transpose_g(g.data + i * kg * g.row_len, kg, g.row_len, g.row_len, dst,
                        g.row_len * k.nr);
          continue;
        }
        for (int64_t y = 0; y < p.oh; ++y) {
          k.transpose_g(g.data + i * kg * g.plane() + (g.top + y) * g.wp + g.left, kg, g.plane(),
                        width, dst + y * p.ow * k.nr, gt_len * k.nr);
        }
      }
    });
  }
  at::Tensor partial =
      splits == 1 ? grad_weight : at::empty({splits, p.k, depth}, grad_weight.options());
  T* dw = partial.data_ptr<T>();
  const T* x = input.data_ptr<T>();
  // Bias-gradient sums of each split (with db).
  std::vector<double> bias_sums(db != nullptr ? splits * p.k : 0, 0.0);
  struct Workspace {
    ScratchBuffer<T> gemm, g_block;
  };
  for_each_job(
      splits * p.groups * bands,
      [&] {
        // (The direct kernel needs no workspace.)
        const int64_t size = direct ? 0 : k.workspace;
        Workspace ws{ScratchBuffer<T>(ScratchSlot::kWorkerWorkspace, size),
                     ScratchBuffer<T>(ScratchSlot::kWorkerGradBlock,
                                      computed ? kg * k.weight_grad_block : 0)};
        std::fill(ws.gemm.data(), ws.gemm.data() + size, T(0));
        return ws;
      },
      [&](int64_t item, const Workspace& ws) {
        const int64_t b = item % bands, grp = (item / bands) % p.groups;
        const int64_t split = item / (bands * p.groups);
        const int64_t n0 = split * p.n / splits, n1 = (split + 1) * p.n / splits;
        if (direct) {
          const DirectWeightGradJob<T> job{gt.data() + (n0 * p.groups + grp) * gt_group,
                                           gt_len * k.nr,
                                           gt_image,
                                           kg,
                                           padded.data() + (n0 * p.c + grp * cg) * hp * wp,
                                           offsets.data(),
                                           p.c * hp * wp,
                                           p.stride_h * wp,
                                           p.stride_w,
                                           p.oh,
                                           p.ow,
                                           n1 - n0,
                                           b * band,
                                           std::min(depth, (b + 1) * band),
                                           dw + (split * p.k + grp * kg) * depth,
                                           depth};
          k.direct_weight_grad(job);
          return;
        }
        WeightGradJob<T> job{};
        if (computed) {
          job.source = grad_source<T>(
              p, grad_output, saved, n0, grp * kg,
              bias_sums.empty() ? nullptr : bias_sums.data() + split * p.k + grp * kg);
          job.g_block = ws.g_block.data();
        } else {
          job.g = g.data + (n0 * p.k + grp * kg) * g.row_len;
        }
        job.g_ld = g.row_len;
        job.g_image_stride = p.k * g.row_len;
        job.pixels = p.oh * p.ow;
        job.m = kg;
        job.x = input_gather(p, input, x, n0, grp);
        job.x_image_stride = input.stride(0);
        job.num_images = n1 - n0;
        job.d_begin = b * band;
        job.d_end = std::min(depth, (b + 1) * band);
        job.dw = dw + (split * p.k + grp * kg) * depth;
        job.dw_ld = depth;
        k.weight_grad(job, ws.gemm.data());
      });
  for (int64_t c = 0; db != nullptr && c < p.k; ++c) {
    double sum = 0;
    for (int64_t split = 0; split < splits; ++split) sum += bias_sums[split * p.k + c];
    db[c] = static_cast<T>(sum);
  }
  if (splits == 1) return;
  T* out = grad_weight.data_ptr<T>();
  const int64_t size = p.k * depth;
  at::parallel_for(0, size, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T sum = dw[i];
      for (int64_t s = 1; s < splits; ++s) sum += dw[s * size + i];
      out[i] = sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_act_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, double negative_slope,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "mtlcore.conv2d_act_backward";
  const Conv2dParams p =
      check_conv2d_act_args(op, input, weight, std::nullopt, stride, padding, dilation, groups,
                            activation, negative_slope, kDtypes);
  check_conv2d_act_backward_args(op, p, input, grad_output, saved);
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input =
      output_mask[0] ? empty_output({p.n, p.c, p.h, p.w}, input.options()) : empty();
  at::Tensor grad_weight = output_mask[1] ? at::empty(weight.sizes(), weight.options()) : empty();
  at::Tensor grad_bias = output_mask[2] ? at::empty({p.k}, weight.options()) : empty();
  if (p.n == 0) {
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) {
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor w = weight.contiguous();
  dispatch_float(input, [&](auto tag) {
    using T = decltype(tag);
    const ConvKernels<T>& k = kernels<T>();
    T* db = output_mask[2] ? grad_bias.data_ptr<T>() : nullptr;
    GradInMemory<T> g;
    if (weight_grad_computes_g(k, p, output_mask)) {
      weight_grad<T>(k, p, g, input, grad_weight, grad_output, saved, db);
      return;
    }
    // G straight in the padded layout when the input gradient reads it that way and the
    // weight gradient (if any) can transpose it from there; otherwise as rows.
    g.padded = output_mask[0] && input_grad_path(p) == InputGradPath::kDirect &&
               (!output_mask[1] || use_direct_weight_grad(k, p, false));
    if (g.padded) {
      const auto [top, bottom, left, right] = direct_grad_border(p);
      g.top = top;
      g.left = left;
      g.hp = p.oh + top + bottom;
      g.wp = p.ow + left + right;
    } else {
      g.row_len = ceil_div(p.oh * p.ow, k.lanes) * k.lanes;
    }
    // Plus k.nr elements of zero slack, read by input_grad_columns, the direct input gradient's
    // last tiles and the row-wise transposition of padded G.
    const int64_t g_size = p.n * p.k * g.plane();
    const ScratchBuffer<T> g_buffer(ScratchSlot::kConvGrad, g_size + k.nr);
    g.data = g_buffer.data();
    std::fill(g.data + g_size, g.data + g_size + k.nr, T(0));
    activation_grad(k, p, grad_output, saved, g, db);
    if (output_mask[0]) input_grad(k, p, g, w.data_ptr<T>(), grad_input);
    if (output_mask[1]) weight_grad<T>(k, p, g, input, grad_weight, grad_output, saved, nullptr);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, CPU, m) {
  m.impl("conv2d_act", &conv2d_act_cpu);
  m.impl("conv2d_act_with_preact", &conv2d_act_with_preact_cpu);
  m.impl("conv2d_act_backward", &conv2d_act_backward_cpu);
}

}  // namespace mtlcore::cpu
