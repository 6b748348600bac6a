// mtlcore.multitask_loss on the CPU: the driver of the loops in multitask_loss_kernels.cpp.
//
// Layout: every task is read through its TaskView (common/multitask_loss_args.h); gradients are
//   new contiguous tensors in the logits' dtype.
// Parallel split: each task is cut into work items of about kItemElements logits (ce rows
//   whole, dense ce by pixel ranges, bce/mse/l1 by rows or by element ranges of long rows);
//   the items of all tasks form one list that the threads of one parallel region take from a
//   shared counter, the costliest items first (execution_order).
//   Items depend only on the shapes, so per-item sums added in list order give results that do
//   not depend on the thread count. Calls with few elements run on the calling thread.
// Numerics: per-element math in float (double for double logits), loss sums in double; the
//   coupling and the backward coefficients in double (tiny T-sized arrays). The forward writes
//   each gradient already times w_i / n_i (see grad_factor), which makes it final in the
//   common case: the in-place backward then leaves it untouched.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/cpu_isa.h"
#include "common/multitask_loss_args.h"
#include "cpu/dtype_index.h"
#include "cpu/multitask_loss_kernels.h"
#include "cpu/output_cache.h"
#include "cpu/parallel.h"

namespace mtlcore::cpu {

namespace {

constexpr int64_t kItemElements = 1 << 14;    // logits per work item (the ce block size)
constexpr int64_t kSerialElements = 1 << 14;  // below this, threads cost more than they save

const MultitaskLossLoops& loops() { MTLCORE_ISA_SELECT(multitask_loss_loops); }

struct WorkItem {
  size_t task;
  LossWork work;
};

// Cuts the tasks into items of about kItemElements logits. A position (a ce row, a dense ce
// pixel, an element) costs C logits for ce and one for the other kinds.
std::vector<WorkItem> plan_work(const std::vector<TaskView>& views) {
  std::vector<WorkItem> items;
  for (size_t i = 0; i < views.size(); ++i) {
    const TaskView& v = views[i];
    if (v.numel() == 0) continue;
    const bool ce = v.kind == LossKind::kCe;
    const int64_t positions = ce ? v.inner : v.classes;  // per item b
    const int64_t cost = ce ? v.classes : 1;             // logits per position
    // Positions per item: a multiple of 16 where there are more, so that items of dense
    // logits start on a cache line (when their planes do) and end on a whole vector.
    const int64_t per_item = kItemElements / cost;
    const int64_t chunk = per_item >= 16 ? per_item / 16 * 16 : std::max<int64_t>(1, per_item);
    if (positions <= chunk) {
      const int64_t rows = std::max<int64_t>(1, chunk / positions);
      for (int64_t b = 0; b < v.batch; b += rows) {
        items.push_back({i, {b, std::min(v.batch, b + rows), 0, positions}});
      }
    } else {
      for (int64_t b = 0; b < v.batch; ++b) {
        for (int64_t s = 0; s < positions; s += chunk) {
          items.push_back({i, {b, b + 1, s, std::min(positions, s + chunk)}});
        }
      }
    }
  }
  return items;
}

// The items in the order the threads take them: the costliest first (so that the last ones
// to start are short), by a rough model in units of a ce logit: bce's exp and log cost about
// as much per element, mse/l1 a fraction, and a ce position adds its log and bookkeeping.
// Only the order of execution changes: partials are still added in list order.
std::vector<int64_t> execution_order(const std::vector<WorkItem>& items,
                                     const std::vector<TaskView>& views) {
  std::vector<double> cost(items.size());
  for (size_t k = 0; k < items.size(); ++k) {
    const TaskView& v = views[items[k].task];
    const LossWork& w = items[k].work;
    const auto positions = static_cast<double>((w.b1 - w.b0) * (w.s1 - w.s0));
    switch (v.kind) {
      case LossKind::kCe:
        cost[k] = positions * (static_cast<double>(v.classes) + 8.0);
        break;
      case LossKind::kBce:
        cost[k] = positions * 1.2;
        break;
      default:
        cost[k] = positions * 0.15;
    }
  }
  std::vector<int64_t> order(items.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int64_t>(k);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return cost[static_cast<size_t>(a)] > cost[static_cast<size_t>(b)];
  });
  return order;
}

// A small CPU tensor ([], [T] or [T, T]) as doubles; an empty vector for none.
std::vector<double> to_doubles(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return {};
  const at::Tensor c =
      t->is_contiguous() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble)
          ? *t
          : t->to(at::kDouble).contiguous();
  const int64_t n = c.numel();
  if (c.scalar_type() == at::kFloat) {
    const float* p = c.const_data_ptr<float>();
    return std::vector<double>(p, p + n);
  }
  const double* p = c.const_data_ptr<double>();
  return std::vector<double>(p, p + n);
}

