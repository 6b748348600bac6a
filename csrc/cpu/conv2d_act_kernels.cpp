// Compute kernels of mtlcore.conv2d_act on the CPU (see conv2d_act_kernels.h), compiled once per
// instruction set (MTLCORE_ISA = base, avx2 or avx512).
//
// Layout. GEMM C = A * B with A packed once per call: for each depth block of kKc rows, each
//   block of kMr rows of A is stored depth-major ([kc][kMr]). B comes either straight from a
//   zero-padded image (direct_gemm: row d of a tile = kNr consecutive pixels at a tabled
//   offset) or, for other strides, is gathered per depth block into panels of kNr pixels
//   ([kc][kNr]), kPanels panels at a time (gemm). A depth block of B for one tile stays in L1
//   and the packed A block in L2 while the micro-kernel runs over all row blocks of A.
// Micro-kernel. kMr x kNr outer products: 2 * kMr vector accumulators held in registers over
//   the depth block, one broadcast of A and two vector loads of B per depth step. The
//   epilogue (partial sums of earlier depth blocks, bias, preact, activation) is applied to the
//   registers and stored with masked stores at the right and bottom edges (direct_gemm runs
//   a row's short last tile full width instead, starting earlier in the row): the output is
//   written once per depth block, and for depth <= kKc exactly once. identity, relu and
//   leaky_relu are vector code; the other activations run element-wise on the stored tile.
// Weight gradient, two kernels. Both sum outer products over pixels with 2 * kMr vector
//   accumulators held in registers over a whole chunk of pixels (in memory between chunks).
//   direct_weight_grad (channels that fill the vectors, G in memory): kMr depth rows of X read
//   in place from the zero-padded input (one broadcast each, any stride and dilation) times
//   kNr channels of G^T (two vector loads), G having been transposed once per call into
//   panels of kNr channels ([pixel][kNr]); chunks are whole output rows of one image, about
//   kPc pixels, whose G^T panel stays in L1 while every block of depth rows runs over it.
//   weight_grad (otherwise): kMr channels of G (read in place, zero-padded rows, one broadcast
//   each) times kNr depth rows of X (two vector loads), X rows gathered into chunks of up to
//   kPc pixels (several small images, or part of a large one), kMaxWgRows rows at a time, and
//   transposed into panels of kNr depth rows ([pixel][kNr]). Without an input gradient, G is
//   not kept in memory: the job computes it from grad_output and the activation's saved tensor
//   (with the bias gradient's sums) in blocks of up to 2048 pixels that stay in L2, just
//   before their chunks are gathered.
//   Each job owns some images and a band of depth rows; the caller adds the images' partial
//   sums in a fixed order.
// Numerics. Accumulation in T (float or double), fused multiply-add where the ISA has it (avx2,
//   avx512), separate multiply and add in the base path. The depth sum of one output runs in
//   depth order, the pixel sum of one weight-gradient element in pixel order (one chain), and
//   every output is computed by one thread, so results do not depend on the thread count; they
//   differ between ISA paths through FMA rounding and the lane count.
#include "cpu/conv2d_act_kernels.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mtlcore::cpu::MTLCORE_ISA {

