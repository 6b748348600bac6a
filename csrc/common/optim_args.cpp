#include "common/optim_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <functional>

namespace mtlcore {

namespace {

bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0.0; }

void check_sgd_options(const SgdOptions& o) {
  TORCH_CHECK_VALUE(finite_nonneg(o.lr), "mtlcore.sgd_: lr must be finite and >= 0, got ", o.lr);
  TORCH_CHECK_VALUE(finite_nonneg(o.momentum),
                    "mtlcore.sgd_: momentum must be finite and >= 0, got ", o.momentum);
  TORCH_CHECK_VALUE(std::isfinite(o.dampening), "mtlcore.sgd_: dampening must be finite, got ",
                    o.dampening);
  TORCH_CHECK_VALUE(finite_nonneg(o.weight_decay),
                    "mtlcore.sgd_: weight_decay must be finite and >= 0, got ", o.weight_decay);
  TORCH_CHECK_VALUE(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
                    "mtlcore.sgd_: nesterov needs momentum > 0 and dampening == 0 (momentum=",
                    o.momentum, ", dampening=", o.dampening, ")");
}

void check_adam_options(const AdamOptions& o) {
  TORCH_CHECK_VALUE(finite_nonneg(o.lr), "mtlcore.adam_: lr must be finite and >= 0, got ", o.lr);
  TORCH_CHECK_VALUE(std::isfinite(o.beta1) && o.beta1 >= 0.0 && o.beta1 < 1.0,
                    "mtlcore.adam_: beta1 must be in [0, 1), got ", o.beta1);
  TORCH_CHECK_VALUE(std::isfinite(o.beta2) && o.beta2 >= 0.0 && o.beta2 < 1.0,
                    "mtlcore.adam_: beta2 must be in [0, 1), got ", o.beta2);
  TORCH_CHECK_VALUE(finite_nonneg(o.eps), "mtlcore.adam_: eps must be finite and >= 0, got ",
                    o.eps);
  TORCH_CHECK_VALUE(finite_nonneg(o.weight_decay),
                    "mtlcore.adam_: weight_decay must be finite and >= 0, got ", o.weight_decay);
}

// A tensor updated in place must not share memory with any other tensor of the call: another
// list's tensor, or another index of its own list (one parameter passed twice, overlapping
// slices of one buffer). Tensors are grouped by storage, so the usual call, where every tensor
// has a storage of its own, costs one sort; views of one storage must be provably disjoint.
void check_no_shared_memory(const char* op, const std::vector<NamedList>& lists) {
  struct Entry {
    const void* storage;
    size_t list;
    size_t index;
  };
  std::vector<Entry> entries;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < lists[l].tensors.size(); ++i) {
      const at::Tensor& t = lists[l].tensors[i];
      if (t.numel() > 0) entries.push_back({t.storage().unsafeGetStorageImpl(), l, i});
    }
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::less<const void*>()(a.storage, b.storage);
  });
  for (size_t first = 0; first < entries.size();) {
    size_t last = first + 1;
    while (last < entries.size() && entries[last].storage == entries[first].storage) ++last;
    for (size_t a = first; a < last; ++a) {
      for (size_t b = a + 1; b < last; ++b) {
        const Entry& x = entries[a];
        const Entry& y = entries[b];
        if (!lists[x.list].mutated && !lists[y.list].mutated) continue;
        const auto status =
            at::get_overlap_status(lists[x.list].tensors[x.index], lists[y.list].tensors[y.index]);
        TORCH_CHECK_VALUE(status == at::MemOverlapStatus::No, op, ": ", lists[x.list].name, "[",
                          x.index, "] and ", lists[y.list].name, "[", y.index,
                          "] share memory; each must be its own tensor");
      }
    }
    first = last;
  }
}

void check_tensor_lists(const char* op, const std::vector<NamedList>& lists,
                        const c10::Device& device, const std::vector<at::ScalarType>& allowed) {
  const NamedList& ref = lists.front();
  const size_t n = ref.tensors.size();
  for (const NamedList& l : lists) {
    TORCH_CHECK_VALUE(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                      " tensors but ", ref.name, " has ", n);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = ref.tensors[i];
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK_VALUE(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", l.name, "[", i, "] has layout ",
                        t.layout(), "; sparse tensors are not supported");
      TORCH_CHECK_VALUE(t.device() == device, op, ": ", l.name, "[", i, "] is on ", t.device(),
                        " but ", ref.name, "[0] is on ", device,
                        "; all tensors of one call must be on one device");
      bool ok_dtype = false;
      for (auto s : allowed) ok_dtype = ok_dtype || t.scalar_type() == s;
      TORCH_CHECK_TYPE(ok_dtype, op, ": ", l.name, "[", i, "] has dtype ", t.scalar_type(),
                       ", which this device does not support");
      TORCH_CHECK_TYPE(t.scalar_type() == ref.tensors[0].scalar_type(), op, ": ", l.name, "[", i,
                       "] has dtype ", t.scalar_type(), " but ", ref.name, "[0] has ",
                       ref.tensors[0].scalar_type(),
                       "; one call updates tensors of one dtype (group them by dtype)");
      TORCH_CHECK_VALUE(t.sizes() == p.sizes(), op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                        " but ", ref.name, "[", i, "] has shape ", p.sizes());
      if (l.mutated) {
        TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", l.name, "[",
                          i,
                          "] has elements that share memory (an expanded view); it cannot be "
                          "updated in place");
      }
    }
  }
  check_no_shared_memory(op, lists);
}

