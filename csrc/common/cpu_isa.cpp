#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace mtlcore {

CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
#if defined(MTLCORE_HAVE_ISA_AVX512)
    if (avx512) return CpuIsa::kAvx512;
#endif
#if defined(MTLCORE_HAVE_ISA_AVX2)
    if (avx2) return CpuIsa::kAvx2;
#endif
    (void)avx512;
    (void)avx2;
    return CpuIsa::kBase;
  }();
  return best;
#else
  return CpuIsa::kBase;
#endif
}

CpuIsa cpu_isa() {
  static const CpuIsa chosen = [] {
    CpuIsa isa = cpu_isa_supported();
    if (const char* env = std::getenv("MTLCORE_CPU_ISA")) {
      CpuIsa asked = isa;
      if (std::strcmp(env, "base") == 0) asked = CpuIsa::kBase;
      if (std::strcmp(env, "avx2") == 0) asked = CpuIsa::kAvx2;
      if (std::strcmp(env, "avx512") == 0) asked = CpuIsa::kAvx512;
      if (asked < isa) isa = asked;  // never above what the processor supports
    }
    return isa;
  }();
  return chosen;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

}  // namespace mtlcore