namespace {

// ---------------------------------------------------------------------------------------------
// Blocking
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMr = 6;                       // rows of A per micro-tile
constexpr int64_t kKc = 128;                     // depth rows per block
constexpr int64_t kPanels = 8;                   // B panels per pixel block
constexpr int64_t kPc = 256;                     // pixels per weight-gradient chunk
constexpr int64_t kMaxWgRows = 64;               // depth rows gathered at a time (whole panels)
constexpr int64_t kGradBlockPixels = 8 * kPc;    // most pixels of G computed at a time
constexpr int64_t kGradBlockElements = 1 << 16;  // most elements of G computed at a time

template <typename T>
constexpr int64_t kNr = 2 * Simd<T>::kLanes;  // pixels per B panel

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// First row of block ib when m rows are cut into `blocks` blocks of as equal sizes as possible.
constexpr int64_t balanced_start(int64_t m, int64_t blocks, int64_t ib) { return ib * m / blocks; }

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------
template <typename T>
int64_t packed_a_size(int64_t m, int64_t depth, int64_t block) {
  return round_up(m, block) * depth;
}

// Packed A in row blocks of `block` rows: depth block starting at d0 (kc rows), row block ib at
//   packed + d0 * round_up(m, block) + ib * kc * block, laid out [kc][block]. Block ib holds
//   rows [i0, i1), padded with zero rows to `block`: i0 = ib * block for the channel kernel's
//   blocks, and for the pixel kernel's (block == kMr) the blocks are balanced, i0 =
//   balanced_start(m, blocks, ib) (32 rows: 5, 6, 5, 5, 6, 5 instead of 6 x 5 + 2).
template <typename T>
void pack_a(const T* a, int64_t lda, int64_t m, int64_t depth, int64_t block, T* packed) {
  const int64_t m_pad = round_up(m, block), blocks = m_pad / block;
  const bool balanced = block == kMr;
  for (int64_t d0 = 0; d0 < depth; d0 += kKc) {
    const int64_t kc = std::min(kKc, depth - d0);
    for (int64_t ib = 0; ib < blocks; ++ib) {
      const int64_t i0 = balanced ? balanced_start(m, blocks, ib) : ib * block;
      const int64_t i1 = balanced ? balanced_start(m, blocks, ib + 1) : std::min(m, i0 + block);
      T* dst = packed + d0 * m_pad + ib * block * kc;
      for (int64_t d = 0; d < kc; ++d) {
        for (int64_t i = 0; i < block; ++i) {
          dst[d * block + i] = i0 + i < i1 ? a[(i0 + i) * lda + d0 + d] : T(0);
        }
      }
    }
  }
}

// A run of consecutive pixels of one output row that lands in one panel: pixels
// y * dst_w + [x, x + len), written from offset dst of each packed depth row.
struct Piece {
  int64_t y, x, len, dst;
};

// Copies source columns x0 + j * step (j < len; only those in [0, width) exist, the others
// are zero) from `row` to o.
template <typename T>
[[gnu::always_inline]] inline void gather_columns(const T* row, int64_t x0, int64_t step,
                                                  int64_t width, int64_t len, T* o) {
  int64_t lo, hi;  // valid j: [lo, hi)
  if (step == 1) {
    lo = std::clamp<int64_t>(-x0, 0, len);
    hi = std::clamp<int64_t>(width - x0, lo, len);
  } else {
    lo = std::clamp<int64_t>(x0 >= 0 ? 0 : (-x0 + step - 1) / step, 0, len);
    hi = std::clamp<int64_t>(x0 < width ? (width - 1 - x0) / step + 1 : 0, lo, len);
  }
  for (int64_t j = 0; j < lo; ++j) o[j] = T(0);
  const T* s = row + x0;
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  if (step == 1 && hi - lo >= L) {
    // Whole vectors, the last one overlapping its predecessor (short runs are common: the
    // output rows of small images).
    for (int64_t j = lo; j + L < hi; j += L) S::store(o + j, S::load(s + j));
    S::store(o + hi - L, S::load(s + hi - L));
  } else if (step == 1) {
    for (int64_t j = lo; j < hi; ++j) o[j] = s[j];
  } else {
    for (int64_t j = lo; j < hi; ++j) o[j] = s[j * step];
  }
  for (int64_t j = hi; j < len; ++j) o[j] = T(0);
}

// Gathers B rows [d0, d0 + kc) for the pixels [p_begin, p_end) into panels of panel_width
// columns: pixel p_begin + c goes to dst[(c / panel_width) * panel_stride + d * panel_width +
// c % panel_width]; in the last panel, the columns from the last pixel up to fill_width are
// zero. (One panel wider than the pixel range gives a plain row-major block whose rows are
// panel_width apart.)
template <typename T>
void pack_b(const Gather<T>& g, int64_t d0, int64_t kc, int64_t p_begin, int64_t p_end,
            int64_t panel_width, int64_t panel_stride, int64_t fill_width, T* dst) {
  constexpr int64_t kMaxPieces = 64;
  Piece pieces[kMaxPieces];
  const int64_t rs = g.r * g.s;
  for (int64_t first = p_begin; first < p_end;) {
    // The pieces of the next pixels, up to kMaxPieces of them.
    int64_t count = 0, p = first;
    int64_t y = p / g.dst_w, x = p % g.dst_w;
    while (p < p_end && count < kMaxPieces) {
      const int64_t col = p - p_begin, within = col % panel_width;
      const int64_t len = std::min({p_end - p, g.dst_w - x, panel_width - within});
      pieces[count++] = {y, x, len, col / panel_width * panel_stride + within};
      p += len;
      x += len;
      if (x == g.dst_w) {
        x = 0;
        ++y;
      }
    }
    int64_t chan = d0 / rs, ry = (d0 % rs) / g.s, sx = d0 % g.s;
    for (int64_t d = 0; d < kc; ++d) {
      T* out = dst + d * panel_width;
      const T* plane = g.src + chan * g.stride_c;
      const int64_t oy = g.by + ry * g.cy, ox = g.bx + sx * g.cx;
      for (int64_t i = 0; i < count; ++i) {
        const Piece& piece = pieces[i];
        T* o = out + piece.dst;
        int64_t sy = piece.y * g.ay + oy;
        bool row_ok = sy >= 0;
        if (g.qy != 1) {
          row_ok = row_ok && sy % g.qy == 0;
          sy /= g.qy;
        }
        if (!row_ok || sy >= g.src_h) {
          for (int64_t j = 0; j < piece.len; ++j) o[j] = T(0);
          continue;
        }
        const T* row = plane + sy * g.stride_y;
        const int64_t sx0 = piece.x * g.ax + ox;  // source column of o[0], times qx
        if (g.qx == 1) {
          if (g.stride_x == 1) {
            gather_columns(row, sx0, g.ax, g.src_w, piece.len, o);
          } else {
            for (int64_t j = 0; j < piece.len; ++j) {
              const int64_t c = sx0 + j * g.ax;
              o[j] = c >= 0 && c < g.src_w ? row[c * g.stride_x] : T(0);
            }
          }
        } else {
          for (int64_t j = 0; j < piece.len; ++j) {
            const int64_t num = sx0 + j * g.ax;
            const int64_t c = num / g.qx;
            o[j] = num >= 0 && num % g.qx == 0 && c < g.src_w ? row[c * g.stride_x] : T(0);
          }
        }
      }
      if (++sx == g.s) {
        sx = 0;
        if (++ry == g.r) {
          ry = 0;
          ++chan;
        }
      }
    }
    first = p;
  }
  const int64_t cols = p_end - p_begin, used = cols % panel_width;
  if (used != 0 && used < fill_width) {
    T* last = dst + cols / panel_width * panel_stride;
    for (int64_t d = 0; d < kc; ++d) {
      std::fill(last + d * panel_width + used, last + d * panel_width + fill_width, T(0));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM (forward and input gradient)
// ---------------------------------------------------------------------------------------------

// Vector form of the activations that are plain arithmetic; the others run element-wise on
// the stored tile (still in L1).
template <Activation A>
constexpr bool kVectorActivation =
    A == Activation::kIdentity || A == Activation::kRelu || A == Activation::kLeakyRelu;

template <typename T, Activation A>
typename Simd<T>::V vector_activation(typename Simd<T>::V z, typename Simd<T>::V slope) {
  using S = Simd<T>;
  if constexpr (A == Activation::kRelu) {
    return S::relu(z);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return S::select_positive(z, S::fma(z, slope, S::zero()));
  } else {
    return z;
  }
}

// B operand of the micro-kernel: a packed panel (row d at b + d * kNr) ...
template <typename T>
struct PackedPanel {
  const T* b;
  const T* row(int64_t d) const { return b + d * kNr<T>; }
};
// ... or kNr consecutive elements of a padded image (row d at base + offsets[d]).
template <typename T>
struct ImageWindow {
  const T* base;
  const int64_t* offsets;
  const T* row(int64_t d) const { return base + offsets[d]; }
};

// Accumulates one kMr x (NV vectors) tile over a depth block: A block (kc x kMr, packed) times
// B panel (kc x NV * kLanes); then applies the epilogue e from the registers to the tile's
// first `rows` rows and `cols` pixels: partial sums of earlier depth blocks added, and after
// the last block bias, preact and activation (masked loads/stores when cols < NV * kLanes).
// NV = 2 (kNr pixels) everywhere but at the end of an image row of direct_gemm, where a
// one-vector tile covers a short remainder at half the cost.
template <typename T, Activation A, int MR, int NV, typename B>
[[gnu::always_inline]] inline void micro_kernel(int64_t kc, const T* __restrict a, const B b,
                                                const Epilogue<T>& e, int64_t i0, int64_t rows,
                                                int64_t p, int64_t cols, bool first, bool last) {
  static_assert(NV == 1 || NV == 2);
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = S::zero();
  for (int64_t d = 0; d < kc; ++d) {
    const T* bd = b.row(d);
    const V b0 = S::load(bd);
    if constexpr (NV == 2) {
      const V b1 = S::load(bd + L);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const V ai = S::broadcast(a[i]);
        acc0[i] = S::fma(ai, b0, acc0[i]);
        acc1[i] = S::fma(ai, b1, acc1[i]);
      }
    } else {
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc0[i] = S::fma(S::broadcast(a[i]), b0, acc0[i]);
    }
    a += kMr;  // blocks are packed kMr rows wide whatever MR
  }
  const bool full = cols == NV * L;
  const int n0 = static_cast<int>(std::min<int64_t>(cols, L));
  const int n1 = NV == 2 ? static_cast<int>(std::max<int64_t>(cols - L, 0)) : 0;
  const auto load = [&](const T* q, int n) { return n == L ? S::load(q) : S::load_first(q, n); };
  const auto store = [&](T* q, V v, int n) {
    if (n == L) {
      S::store(q, v);
    } else if (n > 0) {
      S::store_first(q, v, n);
    }
  };
  const V slope = S::broadcast(e.negative_slope);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;  // rows of A beyond the block are zero padding
    T* o = e.out + (i0 + i) * e.ld + p;
    V z0 = acc0[i], z1 = acc1[i];
    if (!first) {
      z0 = S::add(z0, full ? S::load(o) : load(o, n0));
      if constexpr (NV == 2) z1 = S::add(z1, full ? S::load(o + L) : load(o + L, n1));
    }
    if (last) {
      if (e.bias != nullptr) {
        const V bias = S::broadcast(e.bias[i0 + i]);
        z0 = S::add(z0, bias);
        if constexpr (NV == 2) z1 = S::add(z1, bias);
      }
      if (e.preact != nullptr) {
        T* pre = e.preact + (i0 + i) * e.ld + p;
        store(pre, z0, n0);
        if constexpr (NV == 2) store(pre + L, z1, n1);
      }
      if constexpr (kVectorActivation<A>) {
        z0 = vector_activation<T, A>(z0, slope);
        if constexpr (NV == 2) z1 = vector_activation<T, A>(z1, slope);
      }
    }
    if (full) {
      S::store(o, z0);
      if constexpr (NV == 2) S::store(o + L, z1);
    } else {
      store(o, z0, n0);
      if constexpr (NV == 2) store(o + L, z1, n1);
    }
  }
  if constexpr (!kVectorActivation<A>) {
    if (last) {
      for (int64_t i = 0; i < rows; ++i) {
        T* o = e.out + (i0 + i) * e.ld + p;
        for (int64_t j = 0; j < cols; ++j) o[j] = act::forward<A, T>(o[j], e.negative_slope);
      }
    }
  }
}

// All row blocks of A (one depth block, packed at a, see pack_a) against one B tile of NV
// vectors, `cols` pixels starting at output pixel p. A block of 5 rows runs a 5-row kernel;
// other short blocks (m < 20 and not a multiple of 6) run the 6-row one on zero rows.
template <typename T, Activation A, int NV = 2, typename B>
void tile_rows(const T* a, int64_t kc, int64_t m, const B b, const Epilogue<T>& e, int64_t p,
               int64_t cols, bool first, bool last) {
  const int64_t blocks = (m + kMr - 1) / kMr;
  for (int64_t ib = 0; ib < blocks; ++ib) {
    const int64_t i0 = balanced_start(m, blocks, ib), rows = balanced_start(m, blocks, ib + 1) - i0;
    if (rows == kMr - 1) {
      micro_kernel<T, A, kMr - 1, NV>(kc, a + ib * kMr * kc, b, e, i0, rows, p, cols, first, last);
    } else {
      micro_kernel<T, A, kMr, NV>(kc, a + ib * kMr * kc, b, e, i0, rows, p, cols, first, last);
    }
  }
}

template <typename T, Activation A>
void gemm_impl(const GemmJob<T>& job, T* workspace) {
  constexpr int64_t nr = kNr<T>;
  const int64_t m_pad = round_up(job.m, kMr);
  for (int64_t pb = job.p_begin; pb < job.p_end; pb += kPanels * nr) {
    const int64_t pe = std::min(job.p_end, pb + kPanels * nr);
    const int64_t panels = (pe - pb + nr - 1) / nr;
    for (int64_t d0 = 0; d0 < job.depth; d0 += kKc) {
      const int64_t kc = std::min(kKc, job.depth - d0);
      const bool first = d0 == 0, last = d0 + kc == job.depth;
      pack_b(job.b, d0, kc, pb, pe, nr, kc * nr, nr, workspace);
      for (int64_t jp = 0; jp < panels; ++jp) {
        const int64_t p = pb + jp * nr;
        const int64_t cols = std::min(nr, pe - p);
        tile_rows<T, A>(job.a_packed + d0 * m_pad, kc, job.m,
                        PackedPanel<T>{workspace + jp * kc * nr}, job.epilogue, p, cols, first,
                        last);
      }
    }
  }
}

template <typename T, Activation A>
void direct_gemm_impl(const DirectGemmJob<T>& job) {
  constexpr int64_t nr = kNr<T>, lanes = nr / 2;
  const int64_t m_pad = round_up(job.m, kMr);
  for (int64_t p = job.p_begin; p < job.p_end;) {
    const int64_t y = p / job.out_w, x = p % job.out_w;
    const int64_t cols = std::min({nr, job.out_w - x, job.p_end - p});
    // A tile of at most one vector's pixels (a row's remainder, or a narrow row) is one
    // vector wide: half the work of a two-vector tile. A short tile at the end of a row whose
    // earlier pixels (in this job) reach back far enough starts `back` pixels early instead
    // and runs at its whole width: no masked loads and stores (slow, and half the tiles of a
    // 30-pixel row). Its first `back` pixels are recomputed by the same depth-ordered sums,
    // so they get the same values again (tiles run one after the other, each through every
    // depth block: the first block overwrites the recomputed pixels, the later ones add to
    // their partial sums). Where nothing reaches back far enough, the tile runs masked.
    const int64_t before = std::min(x, p - job.p_begin);  // pixels of this row before p
    const bool half = cols <= lanes;
    const int64_t width = half ? lanes : nr;
    const int64_t back = cols < width && before >= width - cols ? width - cols : 0;
    const T* base = job.src + y * job.row_step + x - back;
    for (int64_t d0 = 0; d0 < job.depth; d0 += kKc) {
      const int64_t kc = std::min(kKc, job.depth - d0);
      const ImageWindow<T> window{base, job.offsets + d0};
      const bool first = d0 == 0, last = d0 + kc == job.depth;
      if (half) {
        tile_rows<T, A, 1>(job.a_packed + d0 * m_pad, kc, job.m, window, job.epilogue, p - back,
                           cols + back, first, last);
      } else {
        tile_rows<T, A>(job.a_packed + d0 * m_pad, kc, job.m, window, job.epilogue, p - back,
                        cols + back, first, last);
      }
    }
    p += cols;
  }
}

template <typename T>
void direct_gemm(const DirectGemmJob<T>& job) {
  dispatch_activation(job.epilogue.activation,
                      [&](auto a) { direct_gemm_impl<T, decltype(a)::value>(job); });
}

// The channel-vectorised variant of direct_gemm: micro-tiles of kCh = 2 * kLanes output
// channels (two vectors, A packed in blocks of kCh rows) by kPx pixels, each pixel's B value
// broadcast from its own window (any column stride, and a tile may cross output rows), so no
// lane is idle at any image width. Better than the pixel-vectorised kernel for narrow images
// and deep sums. A depth block of packed A runs over a group of tiles while it is in L1 (the
// tiles' partial sums wait in a small buffer between blocks; before, each tile ran the whole
// depth, streaming all of A from L2), and the epilogue transposes each tile through L1 once.
constexpr int64_t kPx = 6;

// Depth rows [d_begin, d_end) of a tile (whole depth blocks of packed A, d_end == depth or a
// multiple of kKc): the accumulators start from zero (d_begin == 0) or from `partial`
// (kPx x kCh), and are stored back there unless the sum is complete (d_end == depth), when the
// epilogue writes the output.
template <typename T, Activation A>
void channel_tile(const T* __restrict a_packed, int64_t m_pad, int64_t d_begin, int64_t d_end,
                  int64_t depth, const T* const* bases, const int64_t* __restrict offsets,
                  T* partial, const Epilogue<T>& e, int64_t i0, int64_t rows, int64_t p,
                  int64_t cols) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  const T* b0 = bases[0];
  const T* b1 = bases[1];
  const T* b2 = bases[2];
  const T* b3 = bases[3];
  const T* b4 = bases[4];
  const T* b5 = bases[5];
  V acc[kPx][2];
#pragma GCC unroll 8
  for (int j = 0; j < kPx; ++j) {
    acc[j][0] = d_begin == 0 ? S::zero() : S::load(partial + j * 2 * L);
    acc[j][1] = d_begin == 0 ? S::zero() : S::load(partial + j * 2 * L + L);
  }
  // Packed A's depth blocks one after another (the next block's rows of this tile start at
  // d0 * m_pad + i0 * kc).
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kKc) {
    const int64_t kc = std::min(kKc, depth - d0);
    const T* a = a_packed + d0 * m_pad + i0 * kc;
    const int64_t* off_block = offsets + d0;
    for (int64_t d = 0; d < kc; ++d) {
      const int64_t off = off_block[d];
      const V a0 = S::load(a);
      const V a1 = S::load(a + L);
      const T* const b[kPx] = {b0, b1, b2, b3, b4, b5};
#pragma GCC unroll 8
      for (int j = 0; j < kPx; ++j) {
        const V bj = S::broadcast(b[j][off]);
        acc[j][0] = S::fma(a0, bj, acc[j][0]);
        acc[j][1] = S::fma(a1, bj, acc[j][1]);
      }
      a += 2 * L;
    }
  }
  if (d_end < depth) {
#pragma GCC unroll 8
    for (int j = 0; j < kPx; ++j) {
      S::store(partial + j * 2 * L, acc[j][0]);
      S::store(partial + j * 2 * L + L, acc[j][1]);
    }
    return;
  }
  // Bias and (for identity, relu, leaky_relu) the activation in registers, then the tile is
  // transposed through L1 into the output rows.
  V bias0 = S::zero(), bias1 = S::zero();
  if (e.bias != nullptr) {
    bias0 = S::load_first(e.bias + i0, static_cast<int>(std::min<int64_t>(rows, L)));
    if (rows > L) bias1 = S::load_first(e.bias + i0 + L, static_cast<int>(rows - L));
  }
  const V slope = S::broadcast(e.negative_slope);
  alignas(64) T tile[kPx][2 * L];
  alignas(64) T pre_tile[kPx][2 * L];
#pragma GCC unroll 8
  for (int j = 0; j < kPx; ++j) {
    const V z0 = S::add(acc[j][0], bias0), z1 = S::add(acc[j][1], bias1);
    S::store(pre_tile[j], z0);
    S::store(pre_tile[j] + L, z1);
    if constexpr (kVectorActivation<A>) {
      S::store(tile[j], vector_activation<T, A>(z0, slope));
      S::store(tile[j] + L, vector_activation<T, A>(z1, slope));
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* o = e.out + (i0 + i) * e.ld + p;
    if (e.preact != nullptr) {
      T* pre = e.preact + (i0 + i) * e.ld + p;
      for (int64_t j = 0; j < cols; ++j) pre[j] = pre_tile[j][i];
    }
    if constexpr (kVectorActivation<A>) {
      for (int64_t j = 0; j < cols; ++j) o[j] = tile[j][i];
    } else {
      for (int64_t j = 0; j < cols; ++j)
        o[j] = act::forward<A, T>(pre_tile[j][i], e.negative_slope);
    }
  }
}

// Groups of up to kGroupTiles tiles of kPx pixels: each depth block of packed A (kKc x kCh,
// 16 kB for float at AVX-512) stays in L1 while it runs over all the group's tiles, whose
// partial sums wait in L1/L2 between depth blocks.
constexpr int64_t kGroupTiles = 24;

template <typename T, Activation A>
void channel_gemm_impl(const DirectGemmJob<T>& job) {
  constexpr int64_t ch = kNr<T>;  // channels per micro-tile: two vectors
  const int64_t m_pad = round_up(job.m, ch);
  alignas(64) T partial[kGroupTiles * kPx * ch];
  const T* bases[kGroupTiles][kPx];
  int64_t y = job.p_begin / job.out_w, x = job.p_begin % job.out_w;
  for (int64_t p0 = job.p_begin; p0 < job.p_end; p0 += kGroupTiles * kPx) {
    const int64_t p1 = std::min(job.p_end, p0 + kGroupTiles * kPx);
    const int64_t tiles = (p1 - p0 + kPx - 1) / kPx;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t cols = std::min(kPx, p1 - p0 - t * kPx);
      for (int64_t j = 0; j < kPx; ++j) {
        if (j < cols) {
          bases[t][j] = job.src + y * job.row_step + x * job.col_step;
          if (++x == job.out_w) {
            x = 0;
            ++y;
          }
        } else {
          bases[t][j] = bases[t][0];  // a valid address; the column is not stored
        }
      }
    }
    for (int64_t i0 = 0; i0 < job.m; i0 += ch) {
      for (int64_t d0 = 0; d0 < job.depth; d0 += kKc) {
        const int64_t d1 = std::min(job.depth, d0 + kKc);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t p = p0 + t * kPx;
          channel_tile<T, A>(job.a_packed, m_pad, d0, d1, job.depth, bases[t], job.offsets,
                             partial + t * kPx * ch, job.epilogue, i0, std::min(ch, job.m - i0), p,
                             std::min(kPx, p1 - p));
        }
      }
    }
  }
}

