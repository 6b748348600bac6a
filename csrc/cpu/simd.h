// Vectors of the CPU kernels, per instruction set (included by the files compiled once per ISA,
// MTLCORE_ISA = base, avx2 or avx512): Simd<T>::V, kLanes and the operations the kernels use.
// avx512: __m512 / __m512d; avx2: __m256 / __m256d; base: 16-byte generic vectors (SSE2 on
// x86-64), where fma is a multiply then an add. Every V is a GCC vector type, so arithmetic
// operators, comparisons and ?: also work on it element-wise. reduce_add and reduce_max (float
// only) combine the lanes as a tree; reduce_max's result is unspecified for NaN lanes.
#pragma once

#include <cstring>

#if defined(MTLCORE_ISA_AVX2) || defined(MTLCORE_ISA_AVX512)
#include <immintrin.h>
#endif

#ifndef MTLCORE_ISA
#error "compile this file with -DMTLCORE_ISA=<isa namespace>"
#endif

namespace mtlcore::cpu::MTLCORE_ISA {

template <typename T>
struct Simd;

#if defined(MTLCORE_ISA_AVX512)
template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V broadcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V relu(V a) { return _mm512_max_ps(zero(), a); }  // max returns a NaN a
  // The first n lanes (0 <= n <= kLanes); the others read as zero / are not written.
  static V load_first(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  // The first n lanes; the others are fill.
  static V load_first(const float* p, int n, float fill) {
    return _mm512_mask_loadu_ps(broadcast(fill), static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store_first(float* p, V v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
  // a > 0 ? a : b (false for NaN a).
  static V select_positive(V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, zero(), _CMP_GT_OQ), b, a);
  }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
};
template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V broadcast(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V relu(V a) { return _mm512_max_pd(zero(), a); }
  static V load_first(const double* p, int n) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
  static void store_first(double* p, V v, int n) {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v);
  }
  static V select_positive(V a, V b) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, zero(), _CMP_GT_OQ), b, a);
  }
};
#elif defined(MTLCORE_ISA_AVX2)
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V broadcast(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V relu(V a) { return _mm256_max_ps(zero(), a); }  // max returns a NaN a
  // The first n lanes (0 <= n <= kLanes); the others read as zero / are not written.
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_first(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  // The first n lanes; the others are fill.
  static V load_first(const float* p, int n, float fill) {
    const __m256i m = mask(n);
    return _mm256_blendv_ps(broadcast(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store_first(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static V select_positive(V a, V b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(a, zero(), _CMP_GT_OQ));
  }
  static float reduce_add(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static float reduce_max(V v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
};
template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V broadcast(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V relu(V a) { return _mm256_max_pd(zero(), a); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static V load_first(const double* p, int n) { return _mm256_maskload_pd(p, mask(n)); }
  static void store_first(double* p, V v, int n) { _mm256_maskstore_pd(p, mask(n), v); }
  static V select_positive(V a, V b) {
    return _mm256_blendv_pd(b, a, _mm256_cmp_pd(a, zero(), _CMP_GT_OQ));
  }
};
#else
// Base path: 16-byte generic vectors (SSE2 on x86-64), multiply then add.
template <typename T>
struct GenericSimd {
  using V [[gnu::vector_size(16)]] = T;
  static constexpr int kLanes = 16 / sizeof(T);
  static V zero() { return V{}; }
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V broadcast(T x) { return V{} + x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V relu(V a) { return a < T(0) ? V{} : a; }
  // The first n lanes (0 <= n <= kLanes); the others read as zero / are not written.
  static V load_first(const T* p, int n) {
    V v{};
    std::memcpy(&v, p, sizeof(T) * n);
    return v;
  }
  // The first n lanes; the others are fill.
  static V load_first(const T* p, int n, T fill) {
    V v = broadcast(fill);
    std::memcpy(&v, p, sizeof(T) * n);
    return v;
  }
  static void store_first(T* p, V v, int n) { std::memcpy(p, &v, sizeof(T) * n); }
  static V select_positive(V a, V b) { return a > T(0) ? a : b; }
  static T reduce_add(V v) {
    T lanes[kLanes];
    store(lanes, v);
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    }
    return lanes[0];
  }
  static T reduce_max(V v) {
    T lanes[kLanes];
    store(lanes, v);
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int i = 0; i < w; ++i) lanes[i] = lanes[i + w] > lanes[i] ? lanes[i + w] : lanes[i];
    }
    return lanes[0];
  }
};
template <>
struct Simd<float> : GenericSimd<float> {};
template <>
struct Simd<double> : GenericSimd<double> {};
#endif

// Sum of a vector's lanes, lane 0 first (a fixed order on every path; reduce_add, where it
// exists, sums them pairwise in the order of its path).
template <typename T>
T lane_sum(typename Simd<T>::V v) {
  T lanes[Simd<T>::kLanes];
  Simd<T>::store(lanes, v);
  T s = 0;
  for (int i = 0; i < Simd<T>::kLanes; ++i) s += lanes[i];
  return s;
}

}  // namespace mtlcore::cpu::MTLCORE_ISA
