// Host run of mtlcore.multitask_loss's CUDA kernel code (built by tests/test_cuda_host.py with
// g++, against the CUDA toolkit's and torch's headers): the kernels of
// csrc/cuda/multitask_loss_kernels.cuh, unmodified, through the block emulator of
// tests/host/cuda_emu.h (every block as 256 threads with barriers and warp shuffles), on the work
// lists the header's plan_work cuts, launched as multitask_loss.cu launches them: the forward
// (every work mode: a thread per ce position, dense or row; a warp or the whole block per ce
// row; bce/mse/l1 elements), the finalize kernel, the backward's scaling (vector and scalar
// paths, in place and not) and the coupling gradients. Against a float64 reference written
// from the formulas (F.cross_entropy with label smoothing and ignore_index, NaN = missing).
//
// Inputs are read through row-strided views whose gaps hold poison (NaN logits, out-of-range
// labels, huge targets) that must never be read, and gradients are pre-filled with a sentinel
// that must never survive. Problems: every mode over several work items, a single class, an
// empty task, an all-missing task, masked (-inf) classes, an ignore_index inside [0, C),
// out-of-range labels (they must trip the device assertion, add nothing and get a zero
// gradient), float, double, half and bfloat16 logits (float32 or own-dtype targets), a
// loss-only call, a task of more work items than a block has threads, and 300 tasks. Loss sums
// are taken in a different order than the reference, so values compare within a tolerance of
// the math type; counts, grad_scale and the coupling gradients exactly.
//
// Prints a line per problem and "multitask_loss host: ok"; exits 1 when a check fails. With the
// argument "quick", skips the task of 262 work items.
#include "cuda_emu.h"
// The emulator first: the kernel header below uses what it defines.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/multitask_loss_kernels.cuh"

namespace {

using namespace mtlcore;        // NOLINT(google-build-using-namespace)
using namespace mtlcore::cuda;  // NOLINT(google-build-using-namespace)

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

struct TaskSpec {
  LossKind kind;
  int64_t batch, classes, inner;  // B, C, S (S > 1: dense ce)
  int64_t logits_gap = 0;         // extra elements between items of the logits (a strided view)
  int64_t target_gap = 0;         // and of the targets
  double missing = 0.0;           // share of ignored ce labels / NaN targets
  double bad = 0.0;               // share of ce labels out of [0, C)
  bool masked = false;            // ce: some non-target classes at -inf
  bool target_f32 = false;        // bce/mse/l1 with half/bfloat16 logits: float32 targets
};

struct Problem {
  std::string name;
  std::vector<TaskSpec> tasks;
  int64_t ignore_index = -100;
  double smoothing = 0.0;
  bool with_grad = true;
  bool weights = false, relation = false, grad_per_task = false;
};

// A task's host buffers and its float64 reference.
template <class scalar_t>
struct TaskData {
  std::vector<scalar_t> logits;
  std::vector<int64_t> labels;
  std::vector<scalar_t> targets;
  std::vector<float> targets_f32;
  std::vector<scalar_t> grad;
  double loss_sum = 0.0;
  int64_t count = 0;
  int64_t bad_labels = 0;
  std::vector<double> ref_grad;  // unscaled, mse's without its factor 2
};

template <class T>
double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
double to_double(double v) { return v; }

// Relative tolerance of a value computed in the math type and stored in scalar_t.
template <class scalar_t>
double tolerance() {
  if constexpr (std::is_same_v<scalar_t, double>) return 1e-12;
  if constexpr (std::is_same_v<scalar_t, float>) return 2e-5;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return 1e-3;
  return 8e-3;  // bfloat16
}

bool close(double got, double want, double rel, double abs) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= rel * std::fabs(want) + abs;
}

int failures = 0;

void fail(const std::string& problem, const std::string& what) {
  if (++failures <= 20) std::printf("FAIL %s: %s\n", problem.c_str(), what.c_str());
}