template <typename T>
void channel_gemm(const DirectGemmJob<T>& job) {
  dispatch_activation(job.epilogue.activation,
                      [&](auto a) { channel_gemm_impl<T, decltype(a)::value>(job); });
}

template <typename T>
void gemm(const GemmJob<T>& job, T* workspace) {
  dispatch_activation(job.epilogue.activation,
                      [&](auto a) { gemm_impl<T, decltype(a)::value>(job, workspace); });
}

// ---------------------------------------------------------------------------------------------
// G = grad_output * act'(saved): the backward's first pass, or blocks of the weight gradient
// ---------------------------------------------------------------------------------------------

// Sum of x[0, n): kAcc vector accumulators over the lanes (the remainder whole vectors into
// the first, a masked last vector into the second), added pairwise, then a fixed-order sum of
// the lanes (the same order on every call, so the result is deterministic).
template <typename T>
T vector_sum(const T* x, int64_t n) {
  using S = Simd<T>;
  constexpr int L = S::kLanes, kAcc = 4;
  typename S::V acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = S::zero();
  int64_t i = 0;
  for (; i + kAcc * L <= n; i += kAcc * L) {
    for (int a = 0; a < kAcc; ++a) acc[a] = S::add(S::load(x + i + a * L), acc[a]);
  }
  for (; i + L <= n; i += L) acc[0] = S::add(S::load(x + i), acc[0]);
  if (i < n) acc[1] = S::add(S::load_first(x + i, static_cast<int>(n - i)), acc[1]);
  return lane_sum<T>(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
}

// o[x] = grad_output * act'(saved) for `count` pixels of one output row, starting at a and b
// (the source's elements go_x and sv_x apart; unit steps run as their own, vectorised loop).
template <typename T, Activation A>
inline void grad_run(const GradSource<T>& src, const T* a, const T* b, int64_t count,
                     T* __restrict o) {
  const T slope = src.negative_slope;
  if (src.go_x == 1 && src.sv_x == 1) {
    for (int64_t x = 0; x < count; ++x) o[x] = act::backward<A, T>(a[x], b[x], slope);
  } else {
    for (int64_t x = 0; x < count; ++x) {
      o[x] = act::backward<A, T>(a[x * src.go_x], b[x * src.sv_x], slope);
    }
  }
}

// G of channels [0, m) of image n at pixels [p0, p0 + pixels), computed from the source into
// rows of `out` (row stride ld) and zero up to len; with a bias, each row's sum is added to it.
template <typename T, Activation A>
void grad_block_impl(const GradSource<T>& src, int64_t n, int64_t p0, int64_t pixels, int64_t len,
                     int64_t m, T* out, int64_t ld) {
  for (int64_t k = 0; k < m; ++k) {
    const T* go = src.grad_output + n * src.go_n + k * src.go_c;
    const T* sv = src.saved + n * src.sv_n + k * src.sv_c;
    T* o = out + k * ld;
    for (int64_t j = 0, y = p0 / src.ow, x = p0 % src.ow; j < pixels; x = 0, ++y) {
      const int64_t run = std::min(src.ow - x, pixels - j);
      grad_run<T, A>(src, go + y * src.go_y + x * src.go_x, sv + y * src.sv_y + x * src.sv_x, run,
                     o + j);
      j += run;
    }
    std::fill(o + pixels, o + len, T(0));
    if (src.bias != nullptr) src.bias[k] += vector_sum(o, pixels);
  }
}

template <typename T>
void grad_block(const GradSource<T>& src, int64_t n, int64_t p0, int64_t pixels, int64_t len,
                int64_t m, T* out, int64_t ld) {
  dispatch_activation(src.activation, [&](auto a) {
    grad_block_impl<T, decltype(a)::value>(src, n, p0, pixels, len, m, out, ld);
  });
}

// G of one channel plane (the source's image and channel) into a zero-padded hp x wp plane:
// output row y at out + (top + y) * wp + left, every other element zero; with a bias, the
// plane's sum of G is added to it.
template <typename T, Activation A>
void grad_plane_padded_impl(const GradSource<T>& src, int64_t oh, int64_t top, int64_t left,
                            int64_t hp, int64_t wp, T* out) {
  const int64_t ow = src.ow;
  std::fill(out, out + top * wp + left, T(0));
  for (int64_t y = 0; y < oh; ++y) {
    T* o = out + (top + y) * wp + left;
    grad_run<T, A>(src, src.grad_output + y * src.go_y, src.saved + y * src.sv_y, ow, o);
    // This row's right border and the next row's left one (or the bottom rows).
    std::fill(o + ow, y + 1 < oh ? o + wp : out + hp * wp, T(0));
  }
  // The rows' borders add zero.
  if (src.bias != nullptr) src.bias[0] += vector_sum(out + top * wp, oh * wp);
}

template <typename T>
void grad_plane_padded(const GradSource<T>& src, int64_t oh, int64_t top, int64_t left, int64_t hp,
                       int64_t wp, T* out) {
  dispatch_activation(src.activation, [&](auto a) {
    grad_plane_padded_impl<T, decltype(a)::value>(src, oh, top, left, hp, wp, out);
  });
}

// ---------------------------------------------------------------------------------------------
// Weight gradient
// ---------------------------------------------------------------------------------------------

// A run of one image's pixels in a weight-gradient chunk: the broadcast operand's rows at g
// (G's rows in place, or X's in the workspace when the roles swap), the same pixels at column
// `col` of the chunk, len (a multiple of the vector width) columns.
template <typename T>
struct WgSegment {
  const T* g;
  int64_t col, len;
};

// xt[(pn * ld_xt) + t * kNr + r] = rows[(pn * kNr + r) * ld + t] for t < width (a multiple of
// the lanes) and every panel pn of kNr rows; rows beyond `count` read as zero.
template <typename T>
void transpose_panels(const T* rows, int64_t count, int64_t ld, int64_t width, T* xt,
                      int64_t ld_xt) {
  constexpr int64_t nr = kNr<T>;
  for (int64_t pn = 0; pn * nr < count; ++pn) {
    T* panel = xt + pn * ld_xt;
    int64_t r = 0;
#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // 8 x 8 blocks through registers.
      for (; r + 8 <= nr && pn * nr + r + 8 <= count; r += 8) {
        const float* src = rows + (pn * nr + r) * ld;
        for (int64_t t = 0; t < width; t += 8) {
          __m256 v[8];
          for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + i * ld + t);
          const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
          const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
          const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
          const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
          const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
          const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
          const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
          const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
          float* d = panel + t * nr + r;
          _mm256_storeu_ps(d + 0 * nr, _mm256_permute2f128_ps(b0, b4, 0x20));
          _mm256_storeu_ps(d + 1 * nr, _mm256_permute2f128_ps(b1, b5, 0x20));
          _mm256_storeu_ps(d + 2 * nr, _mm256_permute2f128_ps(b2, b6, 0x20));
          _mm256_storeu_ps(d + 3 * nr, _mm256_permute2f128_ps(b3, b7, 0x20));
          _mm256_storeu_ps(d + 4 * nr, _mm256_permute2f128_ps(b0, b4, 0x31));
          _mm256_storeu_ps(d + 5 * nr, _mm256_permute2f128_ps(b1, b5, 0x31));
          _mm256_storeu_ps(d + 6 * nr, _mm256_permute2f128_ps(b2, b6, 0x31));
          _mm256_storeu_ps(d + 7 * nr, _mm256_permute2f128_ps(b3, b7, 0x31));
        }
      }
    }
#endif
    for (; r < nr; ++r) {
      const int64_t row = pn * nr + r;
      if (row < count) {
        const T* src = rows + row * ld;
        for (int64_t t = 0; t < width; ++t) panel[t * nr + r] = src[t];
      } else {
        for (int64_t t = 0; t < width; ++t) panel[t * nr + r] = T(0);
      }
    }
  }
}

