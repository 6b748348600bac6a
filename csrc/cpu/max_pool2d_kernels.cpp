// Loops of mtlcore.max_pool2d on the CPU (see max_pool2d_kernels.h), compiled once per
// instruction set (MTLCORE_ISA = base, avx2 or avx512).
//
// Data layout. NCHW: one plane (n, c) per unit; input read through its strides, output and
//   grad_input planes contiguous. channels_last: the channels of a pixel are contiguous in the
//   input, output and grad_input, and the loops run over them innermost (unit stride, so they
//   vectorise).
// Parallel split. None here: csrc/cpu/max_pool2d.cpp spreads the units over the threads. Every
//   output and grad_input element belongs to one unit, so no two threads write the same memory.
// Numerics. Maxima are chosen by comparing in float (double for double); the stored maximum is
//   the input element itself. A window's choice (common/max_pool2d_args.h): its valid elements
//   in row-major order, the first one replaced by each later v with v > max or v NaN. The
//   backward finds that choice again from the input and adds the window's gradient there, in
//   window order, in float (double for double), rounding once to the dtype; an element chosen
//   by no window gets +0. A window with no element inside the input gives -inf and no gradient.
//   The 2x2, stride-2 case without padding (the common one) has its own
//   loops over whole rows of windows.
#include "cpu/max_pool2d_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
#include <immintrin.h>
#endif

#ifndef MTLCORE_ISA
#error "compile this file with -DMTLCORE_ISA=<isa namespace>"
#endif

#define MTLCORE_INLINE inline __attribute__((always_inline))

namespace mtlcore::cpu::MTLCORE_ISA {

namespace {

// Math type of a dtype: double for double, float otherwise.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
MTLCORE_INLINE Acc<T> ld(const T* p) {
  return static_cast<Acc<T>>(*p);
}

// Whether v replaces the running maximum m (F.max_pool2d's rule: larger, or NaN).
// (| rather than ||: no branch, so the loops vectorise.)
template <typename A>
MTLCORE_INLINE bool takes(A v, A m) {
  return (v > m) | (v != v);
}

// v where c holds, +0 elsewhere, by masking the bits: a select here would become a masked
// store, which GCC cannot vectorise for the interleaved stores of the 2x2 backward.
MTLCORE_INLINE float keep_if(bool c, float v) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(v) & (0u - static_cast<uint32_t>(c)));
}
MTLCORE_INLINE double keep_if(bool c, double v) {
  return std::bit_cast<double>(std::bit_cast<uint64_t>(v) & (0ull - static_cast<uint64_t>(c)));
}

// a where c holds, b elsewhere, by masking bits: with plain selects GCC branches on c (and
// mispredicts on random data) when a loop stores two of them.
template <typename V>
MTLCORE_INLINE V pick(bool c, V a, V b) {
  using U = std::conditional_t<sizeof(V) == 8, uint64_t, uint32_t>;
  const U mask = U(0) - static_cast<U>(c);
  return std::bit_cast<V>((std::bit_cast<U>(a) & mask) | (std::bit_cast<U>(b) & ~mask));
}

// The taps t < k of window o whose coordinate o * s - p + t * d lies in [0, size): [lo, hi).
struct Taps {
  int64_t lo, hi;
};
MTLCORE_INLINE Taps taps(int64_t o, int64_t s, int64_t p, int64_t d, int64_t k, int64_t size) {
  const int64_t start = o * s - p;
  const int64_t lo = start < 0 ? (-start + d - 1) / d : 0;
  const int64_t hi = start >= size ? 0 : std::min(k, (size - start + d - 1) / d);
  return {lo, std::max(lo, hi)};
}

// The 2x2, stride-2 windows without padding or dilation, all inside the input, on a unit-stride
// input row: the fast loops apply.
bool is_2x2(const PoolJob& j) {
  return j.kh == 2 && j.kw == 2 && j.sh == 2 && j.sw == 2 && j.ph == 0 && j.pw == 0 && j.dh == 1 &&
         j.dw == 1 && 2 * j.oh <= j.h && 2 * j.ow <= j.w;
}

