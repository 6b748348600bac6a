// Loops of mtlcore.multitask_loss on the CPU (see multitask_loss_kernels.h), compiled once per
// instruction set (MTLCORE_ISA = base, avx2 or avx512).
//
// Layout. Each loop walks one work item of one task through its TaskView (items b at
//   b * logits_stride; ce classes S apart; the gradient contiguous).
//   ce, [B, C] rows with C > kTransposeClasses: one row at a time, loops over the classes; the
//     row's logits are converted once into a buffer of C math values (padded to whole vectors
//     for float math, whose loops are written with Simd<float> vectors), which then holds
//     exp(x - max) for the gradient.
//   ce, dense [B, C, S]: blocks of n pixels (n * C about kBlockElements, so a block's buffer
//     stays in L2). The block's C strided planes are copied once into a class-major C x n
//     buffer (finding each pixel's max on the way), so the logits are read from memory once;
//     every later loop runs over the pixels of the block in the buffer (unit stride, so it
//     vectorises) with the classes outside, and the buffer then holds exp(x - max) for the
//     gradient.
//   ce, dense float [B, C, S] with C <= kRegisterClasses: no buffer; each vector of positions
//     keeps its C logits (then exps) in registers from the load to the gradient's store, in
//     loops compiled for each C.
//   ce, [B, C] rows with few classes: blocks of rows are transposed into the same buffer (a
//     strided read per class) and run through the same loops; the gradient is written back to
//     the rows by strided stores.
//   bce, mse, l1: one loop over the elements of each row (for bce, chunk by chunk, a loop of
//     exp(-|x|) into an L1 buffer first).
// Parallel split. None here: csrc/cpu/multitask_loss.cpp cuts tasks into items and spreads
//   them over the threads.
// Numerics. Math in float for float, half and bfloat16 logits (double for double); every
//   stored gradient is rounded once from it. exp and log are our own branch-free float versions
//   (Cody-Waite range reduction and the Cephes polynomials, about 1 ulp), so the loops
//   vectorise; their polynomials use fused multiply-add on AVX2/AVX-512. For double the C
//   library's. ce uses the max-subtracted log-sum-exp. The exps of ce and bce (of x - max and
//   -|x|, never positive) flush results below 2^-126 to 0 (exp_nonpositive). Loss sums are
//   accumulated in double; their order is fixed by the item's shape (and the vector width of the
//   ISA), never by the thread count. The ISA paths differ in the last bits (FMA, vector width).
#include "cpu/multitask_loss_kernels.h"
#include "cpu/simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef MTLCORE_ISA
#error "compile this file with -DMTLCORE_ISA=<isa namespace>"
#endif

#define MTLCORE_INLINE inline __attribute__((always_inline))