// The weight-gradient kernels' register tile: MI x kNr accumulators (two vectors per row)
// loaded from acc (rows ld_acc apart), body(c) run on them, stored back.
template <int MI, typename T, typename Body>
inline void accumulator_tile(T* acc, int64_t ld_acc, const Body& body) {
  using S = Simd<T>;
  typename S::V c[MI][2];
  for (int i = 0; i < MI; ++i) {
    c[i][0] = S::load(acc + i * ld_acc);
    c[i][1] = S::load(acc + i * ld_acc + S::kLanes);
  }
  body(c);
  for (int i = 0; i < MI; ++i) {
    S::store(acc + i * ld_acc, c[i][0]);
    S::store(acc + i * ld_acc + S::kLanes, c[i][1]);
  }
}

// c[i] += a(i) * b[0, kNr) for i < MI (one broadcast of a(i), two vector loads of b).
template <int MI, typename T, typename A>
inline void outer_step(typename Simd<T>::V (&c)[MI][2], const T* __restrict b, const A& a) {
  using S = Simd<T>;
  const typename S::V b0 = S::load(b);
  const typename S::V b1 = S::load(b + S::kLanes);
#pragma GCC unroll 8
  for (int i = 0; i < MI; ++i) {
    const typename S::V ai = S::broadcast(a(i));
    c[i][0] = S::fma(ai, b0, c[i][0]);
    c[i][1] = S::fma(ai, b1, c[i][1]);
  }
}

