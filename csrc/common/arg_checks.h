// Argument checks shared by the ops' argument-checking functions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace mtlcore {

// A (height, width) pair, each value at least min_value; `name` is the argument's name.
inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": ", name, " must have 2 values (height, width), got ",
                    v.size());
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, op, ": ", name,
                    " must be >= ", min_value, ", got ", v);
}

}  // namespace mtlcore