namespace mtlcore::cpu::MTLCORE_ISA {

namespace {

// ---------------------------------------------------------------------------------------------
// exp and log in float without branches (so they vectorise); the C library's in double.
// ---------------------------------------------------------------------------------------------

// a * b + c: one fused operation where the ISA has it (the polynomials below), otherwise two;
// element-wise for vectors.
MTLCORE_INLINE float madd(float a, float b, float c) {
#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

using FloatVec = Simd<float>::V;
using IntVec [[gnu::vector_size(sizeof(FloatVec))]] = int32_t;  // the lanes' bits

MTLCORE_INLINE FloatVec madd(FloatVec a, FloatVec b, FloatVec c) {
  return Simd<float>::fma(a, b, c);
}

// x as F: a float, or a vector of x in every lane.
template <typename F>
MTLCORE_INLINE F splat(float x) {
  if constexpr (std::is_same_v<F, float>) {
    return x;
  } else {
    return Simd<float>::broadcast(x);
  }
}

// The bits of a float (of each lane) as int32, and back.
MTLCORE_INLINE int32_t float_bits(float x) { return std::bit_cast<int32_t>(x); }
MTLCORE_INLINE IntVec float_bits(FloatVec x) { return reinterpret_cast<IntVec>(x); }
MTLCORE_INLINE float bits_float(int32_t i) { return std::bit_cast<float>(i); }
MTLCORE_INLINE FloatVec bits_float(IntVec i) { return reinterpret_cast<FloatVec>(i); }

// exp(d) for d <= 0 (or NaN, which comes back NaN): every exp of the losses is of such an
// argument, a softmax's x - max or bce's -|x|. One source for floats (in loops the compiler
// vectorises) and for Simd<float> vectors (in loops written with them). d = k ln2 + r with
// k = round(d / ln2), found by the 1.5 * 2^23 shift (k ends up in the low mantissa bits, read
// with integer operations: no float-to-int conversion, which would be undefined out of range);
// exp(r) is Cephes' polynomial (about 1 ulp). (Estrin's scheme for it, tried, made the loops
// over class-major blocks 10% slower.) Results below 2^-126 (d < -87.34, -inf included) are
// flushed to 0, so that 2^k is one normal float (k in [-126, 0]): an exp of every float, with
// 2^k as two factors (for results in the subnormal range) and an overflow test, took a quarter
// more instructions. A softmax sum holds exp(0) = 1 and bce adds 1 to its exp, so a flushed
// term changes no loss and no gradient by more than 2^-126. Arguments out of range run through
// the same arithmetic (their k is meaningless) and are replaced by a select on the result: a
// clamp of d before the arithmetic makes the compiler evaluate the clamped cases separately
// and blend them in, which doubles the vector code.
template <typename F>
MTLCORE_INLINE F exp_nonpositive(F d) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  const F shifted = madd(d, splat<F>(1.44269504088896341f), splat<F>(kShift));
  const F kf = shifted - kShift;
  const F r = madd(kf, splat<F>(2.12194440e-4f), madd(kf, splat<F>(-0.693359375f), d));
  F p = splat<F>(1.9875691500e-4f);
  p = madd(p, r, splat<F>(1.3981999507e-3f));
  p = madd(p, r, splat<F>(8.3334519073e-3f));
  p = madd(p, r, splat<F>(4.1665795894e-2f));
  p = madd(p, r, splat<F>(1.6666665459e-1f));
  p = madd(p, r, splat<F>(5.0000001201e-1f));
  const F er = madd(p * r, r, r + 1.0f);
  const auto k = float_bits(shifted) - float_bits(splat<F>(kShift));
  const F y = er * bits_float((k + 127) << 23);  // NaN for NaN d, which fails the test below
  return d < -87.3365448f ? F{} : y;
}

// The Cephes polynomial of log(1 + m) = m - m^2 / 2 + m^3 P(m), for m in [sqrt(1/2) - 1,
// sqrt(2) - 1]: P in Estrin's scheme (pairs combined by m^2, m^4 and m^8), which keeps the
// dependency chain at about half of Horner's; same accuracy (measured over every float: log
// 0.84 ulp, log1p 1.46 ulp).
template <typename F>
MTLCORE_INLINE F log_poly(F m) {
  const F m2 = m * m;
  const F m4 = m2 * m2;
  const F q0 = madd(splat<F>(-2.4999993993e-1f), m, splat<F>(3.3333331174e-1f));
  const F q1 = madd(splat<F>(-1.6668057665e-1f), m, splat<F>(2.0000714765e-1f));
  const F q2 = madd(splat<F>(-1.2420140846e-1f), m, splat<F>(1.4249322787e-1f));
  const F q3 = madd(splat<F>(-1.1514610310e-1f), m, splat<F>(1.1676998740e-1f));
  const F low = madd(q1, m2, q0);
  const F high = madd(q3, m2, q2);
  return madd(m4 * 7.0376836292e-2f, m4, madd(high, m4, low));
}

MTLCORE_INLINE float int_to_float(int32_t i) { return static_cast<float>(i); }
MTLCORE_INLINE FloatVec int_to_float(IntVec i) { return __builtin_convertvector(i, FloatVec); }

// log(x) for x >= 1 (our callers: sums that include exp(0) = 1), and x = inf or NaN, which
// come back unchanged; for floats and Simd<float> vectors, as exp_nonpositive.
template <typename F>
MTLCORE_INLINE F log_math(F x) {
  const auto bits = float_bits(x);
  auto e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e with m in [0.5, 1)
  F m = bits_float((bits & 0x007fffff) | 0x3f000000);
  const auto low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const F z = m * m;
  F y = log_poly(m) * m * z;
  const F fe = int_to_float(e);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  const F r = m + y + fe * 0.693359375f;
  return x - x == 0.0f ? r : x;  // false for inf and NaN
}

MTLCORE_INLINE double exp_nonpositive(double x) { return std::exp(x); }
MTLCORE_INLINE double log_math(double x) { return std::log(x); }

// log(1 + e) for e in [0, 1] (bce's log(1 + exp(-|x|))), accurate for tiny e: for
// e <= sqrt(2) - 1 the polynomial runs on m = e itself (no rounding of 1 + e); above,
// log(1 + e) = log((1 + e) / 2) + log(2) with m = (e - 1) / 2. No division.
MTLCORE_INLINE float log1p_math(float e) {
  const bool low = e <= 0.41421356237309505f;
  const float m = low ? e : (e - 1.0f) * 0.5f;
  const float z = m * m;
  const float y = log_poly(m) * m * z - 0.5f * z;
  const float r = m + y;
  return low ? r : r + 0.693147180559945309f;
}

MTLCORE_INLINE double log1p_math(double e) { return std::log1p(e); }

template <typename A, typename T>
MTLCORE_INLINE A load(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}

constexpr int64_t kPixels = 2048;            // most positions per block of the class-major ce loops
constexpr int64_t kBlockElements = 1 << 14;  // logits per block: the buffer stays in L2
constexpr int64_t kTransposeClasses = 32;    // [B, C] rows with at most this many classes are
                                             // transposed into class-major blocks

template <typename A>
struct CeConstants {
  A keep;    // 1 - label_smoothing: weight of the target's log-probability
  A smooth;  // label_smoothing / C: weight of every class's
  CeConstants(const LossOptions& o, int64_t classes)
      : keep(A(1) - A(o.label_smoothing)), smooth(A(o.label_smoothing) / A(classes)) {}
};

// The loss of one position from log(sum_c exp(x_c - m)), the target's x_t - m and
// sum_c (x_c - m): log_softmax = d - log(s), so every term below is >= 0 (no cancellation, and
// exactly 0 for one class). Without smoothing the sum is left out, as F.cross_entropy does: a
// -inf logit elsewhere in the row must not turn 0 * -inf into NaN. sum_d is accumulated in
// double: with thousands of classes and a huge logit its terms are all alike, and a float sum
// of them drifts by ~ C eps.
template <typename A>
MTLCORE_INLINE A ce_loss(A log_s, A d_t, double sum_d, const CeConstants<A>& k) {
  const A smooth_term = k.smooth == A(0) ? A(0) : static_cast<A>(k.smooth * sum_d);
  return log_s - k.keep * d_t - smooth_term;
}

MTLCORE_INLINE bool bad_label(int64_t t, int64_t classes, const LossOptions& o) {
  return t != o.ignore_index && (t < 0 || t >= classes);
}

// ---------------------------------------------------------------------------------------------
// ce over [B, C] rows.
// ---------------------------------------------------------------------------------------------

// Row b's label in *t; false when the row has no loss: its label is ignored (the row's
// gradient, if any, is zeroed) or out of range (recorded in *out; the caller stops there).
template <typename T>
MTLCORE_INLINE bool row_label(const TaskView& v, const LossOptions& o, int64_t b, T* g, int64_t* t,
                              LossPartial* out) {
  *t = static_cast<const int64_t*>(v.target)[b * v.target_stride];
  if (*t == o.ignore_index) {
    if (g != nullptr) std::fill(g, g + v.classes, T(0));
    return false;
  }
  if (bad_label(*t, v.classes, o)) {
    out->bad_label = true;
    out->label = *t;
    out->position = b;
    return false;
  }
  return true;
}

// One row's softmax sums: max m of its logits, s = sum_c exp(x_c - m) and, with label
// smoothing, sum_d = sum_c (x_c - m) (see ce_loss); e[c] = exp(x_c - m) afterwards.
template <typename A>
struct RowSums {
  A m, s;
  double sum_d = 0.0;
};

// Float math: the logits are copied (converted) into e, padded with -inf to whole vectors, and
// the max and the sum of exps are loops over Simd<float> vectors with two accumulators each,
// reduced as a tree once per row. (The compiler's own vectorisation of these reductions ended
// each row with a serial sum of the lanes and ran the last C mod kLanes exps as scalar code:
// with 100 classes, twice the time.) The padding's exp is 0, so it adds nothing. e holds
// padded_classes(C) floats.
int64_t padded_classes(int64_t classes, float) {
  constexpr int64_t L = Simd<float>::kLanes;
  return (classes + L - 1) / L * L;
}

template <typename T>
MTLCORE_INLINE RowSums<float> row_sums(const T* x, int64_t classes, bool smooth, float* e) {
  using S = Simd<float>;
  using V = S::V;
  constexpr int64_t L = S::kLanes;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t padded = padded_classes(classes, 0.0f);
  // float logits are read straight into the vectors, others converted into e first.
  const float* src = e;
  if constexpr (std::is_same_v<T, float>) {
    src = x;
  } else {
#pragma omp simd
    for (int64_t c = 0; c < classes; ++c) e[c] = load<float>(x, c);
  }
  // The max: a NaN logit never wins (x > m is false), as in the loops over other layouts.
  V m0 = S::broadcast(-kInf), m1 = m0;
  int64_t c = 0;
  for (; c + 2 * L <= classes; c += 2 * L) {
    const V a = S::load(src + c), a1 = S::load(src + c + L);
    if constexpr (std::is_same_v<T, float>) {
      S::store(e + c, a);
      S::store(e + c + L, a1);
    }
    m0 = a > m0 ? a : m0;
    m1 = a1 > m1 ? a1 : m1;
  }
  for (; c + L <= classes; c += L) {
    const V a = S::load(src + c);
    if constexpr (std::is_same_v<T, float>) S::store(e + c, a);
    m0 = a > m0 ? a : m0;
  }
  if (c < classes) {
    const V a = S::load_first(src + c, static_cast<int>(classes - c), -kInf);
    S::store(e + c, a);  // with the padding
    m1 = a > m1 ? a : m1;
  }
  RowSums<float> r;
  r.m = S::reduce_max(m1 > m0 ? m1 : m0);
  if (smooth) {
    const float m = r.m;
    double sum_d = 0.0;
#pragma omp simd reduction(+ : sum_d)
    for (int64_t j = 0; j < classes; ++j) sum_d += static_cast<double>(e[j] - m);
    r.sum_d = sum_d;
  }
  const V mv = S::broadcast(r.m);
  V s0 = S::zero(), s1 = S::zero();
  for (c = 0; c + 2 * L <= padded; c += 2 * L) {
    const V a = exp_nonpositive(S::load(e + c) - mv);
    const V a1 = exp_nonpositive(S::load(e + c + L) - mv);
    S::store(e + c, a);
    S::store(e + c + L, a1);
    s0 += a;
    s1 += a1;
  }
  if (c < padded) {
    const V a = exp_nonpositive(S::load(e + c) - mv);
    S::store(e + c, a);
    s0 += a;
  }
  r.s = S::reduce_add(s0 + s1);
  return r;
}

// Double math: loops over the classes, vectorised by the compiler. e holds C doubles.
int64_t padded_classes(int64_t classes, double) { return classes; }

template <typename T>
MTLCORE_INLINE RowSums<double> row_sums(const T* x, int64_t classes, bool smooth, double* e) {
  RowSums<double> r;
  double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < classes; ++c) {
    const double xc = load<double>(x, c);
    e[c] = xc;
    m = xc > m ? xc : m;
  }
  double s = 0.0, sum_d = 0.0;
  if (smooth) {
#pragma omp simd reduction(+ : s, sum_d)
    for (int64_t c = 0; c < classes; ++c) {
      const double d = e[c] - m;
      const double ec = exp_nonpositive(d);
      e[c] = ec;
      s += ec;
      sum_d += d;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < classes; ++c) {
      const double ec = exp_nonpositive(e[c] - m);
      e[c] = ec;
      s += ec;
    }
  }
  r.m = m;
  r.s = s;
  r.sum_d = sum_d;
  return r;
}

template <typename T, typename A, bool kGrad>
LossPartial ce_rows(const TaskView& v, const LossWork& w, const LossOptions& o) {
  const T* logits = static_cast<const T*>(v.logits);
  T* grad = static_cast<T*>(v.grad);
  const int64_t classes = v.classes;
  const CeConstants<A> k(o, classes);
  const A f = static_cast<A>(v.grad_factor);
  thread_local std::vector<A> buffer;
  buffer.resize(static_cast<size_t>(padded_classes(classes, A(0))));
  A* e = buffer.data();
  LossPartial out;
  for (int64_t b = w.b0; b < w.b1; ++b) {
    const T* x = logits + b * v.logits_stride;
    T* g = kGrad ? grad + b * classes : nullptr;
    int64_t t;
    if (!row_label(v, o, b, g, &t, &out)) {
      if (out.bad_label) return out;
      continue;
    }
    const RowSums<A> r = row_sums(x, classes, k.smooth != A(0), e);
    const A loss = ce_loss(log_math(r.s), load<A>(x, t) - r.m, r.sum_d, k);
    out.sum += static_cast<double>(loss);
    out.count += 1;
    if constexpr (kGrad) {
      const A inv = A(1) / r.s;
#pragma omp simd
      for (int64_t c = 0; c < classes; ++c) g[c] = static_cast<T>((e[c] * inv - k.smooth) * f);
      g[t] = static_cast<T>((e[t] * inv - k.smooth - k.keep) * f);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ce on a block of n <= kPixels positions, class-major in a buffer: class c of position p at
// e[c * ld + p] (CeBlock::n, ld). The block's logits are copied in once (the copy also finds each
// position's max), so the strided logits are read from memory once, and every later loop runs
// in the buffer over the positions (unit stride: it vectorises) with the classes outside.
// tt[p] is the position's label, -1 when ignored (it matches no class).
// ---------------------------------------------------------------------------------------------
template <typename A>
struct CeBlock {
  alignas(64) A m[kPixels], s[kPixels], d_t[kPixels];
  alignas(64) double sum_d[kPixels];  // see ce_loss
  alignas(64) int32_t tt[kPixels];    // labels fit: the argument check bounds C below 2^31
  int64_t n = 0;                      // positions per block (a multiple of 16)
  // Row stride of e: n + 16. With rows a power of two of bytes apart (n is 2048 for up to 8
  // classes, 1024 for 16, 512 for 32), the transposing loops' accesses to one position's
  // classes all fell into one L1 set ([2048, 16] rows took 2.1x as long, [2048, 32] 1.3x).
  int64_t ld = 0;
  std::vector<A> e;  // C x n (rows ld apart): the logits, then exp(x - max)
};

template <typename A>
CeBlock<A>& ce_block_buffers(int64_t classes) {
  thread_local CeBlock<A> blk;
  blk.n = std::clamp<int64_t>(kBlockElements / classes / 16 * 16, 16, kPixels);
  blk.ld = blk.n + 16;
  blk.e.resize(static_cast<size_t>(classes * blk.ld));
  return blk;
}

// Reads n labels (stride apart) into blk.tt; false (and *out set) on a label out of range.
template <typename A>
bool read_labels(const int64_t* y, int64_t stride, int64_t n, int64_t classes,
                 int64_t first_position, const LossOptions& o, CeBlock<A>& blk, LossPartial* out) {
  const int64_t ignore = o.ignore_index;
  int32_t* tt = blk.tt;
  int32_t any_bad = 0;
#pragma omp simd reduction(| : any_bad)
  for (int64_t p = 0; p < n; ++p) {
    const int64_t t = y[p * stride];
    const bool ignored = t == ignore;
    any_bad |= !ignored && (t < 0 || t >= classes) ? 1 : 0;
    tt[p] = ignored ? -1 : static_cast<int32_t>(t);
  }
  if (any_bad == 0) return true;
  for (int64_t p = 0;; ++p) {
    const int64_t t = y[p * stride];
    if (bad_label(t, classes, o)) {
      out->bad_label = true;
      out->label = t;
      out->position = first_position + p;
      return false;
    }
  }
}

// Copies the block's logits into blk.e (class-major) and sets blk.m to each position's max.
// Class c of position p at x[c * class_stride + p * step]: dense logits have step 1 and
// planes class_stride apart; [B, C] rows have class_stride 1 and rows step apart (strided loads,
// gathers where the ISA has them; with ce_block_grad's strided stores, [2048, 10] rows ran
// 1.1-1.2x faster than transposed row by row with scalar stores, forward and with gradient).
template <bool kUnitStep, typename T, typename A>
void ce_fill(const T* x, int64_t class_stride, int64_t step, int64_t n, int64_t classes,
             CeBlock<A>& blk) {
  if constexpr (kUnitStep) step = 1;
  A* m = blk.m;
  A* e = blk.e.data();
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) m[p] = e[p] = load<A>(x, p * step);
  for (int64_t c = 1; c < classes; ++c) {
    const T* xc = x + c * class_stride;
    A* ec = e + c * blk.ld;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const A xv = load<A>(xc, p * step);
      ec[p] = xv;
      m[p] = xv > m[p] ? xv : m[p];
    }
  }
}

// The class loop of the block: e = exp(e - m), s += e and, with label smoothing,
// sum_d += e - m.
template <typename A, bool kSmooth>
void ce_block_exps(int64_t n, int64_t classes, CeBlock<A>& blk) {
  const A* m = blk.m;
  A* s = blk.s;
  double* sum_d = blk.sum_d;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    s[p] = A(0);
    sum_d[p] = 0.0;
  }
  for (int64_t c = 0; c < classes; ++c) {
    A* ec = blk.e.data() + c * blk.ld;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const A d = ec[p] - m[p];
      const A ev = exp_nonpositive(d);
      ec[p] = ev;
      s[p] += ev;
      if constexpr (kSmooth) sum_d[p] += static_cast<double>(d);
    }
  }
}