// Outer products over the segments of a chunk: acc[i][v * kLanes + lane] += sum over the
// segments' pixels t of g[(k0 + i) * g_ld + t] * xt[t * kNr + v * kLanes + lane], for i < MI
// channels of G (broadcast) and the kNr depth rows of one transposed X panel (two vectors).
// The accumulators live in registers over the whole chunk and in `acc` (row stride ld_acc)
// between chunks.
template <int MI, typename T>
void outer_tile(const WgSegment<T>* segments, int64_t count, int64_t g_ld, int64_t k0,
                const T* __restrict xt, T* acc, int64_t ld_acc) {
  constexpr int64_t nr = kNr<T>;
  accumulator_tile<MI, T>(acc, ld_acc, [&](typename Simd<T>::V(&c)[MI][2]) {
    for (int64_t seg = 0; seg < count; ++seg) {
      const T* __restrict a = segments[seg].g + k0 * g_ld;
      const T* __restrict b = xt + segments[seg].col * nr;
      const int64_t len = segments[seg].len;
      for (int64_t t = 0; t < len; ++t) {
        outer_step<MI, T>(c, b + t * nr, [&](int i) { return a[i * g_ld + t]; });
      }
    }
  });
}

// c[a][b] (row stride ld_c) += sum over the segments' pixels t of A[a][t] * bt[t][b] for
// a < a_count (A rows of segment i at segments[i].g, a_ld apart) and every b of the
// `panels` transposed panels of bt (panel stride kPc * kNr; pixel t of segment i at row
// segments[i].col + t). A is cut into blocks of at most kMr rows of as equal sizes as
// possible (32 rows: 5 or 6, not 6 x 5 + 2).
template <typename T>
void outer_products(const WgSegment<T>* segments, int64_t count, int64_t a_ld, int64_t a_count,
                    const T* bt, int64_t panels, T* c, int64_t ld_c) {
  constexpr int64_t nr = kNr<T>;
  static_assert(kMr == 6, "one outer_tile per block height 1..kMr");
  constexpr decltype(&outer_tile<1, T>) kTiles[] = {&outer_tile<1, T>, &outer_tile<2, T>,
                                                    &outer_tile<3, T>, &outer_tile<4, T>,
                                                    &outer_tile<5, T>, &outer_tile<6, T>};
  const int64_t blocks = (a_count + kMr - 1) / kMr;
  for (int64_t pn = 0; pn < panels; ++pn) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t a0 = balanced_start(a_count, blocks, blk);
      const int64_t a1 = balanced_start(a_count, blocks, blk + 1);
      T* tile = c + a0 * ld_c + pn * nr;
      const T* b = bt + pn * kPc * nr;
      kTiles[a1 - a0 - 1](segments, count, a_ld, a0, b, tile, ld_c);
    }
  }
}

