// Run-time choice of the CPU vector path.
//
// Kernel files listed in MTLCORE_ISA_SOURCES (CMakeLists.txt) are compiled once per instruction
// set, each copy inside namespace mtlcore::cpu::<isa> (base, avx2, avx512). The best path the
// processor supports is chosen once, at first use; the environment variable MTLCORE_CPU_ISA
// (base | avx2 | avx512) can lower it, e.g. to test that every path gives the same numbers.
#pragma once

namespace mtlcore {

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The path the CPU kernels use now.
CpuIsa cpu_isa();
// The best path this processor and this build support.
CpuIsa cpu_isa_supported();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace mtlcore

// Picks `table` from the namespace of the current ISA: mtlcore::cpu::avx2::table, and so on.
// Paths that this build did not compile (non-x86 machines) fall back to base.
#if defined(MTLCORE_HAVE_ISA_AVX512)
#define MTLCORE_ISA_CASE_AVX512(table) \
  case ::mtlcore::CpuIsa::kAvx512:     \
    return ::mtlcore::cpu::avx512::table;
#else
#define MTLCORE_ISA_CASE_AVX512(table)
#endif
#if defined(MTLCORE_HAVE_ISA_AVX2)
#define MTLCORE_ISA_CASE_AVX2(table) \
  case ::mtlcore::CpuIsa::kAvx2:     \
    return ::mtlcore::cpu::avx2::table;
#else
#define MTLCORE_ISA_CASE_AVX2(table)
#endif
#define MTLCORE_ISA_SELECT(table)           \
  do {                                      \
    switch (::mtlcore::cpu_isa()) {         \
      MTLCORE_ISA_CASE_AVX512(table)        \
      MTLCORE_ISA_CASE_AVX2(table)          \
      default:                              \
        return ::mtlcore::cpu::base::table; \
    }                                       \
  } while (0)