// The losses of a filled block, added to *out; leaves exp(x - max) in blk.e and the reciprocal
// of each position's sum of them in blk.s.
template <typename A>
void ce_block(int64_t n, int64_t classes, const CeConstants<A>& k, CeBlock<A>& blk,
              LossPartial* out) {
  A* m = blk.m;
  A* s = blk.s;
  A* d_t = blk.d_t;
  const int32_t* tt = blk.tt;
  // The target's logit, read once per position rather than selected in every class's loop.
  for (int64_t p = 0; p < n; ++p) {
    d_t[p] = tt[p] >= 0 ? blk.e[static_cast<size_t>(tt[p] * blk.ld + p)] - m[p] : A(0);
  }
  if (k.smooth == A(0)) {
    ce_block_exps<A, false>(n, classes, blk);
  } else {
    ce_block_exps<A, true>(n, classes, blk);
  }
  const double* sum_d = blk.sum_d;
  double sum = 0.0;
  int64_t count = 0;
#pragma omp simd reduction(+ : sum, count)
  for (int64_t p = 0; p < n; ++p) {
    const A loss = ce_loss(log_math(s[p]), d_t[p], sum_d[p], k);
    const bool valid = tt[p] >= 0;
    sum += valid ? static_cast<double>(loss) : 0.0;
    count += valid ? 1 : 0;
    s[p] = A(1) / s[p];  // from here on: the reciprocal
  }
  out->sum += sum;
  out->count += count;
}