// dW[k][d] = sum over pixels of G[k][p] X[d][p]. Either G broadcast and X transposed (tiles of
// kMr channels x kNr depth rows), or, when that computes fewer padding rows (e.g. 32 channels
// and 11 depth rows: 32 x 16 against 32 x 11), X broadcast and G transposed (dW^T tiles).
// The job's depth rows go through the workspace kMaxWgRows at a time: a chunk of G (and its
// transpose) stays in cache while every sub-band of X is gathered against it, so G is read
// from memory once per job whatever the number of depth rows.
template <typename T>
void weight_grad(const WeightGradJob<T>& job, T* workspace) {
  constexpr int64_t L = Simd<T>::kLanes, nr = kNr<T>;
  const int64_t rows = job.d_end - job.d_begin, m = job.m;
  const int64_t rows_pad = round_up(rows, nr), m_pad = round_up(m, nr);
  // Computed G: blocks of `block` pixels of one image at a time (whole chunks, at most
  // kGradBlockElements elements: they stay in L2), long runs of each channel's plane for the
  // hardware prefetcher; G in memory: one block per image.
  const bool computed = job.g == nullptr;
  const int64_t block =
      computed ? std::clamp<int64_t>(kGradBlockElements / m / kPc * kPc, kPc, kGradBlockPixels)
               : job.pixels;
  const int64_t g_ld = computed ? block : job.g_ld;
  // (The workspace holds transposed panels of at most kMaxWgRows rows, so G's m rows must fit.
  // Sub-bands are whole panels but the last, so rows_pad also counts the padding of both.)
  const bool swapped = m <= kMaxWgRows && m_pad * rows < rows_pad * m;
  // Accumulators: [k][d] (row stride rows_pad), or [d][k] (row stride m_pad) when swapped.
  std::vector<T> acc(swapped ? rows * m_pad : m * rows_pad, T(0));
  T* bt = workspace + kMaxWgRows * kPc;  // the chunk's transposed operand
  // Chunks of up to kPc columns: several small images, or a part of a large one, so that the
  // accumulators stay in registers over long runs.
  constexpr int64_t kMaxSegments = kPc / L;
  WgSegment<T> segments[kMaxSegments];  // G rows of the chunk's images
  WgSegment<T> x_rows[kMaxSegments];    // X rows of the same pixels, in the workspace
  struct Pixels {
    int64_t image, p0, count;
  } pixels_of[kMaxSegments];  // which pixels each segment holds
  int64_t count = 0, width = 0;
  const auto flush = [&] {
    if (swapped) {
      for (int64_t i = 0; i < count; ++i) {
        transpose_panels(segments[i].g, m, g_ld, segments[i].len, bt + segments[i].col * nr,
                         kPc * nr);
      }
    }
    for (int64_t s0 = 0; s0 < rows; s0 += kMaxWgRows) {
      const int64_t sub = std::min(kMaxWgRows, rows - s0);
      for (int64_t i = 0; i < count; ++i) {
        Gather<T> x = job.x;
        x.src += pixels_of[i].image * job.x_image_stride;
        const int64_t p0 = pixels_of[i].p0;
        pack_b(x, job.d_begin + s0, sub, p0, p0 + pixels_of[i].count, kPc, 0, segments[i].len,
               workspace + segments[i].col);
      }
      if (swapped) {
        for (int64_t i = 0; i < count; ++i) {
          x_rows[i] = {workspace + segments[i].col, segments[i].col, segments[i].len};
        }
        outer_products(x_rows, count, kPc, sub, bt, m_pad / nr, acc.data() + s0 * m_pad, m_pad);
      } else {
        transpose_panels(workspace, sub, kPc, width, bt, kPc * nr);
        outer_products(segments, count, g_ld, m, bt, round_up(sub, nr) / nr, acc.data() + s0,
                       rows_pad);
      }
    }
    count = width = 0;
  };
  for (int64_t n = 0; n < job.num_images; ++n) {
    for (int64_t q0 = 0; q0 < job.pixels; q0 += block) {
      const int64_t q1 = std::min(job.pixels, q0 + block);
      const T* g = computed ? job.g_block : job.g + n * job.g_image_stride + q0;  // pixel q0
      if (computed) {
        if (count > 0) flush();  // the pending segments read the buffer
        grad_block(job.source, n, q0, q1 - q0, round_up(q1 - q0, L), m, job.g_block, block);
      }
      for (int64_t p0 = q0; p0 < q1; p0 += kPc) {
        const int64_t pixels = std::min(kPc, q1 - p0);
        const int64_t len = round_up(pixels, L);
        if (width + len > kPc) flush();
        pixels_of[count] = {n, p0, pixels};
        segments[count++] = {g + (p0 - q0), width, len};
        width += len;
      }
    }
  }
  if (count > 0) flush();
  T* dw = job.dw + job.d_begin;
  for (int64_t k = 0; k < m; ++k) {
    for (int64_t d = 0; d < rows; ++d) {
      dw[k * job.dw_ld + d] = swapped ? acc[d * m_pad + k] : acc[k * rows_pad + d];
    }
  }
}