// Fills task i's inputs and its reference; views[i] gets the pointers.
template <class scalar_t>
void make_task(const Problem& pr, const TaskSpec& ts, std::mt19937_64& rng, TaskData<scalar_t>& d,
               TaskView& view) {
  std::uniform_real_distribution<double> uniform(-4.0, 4.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const int64_t B = ts.batch, C = ts.classes, S = ts.inner;
  const bool ce = ts.kind == LossKind::kCe;
  const int64_t item = C * S;  // elements of one item
  const int64_t logits_stride = item + ts.logits_gap;
  const int64_t target_stride = (ce ? S : C) + ts.target_gap;
  view.target_is_float32 = false;
  d.logits.assign(static_cast<size_t>(B * logits_stride), static_cast<scalar_t>(kNaN));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < item; ++e) {
      d.logits[b * logits_stride + e] = static_cast<scalar_t>(uniform(rng));
    }
  }
  const auto x = [&](int64_t b, int64_t e) { return to_double(d.logits[b * logits_stride + e]); };
  d.grad.assign(static_cast<size_t>(B * item), static_cast<scalar_t>(777.0));
  d.ref_grad.assign(static_cast<size_t>(B * item), 0.0);
  if (ce) {
    d.labels.assign(static_cast<size_t>(B * target_stride), C + 7);  // gaps: out of range
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        const double u = unit(rng);
        int64_t t = static_cast<int64_t>(rng() % static_cast<uint64_t>(C));
        if (u < ts.missing) {
          t = pr.ignore_index;
        } else if (u < ts.missing + ts.bad) {
          t = rng() % 2 == 0 ? C + static_cast<int64_t>(rng() % 3) : -1;
        }
        d.labels[b * target_stride + s] = t;
        if (ts.masked && C > 2 && t >= 0 && t < C) {  // one class other than the target masked
          const int64_t c = (t + 1) % C;
          d.logits[b * logits_stride + c * S + s] = static_cast<scalar_t>(-kInf);
        }
      }
    }
    const double eps = pr.smoothing;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = d.labels[b * target_stride + s];
        if (t == pr.ignore_index) continue;
        if (t < 0 || t >= C) {
          ++d.bad_labels;
          continue;
        }
        double m = -kInf, sum_x = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          m = std::max(m, x(b, c * S + s));
          sum_x += x(b, c * S + s);
        }
        double sum = 0.0;
        for (int64_t c = 0; c < C; ++c) sum += std::exp(x(b, c * S + s) - m);
        double loss = m + std::log(sum) - (1.0 - eps) * x(b, t * S + s);
        if (eps != 0.0) loss -= eps / static_cast<double>(C) * sum_x;
        d.loss_sum += loss;
        d.count += 1;
        for (int64_t c = 0; c < C; ++c) {
          double g = std::exp(x(b, c * S + s) - m) / sum - eps / static_cast<double>(C);
          if (c == t) g -= 1.0 - eps;
          d.ref_grad[b * item + c * S + s] = g;
        }
      }
    }
  } else {
    std::vector<double> y(static_cast<size_t>(B * C));
    const bool f32 = ts.target_f32 && !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
    d.targets.assign(static_cast<size_t>(B * target_stride), static_cast<scalar_t>(1e4));
    d.targets_f32.assign(static_cast<size_t>(B * target_stride), 1e4f);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < C; ++j) {
        double v = ts.kind == LossKind::kBce ? unit(rng) : uniform(rng);
        if (ts.kind == LossKind::kL1 && rng() % 16 == 0) v = x(b, j);  // d == 0: sign 0
        if (unit(rng) < ts.missing) v = kNaN;
        // What the kernel reads, in the targets' dtype.
        if (f32) {
          d.targets_f32[b * target_stride + j] = static_cast<float>(v);
          v = static_cast<double>(static_cast<float>(v));
        } else {
          d.targets[b * target_stride + j] = static_cast<scalar_t>(v);
          v = to_double(static_cast<scalar_t>(v));
        }
        y[b * C + j] = v;
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < C; ++j) {
        const double xv = x(b, j), yv = y[b * C + j];
        if (std::isnan(yv)) continue;
        double loss = 0.0, g = 0.0;
        if (ts.kind == LossKind::kBce) {
          loss = std::max(xv, 0.0) - xv * yv + std::log1p(std::exp(-std::fabs(xv)));
          g = 1.0 / (1.0 + std::exp(-xv)) - yv;
        } else if (ts.kind == LossKind::kMse) {
          loss = (xv - yv) * (xv - yv);
          g = xv - yv;
        } else {
          loss = std::fabs(xv - yv);
          g = xv > yv ? 1.0 : xv < yv ? -1.0 : 0.0;
        }
        d.loss_sum += loss;
        d.count += 1;
        d.ref_grad[b * C + j] = g;
      }
    }
    view.target_is_float32 = f32;
    view.target = f32 ? static_cast<const void*>(d.targets_f32.data())
                      : static_cast<const void*>(d.targets.data());
  }
  view.kind = ts.kind;
  view.batch = B;
  view.classes = C;
  view.inner = S;
  view.logits_stride = logits_stride;
  view.target_stride = target_stride;
  view.logits = d.logits.data();
  if (ce) view.target = d.labels.data();
  view.grad = pr.with_grad ? d.grad.data() : nullptr;
}