// The gradient of the block times f, class c of position p at g[c * class_stride + p * step]
// (as ce_fill reads the logits: strided stores, scatters where the ISA has them, for rows):
// softmax - smooth / C, minus (1 - smooth) at the target, zero where the label is missing.
template <bool kUnitStep, typename A, typename G>
void ce_block_grad(int64_t n, int64_t classes, const CeConstants<A>& k, A f, CeBlock<A>& blk, G* g,
                   int64_t class_stride, int64_t step) {
  if constexpr (kUnitStep) step = 1;
  const A* s = blk.s;
  const int32_t* tt = blk.tt;
  for (int32_t c = 0; c < classes; ++c) {
    const A* ec = blk.e.data() + c * blk.ld;
    G* gc = g + c * class_stride;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const A gv = (ec[p] * s[p] - k.smooth - (tt[p] == c ? k.keep : A(0))) * f;
      gc[p * step] = static_cast<G>(tt[p] >= 0 ? gv : A(0));
    }
  }
}

// Dense [B, C, S] logits: calls block(b, p0, n, out) for the item's blocks of at most
// `positions` positions (p0 to p0 + n of image b), each once its labels are in blk.tt; stops at
// a label out of range (recorded in the result).
template <typename A, typename Block>
LossPartial for_each_dense_block(const TaskView& v, const LossWork& w, const LossOptions& o,
                                 int64_t positions, CeBlock<A>& blk, Block block) {
  const int64_t* target = static_cast<const int64_t*>(v.target);
  LossPartial out;
  for (int64_t b = w.b0; b < w.b1; ++b) {
    for (int64_t p0 = w.s0; p0 < w.s1; p0 += positions) {
      const int64_t n = std::min(positions, w.s1 - p0);
      if (!read_labels(target + b * v.target_stride + p0, 1, n, v.classes, b * v.inner + p0, o, blk,
                       &out)) {
        return out;
      }
      block(b, p0, n, out);
    }
  }
  return out;
}