// dW^T tile of MI depth rows x kNr channels: acc[i][v * kLanes + lane] += sum over the output
// rows y < ys and columns x < out_w of X[i] (a[i][y * row_step + x * col_step], broadcast) times
// G^T[pixel][v * kLanes + lane] (b, kNr per pixel, pixels row after row). The accumulators
// live in registers over all ys * out_w pixels.
template <int MI, typename T>
void direct_wg_tile(const T* const* rows, int64_t ys, int64_t row_step, int64_t col_step,
                    int64_t out_w, const T* __restrict b, T* acc, int64_t ld_acc) {
  constexpr int64_t nr = kNr<T>;
  const T* a[MI];
  for (int i = 0; i < MI; ++i) a[i] = rows[i];
  accumulator_tile<MI, T>(acc, ld_acc, [&](typename Simd<T>::V(&c)[MI][2]) {
    for (int64_t y = 0; y < ys; ++y) {
      const int64_t base = y * row_step;
      for (int64_t x = 0; x < out_w; ++x, b += nr) {
        const int64_t at = base + x * col_step;
        outer_step<MI, T>(c, b, [&](int i) { return a[i][at]; });
      }
    }
  });
}

// dW[k][d] = sum over pixels of X[d][p] G^T[p][k], X read in place from the padded images and
// G^T in panels of kNr channels: no gathering or transposing per job. Chunks of whole output
// rows (about kPc pixels) of one image: each channel panel's chunk of G^T stays in L1 while
// every block of depth rows runs over it.
template <typename T>
void direct_weight_grad(const DirectWeightGradJob<T>& job) {
  constexpr int64_t nr = kNr<T>;
  static_assert(kMr == 6, "one direct_wg_tile per block height 1..kMr");
  constexpr decltype(&direct_wg_tile<1, T>) kTiles[] = {
      &direct_wg_tile<1, T>, &direct_wg_tile<2, T>, &direct_wg_tile<3, T>,
      &direct_wg_tile<4, T>, &direct_wg_tile<5, T>, &direct_wg_tile<6, T>};
  const int64_t rows = job.d_end - job.d_begin, m = job.m;
  const int64_t m_pad = round_up(m, nr), panels = m_pad / nr;
  const int64_t blocks = (rows + kMr - 1) / kMr;
  std::vector<T> acc(rows * m_pad, T(0));  // [d][k]
  const int64_t chunk_rows = std::max<int64_t>(1, kPc / job.out_w);
  const T* a[kMr];
  for (int64_t n = 0; n < job.num_images; ++n) {
    const T* src = job.src + n * job.src_image;
    const T* gt = job.gt + n * job.gt_image;
    for (int64_t y0 = 0; y0 < job.out_h; y0 += chunk_rows) {
      const int64_t ys = std::min(chunk_rows, job.out_h - y0);
      for (int64_t j = 0; j < panels; ++j) {
        const T* b = gt + j * job.gt_panel + y0 * job.out_w * nr;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t i0 = balanced_start(rows, blocks, blk);
          const int64_t i1 = balanced_start(rows, blocks, blk + 1);
          for (int64_t i = i0; i < i1; ++i) {
            a[i - i0] = src + job.offsets[job.d_begin + i] + y0 * job.row_step;
          }
          kTiles[i1 - i0 - 1](a, ys, job.row_step, job.col_step, job.out_w, b,
                              acc.data() + i0 * m_pad + j * nr, m_pad);
        }
      }
    }
  }
  // acc is [d][k]: transposed in blocks of 16 depth rows, whose lines stay in L1 while every
  // channel is written (a whole column of acc at a time touched a new line per element).
  T* dw = job.dw + job.d_begin;
  constexpr int64_t kRowBlock = 16;
  for (int64_t d0 = 0; d0 < rows; d0 += kRowBlock) {
    const int64_t d1 = std::min(rows, d0 + kRowBlock);
    for (int64_t k = 0; k < m; ++k) {
      for (int64_t d = d0; d < d1; ++d) dw[k * job.dw_ld + d] = acc[d * m_pad + k];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Input gradient by columns (col2im)
// ---------------------------------------------------------------------------------------------
// Each target element receives its terms in a fixed order (depth rows, then pixels), so the
// result does not depend on how the caller splits the rows into blocks.
template <typename T>
void col2im(const Col2ImJob<T>& job) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  const int64_t rows = job.y_end - job.y_begin;
  for (int64_t chan = 0; chan < job.chans; ++chan) {
    for (int64_t ry = 0; ry < job.r; ++ry) {
      for (int64_t sx = 0; sx < job.s; ++sx) {
        const T* col = job.cols + ((chan * job.r + ry) * job.s + sx) * job.ld;
        T* target = job.dx + chan * job.plane +
                    (job.y_begin * job.stride_h + ry * job.dil_h) * job.row + sx * job.dil_w;
        for (int64_t y = 0; y < rows; ++y) {
          const T* __restrict src = col + y * job.out_w;
          T* __restrict dst = target + y * job.stride_h * job.row;
          if (job.stride_w == 1) {
            int64_t x = 0;
            for (; x + L <= job.out_w; x += L) {
              S::store(dst + x, S::add(S::load(dst + x), S::load(src + x)));
            }
            if (x < job.out_w) {  // the row's last lanes add zero beyond its end
              const int rest = static_cast<int>(job.out_w - x);
              S::store(dst + x, S::add(S::load(dst + x), S::load_first(src + x, rest)));
            }
          } else {
            for (int64_t x = 0; x < job.out_w; ++x) dst[x * job.stride_w] += src[x];
          }
        }
      }
    }
  }
}

// constexpr, so that the tables are constant-initialised: a dynamic initialiser of the avx512
// copy would run AVX-512 instructions when the library loads, on any processor.
template <typename T>
constexpr ConvKernels<T> make_kernels() {
  return {kNr<T>,
          kMr,
          kNr<T>,
          Simd<T>::kLanes,
          kMaxWgRows,
          kGradBlockPixels,
          std::max(kKc * kPanels * kNr<T>, kMaxWgRows * kPc + round_up(kMaxWgRows, kNr<T>) * kPc),
          &packed_a_size<T>,
          &pack_a<T>,
          &gemm<T>,
          &direct_gemm<T>,
          &channel_gemm<T>,
          &weight_grad<T>,
          &direct_weight_grad<T>,
          &transpose_panels<T>,
          &col2im<T>,
          &grad_block<T>,
          &grad_plane_padded<T>};
}

}  // namespace

extern const ConvKernelTable conv_kernels = {make_kernels<float>(), make_kernels<double>()};

}  // namespace mtlcore::cpu::MTLCORE_ISA