at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape,
                        const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (t.scalar_type() == at::kDouble) {
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
  } else {
    std::transform(v.begin(), v.end(), t.data_ptr<float>(),
                   [](double x) { return static_cast<float>(x); });
  }
  return t;
}

const double* or_null(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

// Positions of a task: its count of valid labels when none is missing.
int64_t positions(const TaskView& v) {
  return v.kind == LossKind::kCe ? v.batch * v.inner : v.numel();
}

// The factor f_i the forward writes task i's gradient times: w_i / n_i (n_i its positions), so
// that grads[i] already is d total / d logits[i] when every label is present, the gradient into
// total is 1 and there is no relation: backward's coefficient is then exactly 1 and the
// in-place backward skips the task (no pass over its gradient). 1 where that could cost
// precision: half logits (w / n would put the gradient in fp16's subnormals, and a later
// coefficient would scale up their rounding; but 1/2 for mse, whose 2 (x - y) would overflow
// fp16 from |x - y| > 32752 on: halving is exact), w_i zero or not finite, |w_i / n_i|
// outside [2^-30, 1] (no gradient overflows or falls far below its unscaled size).
double grad_factor(const TaskView& v, double w, at::ScalarType dtype) {
  const int64_t n = positions(v);
  if (n == 0) return 1.0;
  if (dtype == at::kHalf) return v.kind == LossKind::kMse ? 0.5 : 1.0;
  const double f = w / static_cast<double>(n);
  const double a = std::abs(f);
  return std::isfinite(f) && a >= 0x1p-30 && a <= 1.0 ? f : 1.0;
}

struct ForwardResult {
  at::Tensor total, per_task, grad_scale;
  std::vector<at::Tensor> grads;
};

ForwardResult forward(const char* op, at::TensorList logits, at::TensorList targets,
                      const std::vector<std::string>& kinds,
                      const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& relation, int64_t ignore_index,
                      double label_smoothing, bool with_grad) {
  const MultitaskLossProblem p = check_multitask_loss_args(
      op, logits, targets, kinds, weights, relation, ignore_index, label_smoothing,
      {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  ForwardResult r;
  if (with_grad) r.grads = p.new_grads(logits);
  std::vector<TaskView> views = p.views(r.grads);
  const std::vector<double> w = to_doubles(p.weights);
  const auto weight = [&](size_t i) { return w.empty() ? 1.0 : w[i]; };
  if (with_grad) {
    for (size_t i = 0; i < views.size(); ++i) {
      views[i].grad_factor = grad_factor(views[i], weight(i), p.dtype);
    }
  }
  const std::vector<WorkItem> items = plan_work(views);
  std::vector<LossPartial> partials(items.size());

  const MultitaskLossLoops& table = loops();
  const int di = dtype_index(p.dtype, "mtlcore.multitask_loss");
  const LossOptions options{ignore_index, label_smoothing};
  const auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const WorkItem& it = items[static_cast<size_t>(k)];
      const TaskView& v = views[it.task];
      partials[static_cast<size_t>(k)] =
          table.loss[static_cast<int>(v.kind)][di][v.target_is_float32 ? 1 : 0](v, it.work,
                                                                                options);
    }
  };
  int64_t elements = 0;
  for (const auto& v : views) elements += v.numel();
  const auto n = static_cast<int64_t>(items.size());
  if (elements < kSerialElements) {
    run(0, n);
  } else {
    // Items differ in cost (bce's exp and log, ce's classes), so the threads take them one at a
    // time from a shared counter, costliest first, rather than in fixed halves. Each item
    // writes its own partial: the results do not depend on which thread ran it.
    const std::vector<int64_t> order = execution_order(items, views);
    for_each_job(n, [&](int64_t k) {
      run(order[static_cast<size_t>(k)], order[static_cast<size_t>(k)] + 1);
    });
  }

  const size_t t = p.num_tasks();
  std::vector<double> sum(t, 0.0), loss(t, 0.0), grad_scale(t, 0.0);
  std::vector<int64_t> count(t, 0);
  for (size_t k = 0; k < items.size(); ++k) {
    const LossPartial& part = partials[k];
    const size_t i = items[k].task;
    TORCH_CHECK_VALUE(!part.bad_label, op, ": targets[", i, "] holds the label ", part.label,
                      " at flat position ", part.position, ", outside [0, ", views[i].classes,
                      ") for logits[", i, "] of shape ", logits[i].sizes(),
                      " (and not ignore_index=", ignore_index, ")");
    sum[i] += part.sum;
    count[i] += part.count;
  }
  for (size_t i = 0; i < t; ++i) {
    if (count[i] > 0) {
      const double n = static_cast<double>(count[i]);
      loss[i] = sum[i] / n;
      // grads[i] / grad_scale[i] = d L_i / d logits[i]: count * f_i, which is w_i itself when
      // no label is missing and f_i = w_i / n_i, so that backward's coefficient is exactly 1.
      const double f = views[i].grad_factor;
      const auto all = static_cast<double>(positions(views[i]));
      grad_scale[i] = count[i] == positions(views[i]) && f == weight(i) / all ? weight(i) : n * f;
    }
  }
  const std::vector<double> rel = to_doubles(p.relation);
  const double total =
      coupled_total(static_cast<int64_t>(t), loss.data(), or_null(w), or_null(rel));
  const auto options_out = logits[0].options().dtype(p.loss_dtype);
  const auto nt = static_cast<int64_t>(t);
  r.per_task = from_doubles(loss, {nt}, options_out);
  r.total = from_doubles({total}, {}, options_out);
  if (with_grad) r.grad_scale = from_doubles(grad_scale, {nt}, options_out);
  return r;
}

std::tuple<at::Tensor, at::Tensor> multitask_loss_cpu(at::TensorList logits, at::TensorList targets,
                                                      const std::vector<std::string>& kinds,
                                                      const std::optional<at::Tensor>& weights,
                                                      const std::optional<at::Tensor>& relation,
                                                      int64_t ignore_index,
                                                      double label_smoothing) {
  ForwardResult r = forward("mtlcore.multitask_loss", logits, targets, kinds, weights, relation,
                            ignore_index, label_smoothing, false);
  return {r.total, r.per_task};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>
multitask_loss_with_grad_cpu(at::TensorList logits, at::TensorList targets,
                             const std::vector<std::string>& kinds,
                             const std::optional<at::Tensor>& weights,
                             const std::optional<at::Tensor>& relation, int64_t ignore_index,
                             double label_smoothing) {
  ForwardResult r = forward("mtlcore.multitask_loss_with_grad", logits, targets, kinds, weights,
                            relation, ignore_index, label_smoothing, true);
  return {r.total, r.per_task, r.grad_scale, r.grads};
}

// Whether the scaling loop's multiplication by coef is the identity: coef rounds to 1 in its
// math type (float, double for double).
bool is_identity(double coef, at::ScalarType dtype) {
  return dtype == at::kDouble ? coef == 1.0 : static_cast<float>(coef) == 1.0f;
}

// out[i] = coef_i * grads[i] (out[i] may be grads[i]: the scaling is element-wise), in chunks
// of kItemElements over all tasks, one parallel region. A task scaled in place by a
// coefficient of 1 is left as it is.
void scale_grads(at::TensorList grads, const std::vector<at::Tensor>& out,
                 const std::vector<double>& coef) {
  std::vector<std::array<int64_t, 3>> chunks;  // task, begin, end
  int64_t elements = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (out[i].is_same(grads[i]) && is_identity(coef[i], grads[i].scalar_type())) continue;
    const int64_t n = grads[i].numel();
    for (int64_t b = 0; b < n; b += kItemElements) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kItemElements)});
    }
    elements += n;
  }
  const MultitaskLossLoops& table = loops();
  const auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const auto [i, b, e] = chunks[static_cast<size_t>(k)];
      const at::Tensor& g = grads[static_cast<size_t>(i)];
      const int64_t bytes = g.element_size() * b;
      table.scale[dtype_index(g.scalar_type(), "mtlcore.multitask_loss_backward")](
          static_cast<const char*>(g.const_data_ptr()) + bytes,
          static_cast<char*>(out[static_cast<size_t>(i)].data_ptr()) + bytes, e - b,
          coef[static_cast<size_t>(i)]);
    }
  };
  const auto n = static_cast<int64_t>(chunks.size());
  if (elements < kSerialElements) {
    run(0, n);
  } else {
    at::parallel_for(0, n, 1, run);
  }
}