// Dense [B, C, S] logits: blocks of CeBlock::n pixels.
template <typename T, typename A, bool kGrad>
LossPartial ce_dense(const TaskView& v, const LossWork& w, const LossOptions& o) {
  const T* logits = static_cast<const T*>(v.logits);
  T* grad = static_cast<T*>(v.grad);
  const int64_t classes = v.classes;
  const int64_t pixels = v.inner;
  const CeConstants<A> k(o, classes);
  CeBlock<A>& blk = ce_block_buffers<A>(classes);
  return for_each_dense_block(
      v, w, o, blk.n, blk, [&](int64_t b, int64_t p0, int64_t n, LossPartial& out) {
        ce_fill<true>(logits + b * v.logits_stride + p0, pixels, 1, n, classes, blk);
        ce_block(n, classes, k, blk, &out);
        if constexpr (kGrad) {
          ce_block_grad<true>(n, classes, k, static_cast<A>(v.grad_factor), blk,
                              grad + (b * classes * pixels + p0), pixels, 1);
        }
      });
}

// [B, C] rows with few classes: blocks of CeBlock::n rows are transposed into the class-major
// buffer, so the loops run over rows (a loop over two or ten classes cannot use the vector
// lanes); the gradient goes straight back into the rows (ce_block_grad's strided stores).
template <typename T, typename A, bool kGrad>
LossPartial ce_rows_transposed(const TaskView& v, const LossWork& w, const LossOptions& o) {
  const T* logits = static_cast<const T*>(v.logits);
  const int64_t* target = static_cast<const int64_t*>(v.target);
  T* grad = static_cast<T*>(v.grad);
  const int64_t classes = v.classes;
  const CeConstants<A> k(o, classes);
  CeBlock<A>& blk = ce_block_buffers<A>(classes);
  LossPartial out;
  for (int64_t b0 = w.b0; b0 < w.b1; b0 += blk.n) {
    const int64_t n = std::min(blk.n, w.b1 - b0);
    if (!read_labels(target + b0 * v.target_stride, v.target_stride, n, classes, b0, o, blk,
                     &out)) {
      return out;
    }
    ce_fill<false>(logits + b0 * v.logits_stride, 1, v.logits_stride, n, classes, blk);
    ce_block(n, classes, k, blk, &out);
    if constexpr (kGrad) {
      ce_block_grad<false>(n, classes, k, static_cast<A>(v.grad_factor), blk, grad + b0 * classes,
                           1, classes);
    }
  }
  return out;
}