#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
// Vector blocks of the 2x2 stride-2 loops for float: L consecutive windows of rows r0 and r1
// (2L floats each), L = 8 (AVX) or 4 (SSE). The even and odd columns are split with
// shuffle_ps, which for L = 8 leaves the windows in the order 0 1 4 5 | 2 3 6 7 (in order for
// L = 4): per-window values (g, the maxima) are permuted the same way, and unpacklo/unpackhi
// interleave per-column results back into column order.
struct Vec8 {
  using V = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V even(V lo, V hi) { return _mm256_shuffle_ps(lo, hi, 0x88); }
  static V odd(V lo, V hi) { return _mm256_shuffle_ps(lo, hi, 0xdd); }
  // Swaps the middle 64-bit pairs: window order <-> the order even() and odd() give.
  static V swap_pairs(V v) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8));
  }
  static V unpacklo(V a, V b) { return _mm256_unpacklo_ps(a, b); }
  static V unpackhi(V a, V b) { return _mm256_unpackhi_ps(a, b); }
  static V takes(V v, V m) {
    return _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static V blend(V a, V b, V mask) { return _mm256_blendv_ps(a, b, mask); }
  static V and_(V a, V b) { return _mm256_and_ps(a, b); }
  static V andnot(V a, V b) { return _mm256_andnot_ps(a, b); }
  static V or_(V a, V b) { return _mm256_or_ps(a, b); }
  static V plus_zero(V v) { return _mm256_add_ps(_mm256_setzero_ps(), v); }
};
struct Vec4 {
  using V = __m128;
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static V even(V lo, V hi) { return _mm_shuffle_ps(lo, hi, 0x88); }
  static V odd(V lo, V hi) { return _mm_shuffle_ps(lo, hi, 0xdd); }
  static V swap_pairs(V v) { return v; }
  static V unpacklo(V a, V b) { return _mm_unpacklo_ps(a, b); }
  static V unpackhi(V a, V b) { return _mm_unpackhi_ps(a, b); }
  static V takes(V v, V m) {
    return _mm_or_ps(_mm_cmp_ps(v, m, _CMP_GT_OQ), _mm_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static V blend(V a, V b, V mask) { return _mm_blendv_ps(a, b, mask); }
  static V and_(V a, V b) { return _mm_and_ps(a, b); }
  static V andnot(V a, V b) { return _mm_andnot_ps(a, b); }
  static V or_(V a, V b) { return _mm_or_ps(a, b); }
  static V plus_zero(V v) { return _mm_add_ps(_mm_setzero_ps(), v); }
};

// The four corners a b / c d of L windows and the choice flags (all ones where chosen).
template <typename X>
struct Windows2x2 {
  typename X::V a, b, c, d, tb, tc, td, m;
  MTLCORE_INLINE Windows2x2(const float* r0, const float* r1, int lanes) {
    const auto r0a = X::load(r0), r0b = X::load(r0 + lanes);
    const auto r1a = X::load(r1), r1b = X::load(r1 + lanes);
    a = X::even(r0a, r0b), b = X::odd(r0a, r0b), c = X::even(r1a, r1b), d = X::odd(r1a, r1b);
    tb = X::takes(b, a);
    const auto mb = X::blend(a, b, tb);
    tc = X::takes(c, mb);
    const auto mc = X::blend(mb, c, tc);
    td = X::takes(d, mc);
    m = X::blend(mc, d, td);
  }
};

template <typename X, int L>
MTLCORE_INLINE void forward_2x2_block(const float* r0, const float* r1, float* y) {
  const Windows2x2<X> win(r0, r1, L);
  X::store(y, X::swap_pairs(win.m));
}

template <typename X, int L>
MTLCORE_INLINE void backward_2x2_block(const float* r0, const float* r1, const float* g, float* g0,
                                       float* g1) {
  const Windows2x2<X> win(r0, r1, L);
  const auto gv = X::plus_zero(X::swap_pairs(X::load(g)));  // +0 for -0, as a sum from +0
  // d if td, else c if tc, else b if tb, else a.
  const auto gd = X::and_(win.td, gv);
  const auto gc = X::and_(X::andnot(win.td, win.tc), gv);
  const auto gb = X::and_(X::andnot(X::or_(win.tc, win.td), win.tb), gv);
  const auto ga = X::andnot(X::or_(win.tb, X::or_(win.tc, win.td)), gv);
  X::store(g0, X::unpacklo(ga, gb));
  X::store(g0 + L, X::unpackhi(ga, gb));
  X::store(g1, X::unpacklo(gc, gd));
  X::store(g1 + L, X::unpackhi(gc, gd));
}

// Runs block(ow) over blocks of L windows covering [0, ow_end) (the last block overlapping
// the one before: blocks only store, so repeating a window is harmless); returns the first
// window left to the scalar loop (ow_end, or 0 when the row is too short for a block).
template <int L, typename Block>
MTLCORE_INLINE int64_t vector_blocks(int64_t ow_end, const Block& block) {
  if (ow_end < L) return 0;
  for (int64_t ow = 0; ow + L <= ow_end; ow += L) block(ow);
  if (ow_end % L != 0) block(ow_end - L);
  return ow_end;
}

// The float 2x2 row loops' vector part: AVX blocks of 8 windows, or SSE blocks of 4 for rows
// of 4 to 7 windows.
template <typename Fwd8, typename Fwd4>
MTLCORE_INLINE int64_t float_blocks(int64_t ow_end, const Fwd8& f8, const Fwd4& f4) {
  return ow_end >= 8 ? vector_blocks<8>(ow_end, f8) : vector_blocks<4>(ow_end, f4);
}
#endif

// What a per-thread buffer holds; one buffer per use, so two buffers never alias.
enum class BufferUse { kRowValues, kRowTaps, kRowGrads, kAccumulators, kTapOffsets };

// A per-thread buffer of at least n values of type V for `kUse`, kept between calls.
template <typename V, BufferUse kUse>
V* thread_buffer(int64_t n) {
  thread_local std::vector<V> buffer;
  if (buffer.size() < static_cast<size_t>(n)) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

// The choice of every window of output row oh of one NCHW plane x: its value m[ow] and, with
// kBest, the chosen element's tap best[ow] = i * kw + t (-1 for a window with no element
// inside the input, whose m is -inf). The interior windows, whose column taps all lie
// inside the input, run tap by tap over the whole row (no dependency from one tap to the next
// of the same window, so the comparisons overlap); the border windows one at a time.
template <typename T, bool kBest>
void select_row(const PoolJob& j, const T* x, int64_t oh, Acc<T>* m, int32_t* best) {
  using A = Acc<T>;
  const Taps ti = taps(oh, j.sh, j.ph, j.dh, j.kh, j.h);
  const int64_t ih0 = oh * j.sh - j.ph;
  const int64_t last = j.w - 1 + j.pw - (j.kw - 1) * j.dw;  // interior: ow * sw <= last
  const int64_t in_hi = std::min(j.ow, last >= 0 ? last / j.sw + 1 : 0);
  const int64_t in_lo = std::min(in_hi, (j.pw + j.sw - 1) / j.sw);
  const auto border = [&](int64_t ow) {
    const Taps tj = taps(ow, j.sw, j.pw, j.dw, j.kw, j.w);
    const int64_t iw0 = ow * j.sw - j.pw;
    if (ti.lo == ti.hi || tj.lo == tj.hi) {
      m[ow] = -std::numeric_limits<A>::infinity();
      if constexpr (kBest) best[ow] = -1;
      return;
    }
    int32_t b = static_cast<int32_t>(ti.lo * j.kw + tj.lo);
    A mv = ld(x + (ih0 + ti.lo * j.dh) * j.xs[2] + (iw0 + tj.lo * j.dw) * j.xs[3]);
    for (int64_t i = ti.lo; i < ti.hi; ++i) {
      const int64_t ih = ih0 + i * j.dh;
      for (int64_t t = tj.lo; t < tj.hi; ++t) {
        const int64_t iw = iw0 + t * j.dw;
        const A v = ld(x + ih * j.xs[2] + iw * j.xs[3]);
        const bool take = takes(v, mv);
        mv = take ? v : mv;
        b = take ? static_cast<int32_t>(i * j.kw + t) : b;
      }
    }
    m[ow] = mv;
    if constexpr (kBest) best[ow] = b;
  };
  for (int64_t ow = 0; ow < in_lo; ++ow) border(ow);
  for (int64_t ow = in_hi; ow < j.ow; ++ow) border(ow);
  if (in_lo == in_hi) return;
  if (ti.lo == ti.hi) {
    for (int64_t ow = in_lo; ow < in_hi; ++ow) {
      m[ow] = -std::numeric_limits<A>::infinity();
      if constexpr (kBest) best[ow] = -1;
    }
    return;
  }
  const int64_t n = in_hi - in_lo;
  const int64_t step = j.sw * j.xs[3];
  A* mr = m + in_lo;
  int32_t* br = kBest ? best + in_lo : nullptr;
  bool first = true;
  for (int64_t i = ti.lo; i < ti.hi; ++i) {
    const int64_t ih = ih0 + i * j.dh;
    for (int64_t t = 0; t < j.kw; ++t) {
      const int64_t iw = in_lo * j.sw - j.pw + t * j.dw;  // window in_lo's column of tap t
      const T* v = x + ih * j.xs[2] + iw * j.xs[3];
      const auto tap = static_cast<int32_t>(i * j.kw + t);
      if (first) {
        for (int64_t k = 0; k < n; ++k) {
          mr[k] = ld(v + k * step);
          if constexpr (kBest) br[k] = tap;
        }
        first = false;
        continue;
      }
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const A a = ld(v + k * step);
        const bool take = takes(a, mr[k]);
        mr[k] = pick(take, a, mr[k]);
        if constexpr (kBest) br[k] = pick(take, tap, br[k]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_nchw(const PoolJob& j, int64_t begin, int64_t end) {
  using A = Acc<T>;
  const bool fast = is_2x2(j) && j.xs[3] == 1;
  for (int64_t plane = begin; plane < end; ++plane) {
    const T* x = static_cast<const T*>(j.x) + (plane / j.c) * j.xs[0] + (plane % j.c) * j.xs[1];
    T* y = static_cast<T*>(j.out) + plane * j.oh * j.ow;
    for (int64_t oh = 0; oh < j.oh; ++oh) {
      T* yr = y + oh * j.ow;
      if (fast) {
        const T* r0 = x + 2 * oh * j.xs[2];
        const T* r1 = r0 + j.xs[2];
        int64_t ow = 0;
#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
        if constexpr (std::is_same_v<T, float>) {
          ow = float_blocks(
              j.ow, [&](int64_t o) { forward_2x2_block<Vec8, 8>(r0 + 2 * o, r1 + 2 * o, yr + o); },
              [&](int64_t o) { forward_2x2_block<Vec4, 4>(r0 + 2 * o, r1 + 2 * o, yr + o); });
        }
#endif
        for (; ow < j.ow; ++ow) {
          A m = ld(r0 + 2 * ow);
          const A b = ld(r0 + 2 * ow + 1), c = ld(r1 + 2 * ow), d = ld(r1 + 2 * ow + 1);
          m = takes(b, m) ? b : m;
          m = takes(c, m) ? c : m;
          m = takes(d, m) ? d : m;
          yr[ow] = static_cast<T>(m);
        }
        continue;
      }
      A* m = thread_buffer<A, BufferUse::kRowValues>(j.ow);
      select_row<T, false>(j, x, oh, m, nullptr);
      for (int64_t ow = 0; ow < j.ow; ++ow) yr[ow] = static_cast<T>(m[ow]);
    }
  }
}

// grad_input of one plane for 2x2 stride-2 windows: each input element is in at most one window,
// so its gradient is written once (no accumulation); rows and columns outside every window
// get zero.
template <typename T>
void backward_plane_2x2(const PoolJob& j, const T* x, const T* go, T* gi) {
  using A = Acc<T>;
  T* row = thread_buffer<T, BufferUse::kRowGrads>(j.ow);
  for (int64_t oh = 0; oh < j.oh; ++oh) {
    const T* r0 = x + 2 * oh * j.xs[2];
    const T* r1 = r0 + j.xs[2];
    const T* g = go + oh * j.gs[2];
    if (j.gs[3] != 1) {  // a unit-stride copy of the row, so the loop below vectorises
      for (int64_t ow = 0; ow < j.ow; ++ow) row[ow] = go[oh * j.gs[2] + ow * j.gs[3]];
      g = row;
    }
    T* g0 = gi + 2 * oh * j.w;
    T* g1 = g0 + j.w;
    int64_t ow = 0;
#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      ow = float_blocks(
          j.ow,
          [&](int64_t o) {
            backward_2x2_block<Vec8, 8>(r0 + 2 * o, r1 + 2 * o, g + o, g0 + 2 * o, g1 + 2 * o);
          },
          [&](int64_t o) {
            backward_2x2_block<Vec4, 4>(r0 + 2 * o, r1 + 2 * o, g + o, g0 + 2 * o, g1 + 2 * o);
          });
    }
#endif
    for (; ow < j.ow; ++ow) {
      const A a = ld(r0 + 2 * ow), b = ld(r0 + 2 * ow + 1);
      const A c = ld(r1 + 2 * ow), d = ld(r1 + 2 * ow + 1);
      const bool tb = takes(b, a);
      const A mb = tb ? b : a;
      const bool tc = takes(c, mb);
      const A mc = tc ? c : mb;
      const bool td = takes(d, mc);
      int32_t k = tb ? 1 : 0;  // which of a, b, c, d the window chose
      k = tc ? 2 : k;
      k = td ? 3 : k;
      const A gv = A(0) + ld(g + ow);  // +0 for -0: what a sum from +0 gives elsewhere
      g0[2 * ow] = static_cast<T>(keep_if(k == 0, gv));
      g0[2 * ow + 1] = static_cast<T>(keep_if(k == 1, gv));
      g1[2 * ow] = static_cast<T>(keep_if(k == 2, gv));
      g1[2 * ow + 1] = static_cast<T>(keep_if(k == 3, gv));
    }
    for (int64_t iw = 2 * j.ow; iw < j.w; ++iw) g0[iw] = g1[iw] = static_cast<T>(0.0f);
  }
  std::fill(gi + 2 * j.oh * j.w, gi + j.h * j.w, static_cast<T>(0.0f));
}

// Accumulators of one unit of the backward: grad_input itself when its dtype is the math type,
// otherwise a per-thread buffer that is rounded into grad_input at the end.
template <typename T>
Acc<T>* accumulators(T* gi, int64_t elements) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    return gi;
  } else {
    return thread_buffer<Acc<T>, BufferUse::kAccumulators>(elements);
  }
}

template <typename T>
void backward_nchw(const PoolJob& j, int64_t begin, int64_t end) {
  using A = Acc<T>;
  const bool fast = is_2x2(j) && j.xs[3] == 1;
  const int64_t hw = j.h * j.w;
  // Offset of tap i * kw + t from its window's origin (no division per window).
  int64_t* rel = thread_buffer<int64_t, BufferUse::kTapOffsets>(fast ? 0 : j.kh * j.kw);
  for (int64_t i = 0; i < (fast ? 0 : j.kh); ++i) {
    for (int64_t t = 0; t < j.kw; ++t) rel[i * j.kw + t] = i * j.dh * j.w + t * j.dw;
  }
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t n = plane / j.c, c = plane % j.c;
    const T* x = static_cast<const T*>(j.x) + n * j.xs[0] + c * j.xs[1];
    const T* go = static_cast<const T*>(j.go) + n * j.gs[0] + c * j.gs[1];
    T* gi = static_cast<T*>(j.out) + plane * hw;
    if (fast) {
      backward_plane_2x2(j, x, go, gi);
      continue;
    }
    A* acc = accumulators(gi, hw);
    std::fill(acc, acc + hw, A(0));
    A* m = thread_buffer<A, BufferUse::kRowValues>(j.ow);
    int32_t* best = thread_buffer<int32_t, BufferUse::kRowTaps>(j.ow);
    for (int64_t oh = 0; oh < j.oh; ++oh) {
      select_row<T, true>(j, x, oh, m, best);
      // Window (oh, ow)'s tap i * kw + t is element (oh * sh - ph) * W + ow * sw - pw + rel.
      const int64_t origin = (oh * j.sh - j.ph) * j.w - j.pw;
      for (int64_t ow = 0; ow < j.ow; ++ow) {  // in window order
        if (best[ow] < 0) continue;
        acc[origin + ow * j.sw + rel[best[ow]]] += ld(go + oh * j.gs[2] + ow * j.gs[3]);
      }
    }
    if constexpr (!std::is_same_v<T, A>) {
      for (int64_t e = 0; e < hw; ++e) gi[e] = static_cast<T>(acc[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// channels_last (xs[1] == 1; output and grad_input [N, H, W, C] in memory)
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_cl(const PoolJob& j, int64_t begin, int64_t end) {
  using A = Acc<T>;
  const int64_t chans = j.c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / j.oh, oh = row % j.oh;
    const T* x = static_cast<const T*>(j.x) + n * j.xs[0];
    const Taps ti = taps(oh, j.sh, j.ph, j.dh, j.kh, j.h);
    const int64_t ih0 = oh * j.sh - j.ph;
    for (int64_t ow = 0; ow < j.ow; ++ow) {
      T* y = static_cast<T*>(j.out) + (row * j.ow + ow) * chans;
      const Taps tj = taps(ow, j.sw, j.pw, j.dw, j.kw, j.w);
      const int64_t iw0 = ow * j.sw - j.pw;
      bool first = true;
      for (int64_t i = ti.lo; i < ti.hi; ++i) {
        for (int64_t t = tj.lo; t < tj.hi; ++t) {
          const T* v = x + (ih0 + i * j.dh) * j.xs[2] + (iw0 + t * j.dw) * j.xs[3];
          if (first) {
            std::copy(v, v + chans, y);
            first = false;
            continue;
          }
#pragma omp simd
          for (int64_t c = 0; c < chans; ++c) {
            const A a = ld(v + c);
            y[c] = takes(a, ld(y + c)) ? v[c] : y[c];
          }
        }
      }
      if (first) std::fill(y, y + chans, static_cast<T>(-std::numeric_limits<A>::infinity()));
    }
  }
}

template <typename T>
void backward_cl(const PoolJob& j, int64_t begin, int64_t end) {
  using A = Acc<T>;
  constexpr int64_t kBlock = kPoolChannelBlock;
  const int64_t blocks = (j.c + kBlock - 1) / kBlock;
  const int64_t hw = j.h * j.w;
  // Windows that share no element (stride beyond the dilated kernel, as 2x2 stride 2): each
  // grad_input element takes at most one gradient and is written once, without accumulators;
  // only the elements no window covers are zeroed. covered[ih] and covered[H + iw] say
  // whether a window covers row ih and column iw (an element is covered iff both are).
  const bool disjoint = j.sh > j.dh * (j.kh - 1) && j.sw > j.dw * (j.kw - 1);
  std::vector<char> covered(static_cast<size_t>(disjoint ? j.h + j.w : 0), 0);
  if (disjoint) {
    for (int64_t oh = 0; oh < j.oh; ++oh) {
      const Taps ti = taps(oh, j.sh, j.ph, j.dh, j.kh, j.h);
      for (int64_t i = ti.lo; i < ti.hi; ++i)
        covered[static_cast<size_t>(oh * j.sh - j.ph + i * j.dh)] = 1;
    }
    for (int64_t ow = 0; ow < j.ow; ++ow) {
      const Taps tj = taps(ow, j.sw, j.pw, j.dw, j.kw, j.w);
      for (int64_t t = tj.lo; t < tj.hi; ++t)
        covered[static_cast<size_t>(j.h + ow * j.sw - j.pw + t * j.dw)] = 1;
    }
  }
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t n = unit / blocks, c0 = (unit % blocks) * kBlock;
    const int64_t nc = std::min(kBlock, j.c - c0);
    const T* x = static_cast<const T*>(j.x) + n * j.xs[0] + c0;
    const T* go = static_cast<const T*>(j.go) + n * j.gs[0] + c0 * j.gs[1];
    T* gi = static_cast<T*>(j.out) + n * hw * j.c + c0;
    // Accumulator of pixel e, channel c: acc[e * ps + c]. Disjoint windows write grad_input
    // directly instead (below).
    constexpr bool kDirect = std::is_same_v<T, A>;
    A* acc = kDirect || disjoint ? nullptr : accumulators(gi, hw * nc);
    if constexpr (kDirect) acc = reinterpret_cast<A*>(gi);
    const int64_t ps = kDirect ? j.c : nc;
    if (disjoint) {
      for (int64_t e = 0; e < hw; ++e) {
        if (!covered[static_cast<size_t>(e / j.w)] ||
            !covered[static_cast<size_t>(j.h + e % j.w)]) {
          std::fill(gi + e * j.c, gi + e * j.c + nc, static_cast<T>(0.0f));
        }
      }
    } else {
      for (int64_t e = 0; e < hw; ++e) std::fill(acc + e * ps, acc + e * ps + nc, A(0));
    }
    alignas(64) A m[kBlock];
    alignas(64) A g[kBlock];
    alignas(64) int32_t sel[kBlock];
    for (int64_t oh = 0; oh < j.oh; ++oh) {
      const Taps ti = taps(oh, j.sh, j.ph, j.dh, j.kh, j.h);
      const int64_t ih0 = oh * j.sh - j.ph;
      for (int64_t ow = 0; ow < j.ow; ++ow) {
        const Taps tj = taps(ow, j.sw, j.pw, j.dw, j.kw, j.w);
        const int64_t iw0 = ow * j.sw - j.pw;
        // The choice of every channel, as the ordinal of the tap among the valid ones.
        int32_t tap = 0;
        for (int64_t i = ti.lo; i < ti.hi; ++i) {
          for (int64_t t = tj.lo; t < tj.hi; ++t, ++tap) {
            const T* v = x + (ih0 + i * j.dh) * j.xs[2] + (iw0 + t * j.dw) * j.xs[3];
            if (tap == 0) {
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) m[c] = ld(v + c), sel[c] = 0;
              continue;
            }
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) {
              const A a = ld(v + c);
              const bool take = takes(a, m[c]);
              m[c] = take ? a : m[c];
              sel[c] = take ? tap : sel[c];
            }
          }
        }
        if (tap == 0) continue;  // no element inside the input
        const T* gw = go + oh * j.gs[2] + ow * j.gs[3];
        for (int64_t c = 0; c < nc; ++c) g[c] = ld(gw + c * j.gs[1]);
        tap = 0;
        if (disjoint) {  // every tap of the window is written, once
          for (int64_t c = 0; c < nc; ++c) g[c] = A(0) + g[c];  // +0 for -0, as a sum from +0
          for (int64_t i = ti.lo; i < ti.hi; ++i) {
            for (int64_t t = tj.lo; t < tj.hi; ++t, ++tap) {
              T* a = gi + ((ih0 + i * j.dh) * j.w + iw0 + t * j.dw) * j.c;
#pragma omp simd
              for (int64_t c = 0; c < nc; ++c) a[c] = static_cast<T>(keep_if(sel[c] == tap, g[c]));
            }
          }
          continue;
        }
        for (int64_t i = ti.lo; i < ti.hi; ++i) {
          for (int64_t t = tj.lo; t < tj.hi; ++t, ++tap) {
            A* a = acc + ((ih0 + i * j.dh) * j.w + iw0 + t * j.dw) * ps;
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) a[c] = sel[c] == tap ? a[c] + g[c] : a[c];
          }
        }
      }
    }
    if (!kDirect && !disjoint) {
      for (int64_t e = 0; e < hw; ++e) {
        for (int64_t c = 0; c < nc; ++c) gi[e * j.c + c] = static_cast<T>(acc[e * nc + c]);
      }
    }
  }
}

}  // namespace

const MaxPoolLoops max_pool_loops = {
    {&forward_nchw<float>, &forward_nchw<double>, &forward_nchw<c10::Half>,
     &forward_nchw<c10::BFloat16>},
    {&forward_cl<float>, &forward_cl<double>, &forward_cl<c10::Half>, &forward_cl<c10::BFloat16>},
    {&backward_nchw<float>, &backward_nchw<double>, &backward_nchw<c10::Half>,
     &backward_nchw<c10::BFloat16>},
    {&backward_cl<float>, &backward_cl<double>, &backward_cl<c10::Half>,
     &backward_cl<c10::BFloat16>},
};

}  // namespace mtlcore::cpu::MTLCORE_ISA