// coef_i of every task (see coupled_coefficients).
std::vector<double> coefficients(const std::optional<at::Tensor>& grad_total,
                                 const std::optional<at::Tensor>& grad_per_task,
                                 const std::vector<double>& loss, const at::Tensor& grad_scale,
                                 const std::optional<at::Tensor>& weights,
                                 const std::optional<at::Tensor>& relation) {
  const std::vector<double> g_total = to_doubles(grad_total);
  const std::vector<double> scale = to_doubles(grad_scale);
  const std::vector<double> g_pt = to_doubles(grad_per_task);
  const std::vector<double> w = to_doubles(weights);
  const std::vector<double> rel = to_doubles(relation);
  std::vector<double> coef(loss.size());
  coupled_coefficients(static_cast<int64_t>(loss.size()), loss.data(), or_null(w), or_null(rel),
                       g_total.empty() ? 0.0 : g_total[0], or_null(g_pt), scale.data(),
                       coef.data());
  return coef;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multitask_loss_backward_cpu(
    const std::optional<at::Tensor>& grad_total, const std::optional<at::Tensor>& grad_per_task,
    const at::Tensor& per_task, const at::Tensor& grad_scale, at::TensorList grads,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    std::array<bool, 3> output_mask) {
  check_multitask_loss_backward_args("mtlcore.multitask_loss_backward", grad_total, grad_per_task,
                                     per_task, grad_scale, grads, weights, relation);
  const int64_t t = per_task.size(0);
  const std::vector<double> loss = to_doubles(per_task);
  const std::vector<double> g_total_v = to_doubles(grad_total);
  const double g_total = g_total_v.empty() ? 0.0 : g_total_v[0];
  const auto options = per_task.options();

  std::vector<at::Tensor> grad_logits;
  for (const auto& g : grads) {
    grad_logits.push_back(output_mask[0] ? empty_output(g.sizes(), g.options())
                                         : at::empty({0}, g.options()));
  }
  if (output_mask[0]) {
    scale_grads(grads, grad_logits,
                coefficients(grad_total, grad_per_task, loss, grad_scale, weights, relation));
  }
  at::Tensor grad_weights = at::empty({0}, options);
  at::Tensor grad_relation = at::empty({0}, options);
  if (output_mask[1]) {
    std::vector<double> gw(loss.size());
    for (size_t i = 0; i < loss.size(); ++i) gw[i] = g_total * loss[i];
    grad_weights = from_doubles(gw, {t}, options);
  }
  if (output_mask[2]) {
    std::vector<double> gr(static_cast<size_t>(t * t));
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t j = 0; j < t; ++j) {
        gr[static_cast<size_t>(i * t + j)] =
            g_total * loss[static_cast<size_t>(i)] * loss[static_cast<size_t>(j)];
      }
    }
    grad_relation = from_doubles(gr, {t, t}, options);
  }
  return {grad_logits, grad_weights, grad_relation};
}

void multitask_loss_backward_inplace_cpu(const std::optional<at::Tensor>& grad_total,
                                         const std::optional<at::Tensor>& grad_per_task,
                                         const at::Tensor& per_task, const at::Tensor& grad_scale,
                                         at::TensorList grads,
                                         const std::optional<at::Tensor>& weights,
                                         const std::optional<at::Tensor>& relation) {
  check_multitask_loss_backward_args("mtlcore.multitask_loss_backward_", grad_total, grad_per_task,
                                     per_task, grad_scale, grads, weights, relation);
  scale_grads(
      grads, std::vector<at::Tensor>(grads.begin(), grads.end()),
      coefficients(grad_total, grad_per_task, to_doubles(per_task), grad_scale, weights, relation));
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlcore, CPU, m) {
  m.impl("multitask_loss", &multitask_loss_cpu);
  m.impl("multitask_loss_with_grad", &multitask_loss_with_grad_cpu);
  m.impl("multitask_loss_backward", &multitask_loss_backward_cpu);
  m.impl("multitask_loss_backward_", &multitask_loss_backward_inplace_cpu);
}

}  // namespace mtlcore::cpu
