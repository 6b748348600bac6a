// Helpers of the C++ autograd registrations (common/*_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>

#include <memory>
#include <type_traits>

namespace mtlcore {

// The typed handle of one of our ops (looked up once per call site: keep it in a static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A new graph node: c10::intrusive_ptr nodes in recent torch, std::shared_ptr ones before.
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::make_shared<N>();
  }
}

// A gradient that reaches a node must be dense: our backward kernels take strided tensors only
// (a sparse one passed to backward() would otherwise fail in the dispatcher, naming no argument).
inline void check_dense_grad(const char* op, const at::Tensor& grad) {
  TORCH_CHECK(grad.layout() == at::kStrided, op, " (backward): grad_output has layout ",
              grad.layout(), "; only dense (strided) tensors are supported");
}

}  // namespace mtlcore