// Dense float [B, C, S] logits with few classes, in one pass over memory: for each vector of
// kLanes positions the C planes' logits are loaded into C vector registers (the array below),
// which then hold exp(x - max) until the gradient is stored; the max, the sum of exps, the
// target's logit and the loss are registers too. The math of ce_block and ce_block_grad up to
// rounding (the smoothing sum in float: at most kRegisterClasses terms; exps below 2^-126
// flushed; the gradient as e (f / s) - smooth f), without their buffer round trips: with a
// runtime C (the array then on the stack), [8, 13, 64, 64] ran 1.56x as fast forward and 1.39x
// with the gradient (AVX-512, 1 thread); at 20 and 32 classes it was no faster than the block
// loops (0.96-1.04x).
constexpr int64_t kRegisterClasses = 16;

// What every vector of positions of one task shares: the gradient's factor f, label
// smoothing's weights (CeConstants) and whether there is smoothing at all.
struct RegisterConstants {
  FloatVec f, keep, smooth;
  bool smoothing;
};

// One vector of positions of kClasses planes pixels apart: its loss per position into loss (0
// where the label t is -1, ignored) and, unless g is null, its gradient into g. kClasses is a
// compile-time constant, so that the loops unroll and e stays in registers (AVX-512, 1
// thread, [8, 13, 128, 128]: forward 1.2-1.4 -> 0.8-0.9 ms, with the gradient 1.5 -> 1.3 ms,
// with exp_nonpositive). A null g is a branch, not an instantiation, which would double the
// code (16 class counts, 3 ISAs: 300 KB more) for no measurable gain.
template <int kClasses>
MTLCORE_INLINE void ce_register_vector(const float* x, float* g, int64_t pixels, IntVec t,
                                       const RegisterConstants& k, float* loss) {
  using S = Simd<float>;
  using V = S::V;
  V e[kClasses];
  V m = S::broadcast(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < kClasses; ++c) {
    e[c] = S::load(x + c * pixels);
    m = e[c] > m ? e[c] : m;  // a NaN never wins, as in ce_fill
  }
  V x_t = S::zero(), s = S::zero(), sum_d = S::zero();
  for (int c = 0; c < kClasses; ++c) {
    const V d = e[c] - m;
    x_t = t == c ? d : x_t;
    sum_d += d;
    e[c] = exp_nonpositive(d);
    s += e[c];
  }
  const auto valid = t >= 0;
  const V value = log_math(s) - k.keep * x_t - (k.smoothing ? k.smooth * sum_d : S::zero());
  S::store(loss, valid ? value : S::zero());
  if (g != nullptr) {
    // (e / s - smooth - [c == t] keep) f, as e (f / s) - smooth f - [c == t] keep f.
    // Ignored positions get 0, even where their logits hold a NaN.
    const V scale = k.f / s, shift = k.smooth * k.f, target_shift = k.keep * k.f;
    for (int c = 0; c < kClasses; ++c) {
      V gv = S::fma(e[c], scale, -shift);
      gv = t == c ? gv - target_shift : gv;
      S::store(g + c * pixels, valid ? gv : S::zero());
    }
  }
}

