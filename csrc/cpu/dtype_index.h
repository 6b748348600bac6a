// The index of a floating dtype in the CPU kernels' per-dtype tables.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace mtlcore::cpu {

// float32 0, float64 1, float16 2, bfloat16 3; any other dtype is an error of `op` (whose
// checks should have rejected it before).
inline int dtype_index(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::kFloat:
      return 0;
    case c10::kDouble:
      return 1;
    case c10::kHalf:
      return 2;
    case c10::kBFloat16:
      return 3;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace mtlcore::cpu