template <class scalar_t>
void run_problem(const Problem& pr, std::mt19937_64& rng) {
  using Acc = at::opmath_type<scalar_t>;
  using LossT = Acc;
  const double rel = tolerance<scalar_t>();
  const double abs = std::is_same_v<scalar_t, double> ? 1e-14 : 1e-6;
  const int64_t T = static_cast<int64_t>(pr.tasks.size());
  std::vector<TaskData<scalar_t>> data(pr.tasks.size());
  std::vector<TaskView> views(pr.tasks.size());
  for (int64_t i = 0; i < T; ++i) make_task(pr, pr.tasks[i], rng, data[i], views[i]);
  std::uniform_real_distribution<double> coupling_value(-0.5, 1.5);
  std::vector<LossT> weights, relation;
  for (int64_t i = 0; pr.weights && i < T; ++i) {
    weights.push_back(static_cast<LossT>(coupling_value(rng)));
  }
  for (int64_t k = 0; pr.relation && k < T * T; ++k) {
    relation.push_back(static_cast<LossT>(coupling_value(rng) * 0.2));
  }
  const LossT* w = pr.weights ? weights.data() : nullptr;
  const LossT* r = pr.relation ? relation.data() : nullptr;

  // Forward, as multitask_loss_forward_cuda launches it.
  const WorkList list = plan_work(views);
  const auto num_work = static_cast<int64_t>(list.work.size());
  std::vector<double> partial_loss(static_cast<size_t>(num_work));
  std::vector<int64_t> partial_count(static_cast<size_t>(num_work));
  std::vector<double> task_loss(static_cast<size_t>(T));
  std::vector<LossT> per_task(static_cast<size_t>(T)), grad_scale(static_cast<size_t>(T));
  LossT total{};
  const auto smoothing = static_cast<Acc>(pr.smoothing);
  const CeParams<Acc> ce{pr.ignore_index, smoothing, Acc(1) - smoothing};
  const int64_t asserts_before = emu::device_asserts.load();
  if (num_work > 0) {
    emu::launch(dim3(static_cast<unsigned>(num_work)), kThreads, multitask_loss_kernel<scalar_t>,
                static_cast<const TaskView*>(views.data()),
                static_cast<const WorkItem*>(list.work.data()), ce, partial_loss.data(),
                partial_count.data());
  }
  emu::launch(dim3(1), kThreads, finalize_kernel<LossT>,
              static_cast<const int64_t*>(list.first_item.data()),
              static_cast<const double*>(partial_loss.data()),
              static_cast<const int64_t*>(partial_count.data()), T, w, r,
              static_cast<const TaskView*>(views.data()), task_loss.data(), per_task.data(),
              grad_scale.data(), &total);
  const int64_t asserts = emu::device_asserts.load() - asserts_before;

  // The work list covers every unit of every task once, task by task.
  int64_t bad_labels = 0;
  std::vector<double> ref_loss(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) {
    const TaskData<scalar_t>& d = data[i];
    const TaskPlan plan = plan_task(views[i]);
    int64_t next = 0;
    for (int64_t k = list.first_item[i]; k < list.first_item[i + 1]; ++k) {
      const WorkItem& it = list.work[k];
      if (it.task != i || it.mode != plan.mode || it.begin != next || it.end <= it.begin) {
        fail(pr.name, "work list of task " + std::to_string(i));
      }
      next = it.end;
    }
    if (next != plan.units) fail(pr.name, "work list of task " + std::to_string(i) + " short");
    bad_labels += d.bad_labels;
    ref_loss[i] = d.count > 0 ? d.loss_sum / static_cast<double>(d.count) : 0.0;
    const std::string task = "task " + std::to_string(i);
    if (!close(static_cast<double>(per_task[i]), ref_loss[i], rel < 1e-6 ? rel : 2e-5, abs)) {
      fail(pr.name, task + " loss " + std::to_string(static_cast<double>(per_task[i])) + " want " +
                        std::to_string(ref_loss[i]));
    }
    const double want_scale = pr.tasks[i].kind == LossKind::kMse ? static_cast<double>(d.count) / 2
                                                                 : static_cast<double>(d.count);
    if (static_cast<double>(grad_scale[i]) != static_cast<LossT>(want_scale)) {
      fail(pr.name, task + " grad_scale " + std::to_string(static_cast<double>(grad_scale[i])));
    }
    if (!pr.with_grad) continue;
    for (size_t e = 0; e < d.grad.size(); ++e) {
      const double got = to_double(d.grad[e]);
      if (!close(got, d.ref_grad[e], rel, abs)) {
        fail(pr.name, task + " grad[" + std::to_string(e) + "] " + std::to_string(got) + " want " +
                          std::to_string(d.ref_grad[e]));
        break;
      }
    }
  }
  if ((asserts > 0) != (bad_labels > 0)) {
    fail(pr.name, std::to_string(asserts) + " device assertions for " + std::to_string(bad_labels) +
                      " labels out of range");
  }
  double ref_total = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    double coupled = pr.weights ? static_cast<double>(weights[i]) : 1.0;
    for (int64_t j = 0; pr.relation && j < T; ++j) {
      coupled += static_cast<double>(relation[i * T + j]) * ref_loss[j];
    }
    ref_total += coupled * ref_loss[i];
  }
  if (!close(static_cast<double>(total), ref_total, rel < 1e-6 ? rel : 2e-5, abs * T)) {
    fail(pr.name, "total " + std::to_string(static_cast<double>(total)) + " want " +
                      std::to_string(ref_total));
  }

  if (pr.with_grad) {
    // Backward, as scale_grads launches it: task i % 3 == 0 in place, 1 into an aligned
    // buffer, 2 into a buffer one element off (the scalar path).
    const LossT g_total = static_cast<LossT>(0.75);
    std::vector<LossT> g_per_task;
    for (int64_t i = 0; pr.grad_per_task && i < T; ++i) {
      g_per_task.push_back(static_cast<LossT>(coupling_value(rng)));
    }
    const CouplingArgs<LossT> coupling{T,
                                       per_task.data(),
                                       grad_scale.data(),
                                       &g_total,
                                       pr.grad_per_task ? g_per_task.data() : nullptr,
                                       w,
                                       r};
    std::vector<std::vector<scalar_t>> before(pr.tasks.size()), outs(pr.tasks.size());
    std::vector<ScaleTask> scale_tasks(pr.tasks.size(), ScaleTask{nullptr, nullptr, false});
    std::vector<ScaleWork> work;
    std::vector<scalar_t*> out_ptr(pr.tasks.size());
    for (int64_t i = 0; i < T; ++i) {
      std::vector<scalar_t>& g = data[i].grad;
      before[i] = g;
      if (g.empty()) continue;
      if (i % 3 == 0) {
        out_ptr[i] = g.data();
      } else {
        outs[i].assign(g.size() + 1, static_cast<scalar_t>(777.0));
        out_ptr[i] = outs[i].data() + (i % 3 == 2 ? 1 : 0);
      }
      scale_tasks[i] = scale_task(g.data(), out_ptr[i]);
      if (scale_tasks[i].vectorized != (i % 3 != 2)) fail(pr.name, "scale_task alignment");
      append_scale_work(i, static_cast<int64_t>(g.size()), work);
    }
    if (!work.empty()) {
      emu::launch(dim3(static_cast<unsigned>(work.size())), kThreads,
                  scale_grads_kernel<scalar_t, LossT>,
                  static_cast<const ScaleTask*>(scale_tasks.data()),
                  static_cast<const ScaleWork*>(work.data()), coupling);
    }
    for (int64_t i = 0; i < T; ++i) {
      double d_total = pr.weights ? static_cast<double>(weights[i]) : 1.0;
      for (int64_t j = 0; pr.relation && j < T; ++j) {
        d_total +=
            (static_cast<double>(relation[i * T + j]) + static_cast<double>(relation[j * T + i])) *
            static_cast<double>(per_task[j]);
      }
      const double g_i = pr.grad_per_task ? static_cast<double>(g_per_task[i]) : 0.0;
      const double den = static_cast<double>(grad_scale[i]);
      const auto coef = static_cast<Acc>(den != 0.0 ? (0.75 * d_total + g_i) / den : 0.0);
      for (size_t e = 0; e < before[i].size(); ++e) {
        const double want = to_double(static_cast<scalar_t>(coef * static_cast<Acc>(before[i][e])));
        const double got = to_double(out_ptr[i][e]);
        if (!close(got, want, rel, abs)) {
          fail(pr.name, "scaled grad of task " + std::to_string(i) + "[" + std::to_string(e) +
                            "] " + std::to_string(got) + " want " + std::to_string(want));
          break;
        }
      }
    }
    // The coupling gradients, exactly as the kernel rounds them.
    std::vector<LossT> grad_w(static_cast<size_t>(T)), grad_r(static_cast<size_t>(T * T));
    emu::launch(dim3(1), kThreads, coupling_grads_kernel<LossT>, T,
                static_cast<const LossT*>(&g_total), static_cast<const LossT*>(per_task.data()),
                grad_w.data(), grad_r.data());
    const double g = static_cast<double>(g_total);
    for (int64_t i = 0; i < T; ++i) {
      const double li = static_cast<double>(per_task[i]);
      if (grad_w[i] != static_cast<LossT>(g * li)) fail(pr.name, "grad_weights");
      for (int64_t j = 0; j < T; ++j) {
        if (grad_r[i * T + j] != static_cast<LossT>(g * li * static_cast<double>(per_task[j]))) {
          fail(pr.name, "grad_relation");
          i = j = T;
        }
      }
    }
  }
  std::printf("%s: %lld tasks, %lld work items, %lld device assertions\n", pr.name.c_str(),
              static_cast<long long>(T), static_cast<long long>(num_work),
              static_cast<long long>(asserts));
}