void check_scaler_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->defined() && t->numel() == 1, op, ": ", name,
                    " must be a one-element tensor, got shape ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " is on ", t->device(),
                    " but the parameters are on ", device);
}

void check_state_steps(const char* op, at::TensorList steps, size_t n, const c10::Device& device) {
  TORCH_CHECK_VALUE(steps.size() == n, op, ": state_steps has ", steps.size(),
                    " tensors but params has ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, op, ": state_steps[", i,
                      "] must be a one-element tensor, got shape ", s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                     ": state_steps[", i, "] must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == device, op, ": state_steps[", i, "] is on ", s.device(),
                      " but the parameters are on ", device);
  }
}

}  // namespace

std::vector<NamedList> check_sgd_args(at::TensorList params, at::TensorList grads,
                                      at::TensorList momentum_buffers, const SgdOptions& o,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf,
                                      const std::vector<at::ScalarType>& dtypes) {
  constexpr const char* op = "mtlcore.sgd_";
  check_sgd_options(o);
  std::vector<NamedList> lists = {{"params", params, true},
                                  {"grads", grads, grad_scale.has_value()}};
  if (o.momentum != 0.0) lists.push_back({"momentum_buffers", momentum_buffers, true});
  const c10::Device device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  check_tensor_lists(op, lists, device, dtypes);
  if (!params.empty()) {
    check_scaler_tensor(op, "grad_scale", grad_scale, device);
    check_scaler_tensor(op, "found_inf", found_inf, device);
  }
  return lists;
}

std::vector<NamedList> check_adam_args(at::TensorList params, at::TensorList grads,
                                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                       at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                       const AdamOptions& o,
                                       const std::optional<at::Tensor>& grad_scale,
                                       const std::optional<at::Tensor>& found_inf,
                                       const std::vector<at::ScalarType>& dtypes) {
  constexpr const char* op = "mtlcore.adam_";
  check_adam_options(o);
  std::vector<NamedList> lists = {{"params", params, true},
                                  {"grads", grads, grad_scale.has_value()},
                                  {"exp_avgs", exp_avgs, true},
                                  {"exp_avg_sqs", exp_avg_sqs, true}};
  if (o.amsgrad) lists.push_back({"max_exp_avg_sqs", max_exp_avg_sqs, true});
  const c10::Device device = params.empty() ? c10::Device(c10::kCPU) : params[0].device();
  check_tensor_lists(op, lists, device, dtypes);
  check_state_steps(op, state_steps, params.size(), device);
  if (!params.empty()) {
    check_scaler_tensor(op, "grad_scale", grad_scale, device);
    check_scaler_tensor(op, "found_inf", found_inf, device);
  }
  return lists;
}

DenseLists::DenseLists(const std::vector<NamedList>& lists) {
  const size_t n = lists.front().tensors.size();
  dense_.resize(lists.size());
  for (auto& d : dense_) d.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = lists.front().tensors[i];
    bool direct = p.is_non_overlapping_and_dense();
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.tensors[i];
      direct = direct && t.is_non_overlapping_and_dense() && t.strides() == p.strides();
    }
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l].tensors[i];
      if (direct) {
        dense_[l].push_back(t);
      } else {
        at::Tensor c = t.contiguous();
        if (lists[l].mutated && !c.is_same(t)) pending_.emplace_back(t, c);
        dense_[l].push_back(std::move(c));
      }
    }
  }
}

void DenseLists::write_back() {
  for (auto& [dst, src] : pending_) dst.copy_(src);
  pending_.clear();
}

double scalar_value(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return static_cast<double>(*t.const_data_ptr<float>());
    case at::kDouble:
      return *t.const_data_ptr<double>();
    default:
      TORCH_CHECK(false, "mtlcore: unexpected scalar tensor dtype ", t.scalar_type());
  }
}

}  // namespace mtlcore