template <int kClasses>
LossPartial ce_dense_registers(const TaskView& v, const LossWork& w, const LossOptions& o) {
  constexpr int64_t L = Simd<float>::kLanes;
  const float* logits = static_cast<const float*>(v.logits);
  float* grad = static_cast<float*>(v.grad);
  const int64_t pixels = v.inner;
  const CeConstants<float> ck(o, kClasses);
  const RegisterConstants k{Simd<float>::broadcast(static_cast<float>(v.grad_factor)),
                            Simd<float>::broadcast(ck.keep), Simd<float>::broadcast(ck.smooth),
                            ck.smooth != 0.0f};
  CeBlock<float>& blk = ce_block_buffers<float>(kClasses);  // its labels and losses
  float* losses = blk.s;
  return for_each_dense_block(
      v, w, o, kPixels, blk, [&](int64_t b, int64_t p0, int64_t n, LossPartial& out) {
        const float* x = logits + b * v.logits_stride + p0;
        float* g = grad != nullptr ? grad + (b * kClasses * pixels + p0) : nullptr;
        IntVec t;  // past n, lanes the loss sum below and the stores leave out
        int64_t p = 0;
        for (; p + L <= n; p += L) {
          std::memcpy(&t, blk.tt + p, sizeof(t));
          ce_register_vector<kClasses>(x + p, g != nullptr ? g + p : nullptr, pixels, t, k,
                                       losses + p);
        }
        if (p < n) {  // the last len < L positions, through whole vectors on the stack
          const int len = static_cast<int>(n - p);
          alignas(64) float xs[kClasses * L], gs[kClasses * L];
          for (int c = 0; c < kClasses; ++c) {
            Simd<float>::store(xs + c * L, Simd<float>::load_first(x + p + c * pixels, len));
          }
          std::memcpy(&t, blk.tt + p, sizeof(t));
          ce_register_vector<kClasses>(xs, g != nullptr ? gs : nullptr, L, t, k, losses + p);
          for (int c = 0; g != nullptr && c < kClasses; ++c) {
            Simd<float>::store_first(g + p + c * pixels, Simd<float>::load(gs + c * L), len);
          }
        }
        double sum = 0.0;
        int64_t count = 0;
#pragma omp simd reduction(+ : sum, count)
        for (int64_t q = 0; q < n; ++q) {
          sum += static_cast<double>(losses[q]);
          count += blk.tt[q] >= 0 ? 1 : 0;
        }
        out.sum += sum;
        out.count += count;
      });
}

// ce_dense_registers<C> for the task's C (1 to kRegisterClasses).
template <int... kC>
LossPartial ce_dense_registers_for(const TaskView& v, const LossWork& w, const LossOptions& o,
                                   std::integer_sequence<int, kC...>) {
  using Kernel = LossPartial (*)(const TaskView&, const LossWork&, const LossOptions&);
  static constexpr Kernel kKernels[] = {&ce_dense_registers<kC + 1>...};
  return kKernels[v.classes - 1](v, w, o);
}

template <typename T, typename A, bool kGrad>
LossPartial ce(const TaskView& v, const LossWork& w, const LossOptions& o) {
  if constexpr (std::is_same_v<T, float>) {
    if (v.inner > 1 && v.classes <= kRegisterClasses) {
      return ce_dense_registers_for(v, w, o, std::make_integer_sequence<int, kRegisterClasses>());
    }
  }
  if (v.inner > 1) return ce_dense<T, A, kGrad>(v, w, o);
  if (v.classes <= kTransposeClasses) return ce_rows_transposed<T, A, kGrad>(v, w, o);
  return ce_rows<T, A, kGrad>(v, w, o);
}

// ---------------------------------------------------------------------------------------------
// bce, mse, l1: element-wise, NaN target = missing.
// ---------------------------------------------------------------------------------------------
// e: exp(-|x|) for bce (computed by the caller, see elementwise_run); ignored otherwise.
template <LossKind K, typename A>
MTLCORE_INLINE void element_loss(A x, A y, A e, A* loss, A* grad) {
  if constexpr (K == LossKind::kMse) {
    const A d = x - y;
    *loss = d * d;
    *grad = d + d;
  } else if constexpr (K == LossKind::kL1) {
    const A d = x - y;
    *loss = std::abs(d);
    *grad = d > A(0) ? A(1) : (d < A(0) ? A(-1) : d * A(0));  // 0 at 0, NaN for NaN
  } else {
    // max(x, 0) - x y + log(1 + exp(-|x|)); d/dx = sigmoid(x) - y. An infinite x gives what
    // F.binary_cross_entropy_with_logits's (1 - y) x + softplus(-x) gives: (1 - y) x for +inf,
    // NaN for -inf.
    const A u = A(1) + e;
    const A finite_loss = (x > A(0) ? x : A(0)) - x * y + log1p_math(e);
    const A inf_loss = x > A(0) ? (A(1) - y) * x : std::numeric_limits<A>::quiet_NaN();
    *loss = std::abs(x) == std::numeric_limits<A>::infinity() ? inf_loss : finite_loss;
    *grad = (x >= A(0) ? A(1) : e) / u - y;
  }
}

// n elements from x, y (and g): sums in A over chunks of kSumChunk elements (vector lanes of
// a few dozen terms each), added to the double total chunk by chunk.
constexpr int64_t kSumChunk = 256;