TaskSpec ce(int64_t b, int64_t c, int64_t s = 1) { return {LossKind::kCe, b, c, s}; }
TaskSpec elementwise(LossKind kind, int64_t b, int64_t c) { return {kind, b, c, 1}; }

template <class F>
TaskSpec with(TaskSpec t, F f) {
  f(t);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  // "quick" (the ThreadSanitizer run): without the task of 262 work items.
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::mt19937_64 rng(20261130);
  const auto missing = [](double m) { return [m](TaskSpec& t) { t.missing = m; }; };
  const auto gaps = [](int64_t l, int64_t t) {
    return [l, t](TaskSpec& s) {
      s.logits_gap = l;
      s.target_gap = t;
    };
  };
  const auto bad = [](TaskSpec& t) {
    t.bad = 0.05;
    t.missing = 0.1;
  };
  const auto masked = [](TaskSpec& t) { t.masked = true; };
  const auto f32 = [](TaskSpec& t) { t.target_f32 = true; };
  constexpr LossKind kBce = LossKind::kBce, kMse = LossKind::kMse, kL1 = LossKind::kL1;

  Problem modes{"every work mode, float"};
  modes.tasks = {
      with(ce(3, 5, 63), missing(0.2)),    // dense: a thread per position
      with(ce(2, 4, 9000), missing(0.1)),  // dense over 3 work items
      with(ce(600, 10), gaps(3, 1)),       // rows of <= 16 classes: a thread per row
      ce(50, 1),                           // one class
      with(ce(700, 100),
           [](TaskSpec& t) {  // a warp per row, 3 work items
             t.logits_gap = 5;
             t.missing = 0.1;
           }),
      ce(40, 1024),                    // the longest warp rows
      with(ce(25, 3000), gaps(7, 2)),  // the block per row, 3 work items
      ce(3, 1025),                     // the shortest block rows
      with(elementwise(kBce, 300, 40),
           [](TaskSpec& t) {  // a row-strided view
             t.logits_gap = 10;
             t.missing = 0.1;
           }),
      with(elementwise(kMse, 1, 70000), missing(0.05)),  // 3 work items
      with(elementwise(kL1, 37, 3),
           [](TaskSpec& t) {
             t.target_gap = 2;
             t.missing = 0.1;
           }),
      ce(0, 5),                       // empty
      with(ce(20, 7), missing(1.0)),  // every label missing
      with(elementwise(kMse, 9, 2), missing(1.0)),
  };
  modes.smoothing = 0.1;
  modes.weights = modes.relation = modes.grad_per_task = true;
  run_problem<float>(modes, rng);

  Problem labels{"masked classes, ignore_index 2, labels out of range, float"};
  labels.tasks = {with(ce(4, 6, 50), bad), with(ce(300, 8), masked),  with(ce(200, 40), bad),
                  with(ce(9, 2000), bad),  with(ce(100, 30), masked), with(ce(8, 1500), masked)};
  labels.ignore_index = 2;
  run_problem<float>(labels, rng);

  Problem mixed{"mixed, double"};
  mixed.tasks = {with(ce(3, 4, 40), missing(0.1)),
                 with(ce(64, 50), gaps(2, 0)),
                 ce(4, 2000),
                 with(elementwise(kBce, 20, 9), missing(0.1)),
                 with(elementwise(kMse, 33, 4), gaps(1, 3)),
                 elementwise(kL1, 5, 17)};
  mixed.smoothing = 0.05;
  mixed.weights = mixed.relation = true;
  run_problem<double>(mixed, rng);

  const std::vector<TaskSpec> low = {with(ce(2, 5, 300), missing(0.1)),
                                     with(ce(120, 300), gaps(4, 0)),
                                     ce(3, 1500),
                                     with(elementwise(kBce, 50, 40), f32),
                                     with(elementwise(kMse, 64, 3), missing(0.1)),
                                     with(elementwise(kL1, 10, 12), [](TaskSpec& t) {
                                       t.target_f32 = true;
                                       t.missing = 0.1;
                                     })};
  Problem half{"mixed, half (float32 and half targets)", low};
  half.smoothing = 0.1;
  half.relation = true;
  run_problem<c10::Half>(half, rng);
  Problem bf16{"mixed, bfloat16 (float32 and bfloat16 targets)", low};
  bf16.weights = bf16.grad_per_task = true;
  run_problem<c10::BFloat16>(bf16, rng);

  Problem loss_only{"loss only, float"};
  loss_only.tasks = {ce(5, 3, 20), ce(30, 200), elementwise(kMse, 4, 5)};
  loss_only.with_grad = false;
  loss_only.relation = true;
  run_problem<float>(loss_only, rng);

  Problem long_task{"a task of more than 256 work items, float"};
  long_task.tasks = {ce(3, 5), with(elementwise(kMse, 260, 32768), missing(0.01)), ce(2, 3, 7)};
  long_task.weights = true;
  if (!quick) run_problem<float>(long_task, rng);

  Problem many{"300 tasks, float"};
  for (int i = 0; i < 300; ++i) {
    many.tasks.push_back(i % 3 == 0 ? ce(2, 4) : elementwise(i % 3 == 1 ? kMse : kBce, 2, 3));
  }
  many.weights = many.relation = many.grad_per_task = true;
  run_problem<float>(many, rng);

  if (failures > 0) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("multitask_loss host: ok\n");
  return 0;
}