// bce runs exp and then log1p on each element: in one loop, each vector's work would be one
// long chain of dependent operations, longer than the out-of-order window can overlap with
// the next vectors' (measured: 1.35-1.45x slower). So a first loop writes the chunk's
// exp(-|x|) to a buffer in L1 and the second reads them.
template <LossKind K, typename T, typename Tt, typename A, bool kGrad>
void elementwise_run(const T* x, const Tt* y, T* g, A f, int64_t n, LossPartial* out) {
  alignas(64) A exps[K == LossKind::kBce ? kSumChunk : 1];
  for (int64_t j0 = 0; j0 < n; j0 += kSumChunk) {
    const int64_t j1 = std::min(n, j0 + kSumChunk);
    if constexpr (K == LossKind::kBce) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) exps[j - j0] = exp_nonpositive(-std::abs(load<A>(x, j)));
    }
    A sum = A(0);
    int32_t count = 0;
#pragma omp simd reduction(+ : sum, count)
    for (int64_t j = j0; j < j1; ++j) {
      const A yv = load<A>(y, j);
      A loss, gv;
      const A e = K == LossKind::kBce ? exps[j - j0] : A(0);
      element_loss<K>(load<A>(x, j), yv, e, &loss, &gv);
      const bool valid = yv == yv;
      sum += valid ? loss : A(0);
      count += valid ? 1 : 0;
      if constexpr (kGrad) g[j] = static_cast<T>(valid ? gv * f : A(0));
    }
    out->sum += static_cast<double>(sum);
    out->count += count;
  }
}

template <LossKind K, typename T, typename Tt, typename A, bool kGrad>
LossPartial elementwise(const TaskView& v, const LossWork& w, const LossOptions& o) {
  const T* logits = static_cast<const T*>(v.logits);
  const Tt* target = static_cast<const Tt*>(v.target);
  T* grad = static_cast<T*>(v.grad);
  LossPartial out;
  const int64_t row = v.classes;
  const A f = static_cast<A>(v.grad_factor);
  if (w.s0 == 0 && w.s1 == row && v.logits_stride == row && v.target_stride == row) {
    // Whole rows, back to back in memory: one run over all of them.
    const int64_t first = w.b0 * row;
    elementwise_run<K, T, Tt, A, kGrad>(logits + first, target + first,
                                        kGrad ? grad + first : nullptr, f, (w.b1 - w.b0) * row,
                                        &out);
    return out;
  }
  for (int64_t b = w.b0; b < w.b1; ++b) {
    elementwise_run<K, T, Tt, A, kGrad>(
        logits + b * v.logits_stride + w.s0, target + b * v.target_stride + w.s0,
        kGrad ? grad + b * row + w.s0 : nullptr, f, w.s1 - w.s0, &out);
  }
  return out;
}

template <typename T>
using MathOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <LossKind K, typename T, typename Tt>
LossPartial loss_loop(const TaskView& v, const LossWork& w, const LossOptions& o) {
  using A = MathOf<T>;
  if constexpr (K == LossKind::kCe) {
    return v.grad ? ce<T, A, true>(v, w, o) : ce<T, A, false>(v, w, o);
  } else {
    return v.grad ? elementwise<K, T, Tt, A, true>(v, w, o)
                  : elementwise<K, T, Tt, A, false>(v, w, o);
  }
}

template <typename T>
void scale_loop(const void* grad, void* out, int64_t n, double coef) {
  using A = MathOf<T>;
  const T* __restrict__ g = static_cast<const T*>(grad);
  T* __restrict__ o = static_cast<T*>(out);
  const A c = static_cast<A>(coef);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) o[k] = static_cast<T>(load<A>(g, k) * c);
}

// Row of the table for one kind: [dtype][target variant]. float32 targets for double logits
// never occur (the argument check converts them to double).
template <LossKind K>
constexpr std::array<std::array<LossLoop, 2>, 4> kind_loops() {
  return {{
      {&loss_loop<K, float, float>, &loss_loop<K, float, float>},
      {&loss_loop<K, double, double>, &loss_loop<K, double, double>},
      {&loss_loop<K, c10::Half, c10::Half>, &loss_loop<K, c10::Half, float>},
      {&loss_loop<K, c10::BFloat16, c10::BFloat16>, &loss_loop<K, c10::BFloat16, float>},
  }};
}

constexpr MultitaskLossLoops make_loops() {
  MultitaskLossLoops t{};
  const std::array<std::array<std::array<LossLoop, 2>, 4>, 4> loss = {
      kind_loops<LossKind::kCe>(), kind_loops<LossKind::kBce>(), kind_loops<LossKind::kMse>(),
      kind_loops<LossKind::kL1>()};
  for (int k = 0; k < 4; ++k) {
    for (int d = 0; d < 4; ++d) {
      for (int tv = 0; tv < 2; ++tv) t.loss[k][d][tv] = loss[k][d][tv];
    }
  }
  t.scale[0] = &scale_loop<float>;
  t.scale[1] = &scale_loop<double>;
  t.scale[2] = &scale_loop<c10::Half>;
  t.scale[3] = &scale_loop<c10::BFloat16>;
  return t;
}

}  // namespace

// Constant-initialised: a dynamic initializer here would run this ISA's instructions at load
// time, on processors that may not have them.
constinit const MultitaskLossLoops multitask_loss_loops = make_loops();

}  // namespace mtlcore::cpu::MTLCORE_ISA
