// The device code of mtlcore::multitask_loss (csrc/cuda/multitask_loss.cu, whose header
// describes the layout, the parallel split and the numerics) and the host planning of its work
// lists: the work items and their modes, the element math, the shuffle-tree reductions, the
// forward, finalize, backward-scaling and coupling-gradient kernels, and how the tasks are cut
// into work items. Kept apart from the ATen host code so that tests/host/multitask_loss_host.cpp
// can run the unmodified kernels through the block emulator of tests/host/cuda_emu.h.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/multitask_loss_args.h"

// Host and device: the element math below can be exercised on the host.
#define MTLCORE_HD __host__ __device__ __forceinline__

namespace mtlcore::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
// Elements per work item: enough to amortise a block's start and its partial sum, few enough
// that a task of a million elements spreads over some thirty blocks.
constexpr int64_t kWorkElements = int64_t{1} << 15;
// ce rows up to this many classes are short enough for one thread each; up to
// kWarpRowMaxClasses a warp per row keeps every lane busy; longer rows take the whole block.
constexpr int64_t kThreadRowMaxClasses = 16;
constexpr int64_t kWarpRowMaxClasses = 1024;
constexpr int kVecBytes = 16;        // vector access width of the backward scaling
constexpr size_t kUploadAlign = 16;  // alignment of each array in the uploaded metadata

// ---------------------------------------------------------------------------------------
// Work lists
// ---------------------------------------------------------------------------------------

// How a forward work item's block walks its units.
enum class WorkMode : int32_t {
  kCePositions = 0,  // ce: a thread per position b * S + s; units are positions
  kCeWarpRows = 1,   // ce, S == 1: a warp per row; units are rows
  kCeBlockRows = 2,  // ce, S == 1: the block per row; units are rows
  kElementwise = 3,  // bce/mse/l1: units are elements b * C + j
};

struct WorkItem {
  int32_t task;
  WorkMode mode;
  int64_t begin;  // units [begin, end) of the task
  int64_t end;
};

// A backward work item: elements [begin, end) of task's gradient.
struct ScaleWork {
  int64_t task;
  int64_t begin;
  int64_t end;
};

// The gradient of one task as the backward scaling reads and writes it.
struct ScaleTask {
  const void* grad;  // contiguous, null when the task has no elements
  void* out;         // contiguous, like grad
  bool vectorized;   // both 16-byte aligned
};

// ---------------------------------------------------------------------------------------
// Element math (host and device, in the math type Acc)
// ---------------------------------------------------------------------------------------

MTLCORE_HD float math_exp(float v) { return ::expf(v); }
MTLCORE_HD double math_exp(double v) { return ::exp(v); }
MTLCORE_HD float math_log(float v) { return ::logf(v); }
MTLCORE_HD double math_log(double v) { return ::log(v); }
MTLCORE_HD float math_log1p(float v) { return ::log1pf(v); }
MTLCORE_HD double math_log1p(double v) { return ::log1p(v); }
MTLCORE_HD float math_abs(float v) { return ::fabsf(v); }
MTLCORE_HD double math_abs(double v) { return ::fabs(v); }

template <typename Acc>
struct CeParams {
  int64_t ignore_index;
  Acc smoothing;            // label_smoothing (eps)
  Acc one_minus_smoothing;  // 1 - eps
};

// Online softmax over the logits seen so far.
template <typename Acc>
struct SoftmaxState {
  Acc max;       // largest logit, -inf when none
  Acc sum;       // sum of exp(x - max), 0 when none
  double sum_x;  // sum of the logits (label smoothing), in double: see ce_loss
};

template <typename Acc>
MTLCORE_HD SoftmaxState<Acc> softmax_empty() {
  return {-std::numeric_limits<Acc>::infinity(), Acc(0), Acc(0)};
}

// Adds logit v. A logit equal to the max adds exp(0) = 1 without forming max - max, which is
// NaN for -inf (masked classes: a later finite logit must still give a finite result).
// A NaN logit compares false everywhere and makes the sum NaN; so does a +inf logit, as in
// F.cross_entropy (its log-sum-exp forms inf - inf): the row's loss and gradient are NaN.
// Once the sum is NaN, later logits and merges keep it NaN.
template <typename Acc>
MTLCORE_HD void softmax_add(SoftmaxState<Acc>& st, Acc v) {
  if (v > st.max) {
    st.sum = v == std::numeric_limits<Acc>::infinity() ? std::numeric_limits<Acc>::quiet_NaN()
                                                       : st.sum * math_exp(st.max - v) + Acc(1);
    st.max = v;
  } else if (v == st.max) {
    st.sum += Acc(1);
  } else {
    st.sum += math_exp(v - st.max);
  }
  st.sum_x += static_cast<double>(v);
}

// The state of the union of two disjoint sets of logits (either may be empty). Equal maxima
// are added without rescaling for the same reason as in softmax_add.
template <typename Acc>
MTLCORE_HD SoftmaxState<Acc> softmax_merge(const SoftmaxState<Acc>& a, const SoftmaxState<Acc>& b) {
  if (a.max == b.max) return {a.max, a.sum + b.sum, a.sum_x + b.sum_x};
  const SoftmaxState<Acc>& hi = a.max > b.max ? a : b;
  const SoftmaxState<Acc>& lo = a.max > b.max ? b : a;
  return {hi.max, hi.sum + lo.sum * math_exp(lo.max - hi.max), a.sum_x + b.sum_x};
}

// Loss of a counted ce position, lse - (1 - eps) x_t - (eps / C) sum_c x_c, written relative
// to the max as the CPU kernels do: log(sum) - (1 - eps) (x_t - max) - eps (mean_c x_c - max),
// which is exactly 0 for one class. The mean and its difference to the max are formed in
// double: logits far from 0 (all near 1e4, say) would otherwise lose the difference to
// cancellation. Without smoothing the last term is left out rather than multiplied by 0: the
// sum is -inf with masked classes.
template <typename Acc>
MTLCORE_HD Acc ce_loss(const SoftmaxState<Acc>& st, Acc target_logit, const CeParams<Acc>& p,
                       int64_t classes) {
  const Acc loss = math_log(st.sum) - p.one_minus_smoothing * (target_logit - st.max);
  if (p.smoothing == Acc(0)) return loss;
  const double mean_minus_max =
      st.sum_x / static_cast<double>(classes) - static_cast<double>(st.max);
  return static_cast<Acc>(static_cast<double>(loss) -
                          static_cast<double>(p.smoothing) * mean_minus_max);
}

// Unscaled gradient of a counted ce position at class c with logit v:
// softmax_c - eps / C - (c == t ? 1 - eps : 0), softmax_c = exp(v - max) * inv_sum with
// inv_sum = 1 / sum (one division per position, as the CPU kernels).
template <typename Acc>
MTLCORE_HD Acc ce_grad(Acc v, bool is_target, const SoftmaxState<Acc>& st, Acc inv_sum,
                       const CeParams<Acc>& p, Acc smoothing_per_class) {
  const Acc g = math_exp(v - st.max) * inv_sum - smoothing_per_class;
  return is_target ? g - p.one_minus_smoothing : g;
}

// Loss of one bce/mse/l1 element with a present target y; *grad receives d loss / d x.
template <LossKind K, typename Acc>
MTLCORE_HD Acc elementwise_loss(Acc x, Acc y, Acc* grad) {
  if constexpr (K == LossKind::kBce) {
    // log(1 + exp(-|x|)) and the sigmoid from the same exp(-|x|) <= 1: no overflow.
    const Acc e = math_exp(-math_abs(x));
    const Acc sigmoid = x >= Acc(0) ? Acc(1) / (Acc(1) + e) : e / (Acc(1) + e);
    *grad = sigmoid - y;
    // An infinite x gives what F.binary_cross_entropy_with_logits gives: (1 - y) x for +inf,
    // NaN for -inf.
    if (math_abs(x) == std::numeric_limits<Acc>::infinity()) {
      return x > Acc(0) ? (Acc(1) - y) * x : std::numeric_limits<Acc>::quiet_NaN();
    }
    return (x > Acc(0) ? x : Acc(0)) - x * y + math_log1p(e);
  } else if constexpr (K == LossKind::kMse) {
    // d loss / d x = 2 d: the factor 2 goes into the task's grad_scale (count / 2) instead,
    // so a half-precision gradient overflows only where d itself does, not from |d| > 32752.
    const Acc d = x - y;
    *grad = d;
    return d * d;
  } else {
    static_assert(K == LossKind::kL1);
    const Acc d = x - y;
    // sign(d): 0 at d == 0, NaN (d itself) for NaN d, like torch.sign.
    *grad = d > Acc(0) ? Acc(1) : d < Acc(0) ? Acc(-1) : d == Acc(0) ? Acc(0) : d;
    return math_abs(d);
  }
}

// ---------------------------------------------------------------------------------------
// Reductions: fixed shuffle trees, then the warps' results in warp order.
// ---------------------------------------------------------------------------------------

// A block's (or a task's) loss sum and count of valid positions.
struct LossSum {
  double loss;
  int64_t count;
};

MTLCORE_HD LossSum add_loss_sums(const LossSum& a, const LossSum& b) {
  return {a.loss + b.loss, a.count + b.count};
}

// shuffle(v, f) applies the shuffle f to every field of v.
template <typename F>
__device__ __forceinline__ double shuffle(double v, F f) {
  return f(v);
}
template <typename F>
__device__ __forceinline__ LossSum shuffle(const LossSum& v, F f) {
  return {f(v.loss), f(v.count)};
}
template <typename Acc, typename F>
__device__ __forceinline__ SoftmaxState<Acc> shuffle(const SoftmaxState<Acc>& v, F f) {
  return {f(v.max), f(v.sum), f(v.sum_x)};
}

// Merges v over the warp; the result is valid in lane 0.
template <typename V, typename Merge>
__device__ __forceinline__ V warp_reduce(V v, Merge merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = merge(v, shuffle(v, [offset](auto x) { return __shfl_down_sync(kFullMask, x, offset); }));
  }
  return v;
}

// Merges v over the warp; every lane gets lane 0's result (a broadcast rather than a butterfly,
// so the lanes agree bit for bit whatever the compiler contracts into FMAs).
template <typename V, typename Merge>
__device__ __forceinline__ V warp_allreduce(V v, Merge merge) {
  v = warp_reduce(v, merge);
  return shuffle(v, [](auto x) { return __shfl_sync(kFullMask, x, 0); });
}

// Merges v over the block; every thread gets the result. All threads of the block must call it.
template <typename V, typename Merge>
__device__ __forceinline__ V block_allreduce(V v, Merge merge) {
  __shared__ V warp_results[kWarps];
  __shared__ V result;
  v = warp_reduce(v, merge);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_results[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    V r = warp_results[0];
    for (int w = 1; w < kWarps; ++w) r = merge(r, warp_results[w]);
    result = r;
  }
  __syncthreads();
  const V r = result;
  __syncthreads();  // the next call may overwrite the shared slots
  return r;
}

__device__ __forceinline__ double block_allreduce_sum(double v) {
  return block_allreduce(v, [](double a, double b) { return a + b; });
}

// ---------------------------------------------------------------------------------------
// Forward: one block per work item
// ---------------------------------------------------------------------------------------

// Whether a ce position with label t is counted: not when t is ignore_index, nor when t is out
// of [0, C), which sets bad_label (the kernel asserts on it once the block is done: an assertion
// call inside the loops would make the compiler spill their registers around it).
__device__ __forceinline__ bool ce_label_counted(int64_t t, int64_t classes, int64_t ignore_index,
                                                 bool& bad_label) {
  if (t == ignore_index) return false;
  const bool in_range = t >= 0 && t < classes;
  bad_label = bad_label || !in_range;
  return in_range;
}

// ce, a thread per position b * S + s: class c of the position at x[c * S].
template <typename scalar_t, typename Acc>
__device__ void ce_positions(const TaskView& tv, const WorkItem& w, const CeParams<Acc>& p,
                             LossSum& acc, bool& bad_label) {
  const auto* logits = static_cast<const scalar_t*>(tv.logits);
  const auto* target = static_cast<const int64_t*>(tv.target);
  auto* grad = static_cast<scalar_t*>(tv.grad);
  const int64_t classes = tv.classes;
  const int64_t inner = tv.inner;
  const Acc smoothing_per_class = p.smoothing / static_cast<Acc>(classes);
  for (int64_t pos = w.begin + threadIdx.x; pos < w.end; pos += kThreads) {
    const int64_t b = inner == 1 ? pos : pos / inner;  // rows need no division
    const int64_t s = pos - b * inner;
    const scalar_t* x = logits + b * tv.logits_stride + s;
    scalar_t* g = grad != nullptr ? grad + b * classes * inner + s : nullptr;
    const int64_t t = target[b * tv.target_stride + s];
    if (!ce_label_counted(t, classes, p.ignore_index, bad_label)) {
      if (g != nullptr) {
        for (int64_t c = 0; c < classes; ++c) g[c * inner] = static_cast<scalar_t>(0);
      }
      continue;
    }
    SoftmaxState<Acc> st = softmax_empty<Acc>();
    Acc target_logit = Acc(0);
    for (int64_t c = 0; c < classes; ++c) {
      const Acc v = static_cast<Acc>(x[c * inner]);
      softmax_add(st, v);
      if (c == t) target_logit = v;
    }
    acc.loss += static_cast<double>(ce_loss(st, target_logit, p, classes));
    acc.count += 1;
    if (g != nullptr) {
      const Acc inv_sum = Acc(1) / st.sum;
      for (int64_t c = 0; c < classes; ++c) {
        const Acc v = static_cast<Acc>(x[c * inner]);
        g[c * inner] =
            static_cast<scalar_t>(ce_grad(v, c == t, st, inv_sum, p, smoothing_per_class));
      }
    }
  }
}

// ce with S == 1, a row [C] per warp (kBlockPerRow false) or per block. The row index and the
// label are uniform over the group, so every lane takes the same branches and reductions.
template <typename scalar_t, bool kBlockPerRow, typename Acc>
__device__ void ce_rows(const TaskView& tv, const WorkItem& w, const CeParams<Acc>& p, LossSum& acc,
                        bool& bad_label) {
  constexpr int kGroup = kBlockPerRow ? kThreads : kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kGroup;
  const int64_t first_row = kBlockPerRow ? 0 : threadIdx.x / kWarpSize;
  constexpr int64_t kRowStep = kBlockPerRow ? 1 : kWarps;
  const auto* logits = static_cast<const scalar_t*>(tv.logits);
  const auto* target = static_cast<const int64_t*>(tv.target);
  auto* grad = static_cast<scalar_t*>(tv.grad);
  const int64_t classes = tv.classes;
  const Acc smoothing_per_class = p.smoothing / static_cast<Acc>(classes);
  const auto merge = [](const SoftmaxState<Acc>& a, const SoftmaxState<Acc>& b) {
    return softmax_merge(a, b);
  };
  for (int64_t row = w.begin + first_row; row < w.end; row += kRowStep) {
    const scalar_t* x = logits + row * tv.logits_stride;
    scalar_t* g = grad != nullptr ? grad + row * classes : nullptr;
    const int64_t t = target[row * tv.target_stride];
    if (!ce_label_counted(t, classes, p.ignore_index, bad_label)) {
      if (g != nullptr) {
        for (int64_t c = lane; c < classes; c += kGroup) g[c] = static_cast<scalar_t>(0);
      }
      continue;
    }
    SoftmaxState<Acc> st = softmax_empty<Acc>();
    for (int64_t c = lane; c < classes; c += kGroup) softmax_add(st, static_cast<Acc>(x[c]));
    if constexpr (kBlockPerRow) {
      st = block_allreduce(st, merge);
    } else {
      st = warp_allreduce(st, merge);
    }
    if (lane == 0) {
      acc.loss += static_cast<double>(ce_loss(st, static_cast<Acc>(x[t]), p, classes));
      acc.count += 1;
    }
    if (g != nullptr) {
      const Acc inv_sum = Acc(1) / st.sum;
      for (int64_t c = lane; c < classes; c += kGroup) {
        g[c] = static_cast<scalar_t>(
            ce_grad(static_cast<Acc>(x[c]), c == t, st, inv_sum, p, smoothing_per_class));
      }
    }
  }
}

// bce/mse/l1 elements [begin, end) of b * C + j; targets of type target_t. A NaN target is a
// missing label: not counted, gradient 0.
template <LossKind K, typename scalar_t, typename target_t>
__device__ void elementwise_items(const TaskView& tv, const WorkItem& w, LossSum& acc) {
  using Acc = at::opmath_type<scalar_t>;
  const auto* logits = static_cast<const scalar_t*>(tv.logits);
  const auto* target = static_cast<const target_t*>(tv.target);
  auto* grad = static_cast<scalar_t*>(tv.grad);
  const int64_t row_len = tv.classes;
  const bool dense = tv.logits_stride == row_len && tv.target_stride == row_len;
  for (int64_t e = w.begin + threadIdx.x; e < w.end; e += kThreads) {
    int64_t x_offset = e;
    int64_t y_offset = e;
    if (!dense) {
      const int64_t row = e / row_len;
      const int64_t j = e - row * row_len;
      x_offset = row * tv.logits_stride + j;
      y_offset = row * tv.target_stride + j;
    }
    const Acc y = static_cast<Acc>(target[y_offset]);
    Acc g = Acc(0);
    if (y == y) {
      acc.loss +=
          static_cast<double>(elementwise_loss<K>(static_cast<Acc>(logits[x_offset]), y, &g));
      acc.count += 1;
    }
    if (grad != nullptr) grad[e] = static_cast<scalar_t>(g);
  }
}

template <typename scalar_t, typename target_t>
__device__ void elementwise_kind(const TaskView& tv, const WorkItem& w, LossSum& acc) {
  switch (tv.kind) {
    case LossKind::kBce:
      elementwise_items<LossKind::kBce, scalar_t, target_t>(tv, w, acc);
      break;
    case LossKind::kMse:
      elementwise_items<LossKind::kMse, scalar_t, target_t>(tv, w, acc);
      break;
    default:
      elementwise_items<LossKind::kL1, scalar_t, target_t>(tv, w, acc);
      break;
  }
}

template <typename scalar_t>
__device__ void elementwise_task(const TaskView& tv, const WorkItem& w, LossSum& acc) {
  // float32 targets with half/bfloat16 logits; float and double logits always come with
  // targets of their own dtype (the checks convert them).
  if constexpr (!std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    if (tv.target_is_float32) {
      elementwise_kind<scalar_t, float>(tv, w, acc);
      return;
    }
  }
  elementwise_kind<scalar_t, scalar_t>(tv, w, acc);
}

// Block i runs work item i and stores its loss sum and count in slot i.
template <typename scalar_t, typename Acc = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    multitask_loss_kernel(const TaskView* tasks, const WorkItem* work, CeParams<Acc> ce,
                          double* partial_loss, int64_t* partial_count) {
  const WorkItem w = work[blockIdx.x];
  const TaskView tv = tasks[w.task];
  LossSum acc{0.0, 0};
  bool bad_label = false;
  switch (w.mode) {
    case WorkMode::kCePositions:
      ce_positions<scalar_t>(tv, w, ce, acc, bad_label);
      break;
    case WorkMode::kCeWarpRows:
      ce_rows<scalar_t, false>(tv, w, ce, acc, bad_label);
      break;
    case WorkMode::kCeBlockRows:
      ce_rows<scalar_t, true>(tv, w, ce, acc, bad_label);
      break;
    case WorkMode::kElementwise:
      elementwise_task<scalar_t>(tv, w, acc);
      break;
  }
  const LossSum sum = block_allreduce(acc, add_loss_sums);
  if (threadIdx.x == 0) {
    partial_loss[blockIdx.x] = sum.loss;
    partial_count[blockIdx.x] = sum.count;
  }
  // After the block's last barrier, so a failing thread leaves no other waiting at one.
  CUDA_KERNEL_ASSERT(!bad_label && "mtlcore.multitask_loss: a ce target is out of [0, C)");
}

// One block: task i's slots first_item[i] .. first_item[i + 1] - 1 are added in order (a fixed
// split over the threads, then the block tree), giving L_i (in double, kept in task_loss [T])
// and grad_scale; then total = sum_i (w_i L_i + L_i sum_j R_ij L_j) in double from the
// unrounded L, as the CPU kernels.
template <typename LossT>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const int64_t* first_item, const double* partial_loss,
                    const int64_t* partial_count, int64_t num_tasks, const LossT* weights,
                    const LossT* relation, const TaskView* views, double* task_loss,
                    LossT* per_task, LossT* grad_scale, LossT* total) {
  for (int64_t i = 0; i < num_tasks; ++i) {
    LossSum sum{0.0, 0};
    for (int64_t k = first_item[i] + threadIdx.x; k < first_item[i + 1]; k += kThreads) {
      sum = add_loss_sums(sum, LossSum{partial_loss[k], partial_count[k]});
    }
    sum = block_allreduce(sum, add_loss_sums);
    if (threadIdx.x == 0) {
      const double count = static_cast<double>(sum.count);
      const double loss = sum.count > 0 ? sum.loss / count : 0.0;
      task_loss[i] = loss;
      per_task[i] = static_cast<LossT>(loss);
      // The gradients here are unscaled (mse's without its factor 2).
      grad_scale[i] = static_cast<LossT>(views[i].kind == LossKind::kMse ? count / 2 : count);
    }
  }
  __syncthreads();  // task_loss, written by thread 0, is read by all threads below
  double term = 0.0;
  for (int64_t i = threadIdx.x; i < num_tasks; i += kThreads) {
    const double loss = task_loss[i];
    double coupled = weights != nullptr ? static_cast<double>(weights[i]) : 1.0;
    if (relation != nullptr) {
      double related = 0.0;
      for (int64_t j = 0; j < num_tasks; ++j) {
        related += static_cast<double>(relation[i * num_tasks + j]) * task_loss[j];
      }
      coupled += related;
    }
    term += coupled * loss;
  }
  term = block_allreduce_sum(term);
  if (threadIdx.x == 0) *total = static_cast<LossT>(term);
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// The tensors of the coupling, all [T] or [T, T] contiguous in the loss dtype on the device.
template <typename LossT>
struct CouplingArgs {
  int64_t num_tasks;
  const LossT* per_task;
  const LossT* grad_scale;
  const LossT* grad_total;     // null: 0
  const LossT* grad_per_task;  // null: zeros
  const LossT* weights;        // null: ones
  const LossT* relation;       // null: zero
};

// coef_i = (g_total * (w_i + sum_j (R_ij + R_ji) L_j) + g_i) / grad_scale_i in double (0 when
// grad_scale_i is 0). The whole block computes it (the sum over j split over the threads in a
// fixed order), so every block of task i gets the same value. All threads of the block must
// call it.
template <typename LossT>
__device__ __forceinline__ double task_coefficient(const CouplingArgs<LossT>& a, int64_t i) {
  const int64_t t = a.num_tasks;
  double d = a.weights != nullptr ? static_cast<double>(a.weights[i]) : 1.0;
  if (a.relation != nullptr) {
    double related = 0.0;
    // Not unrolled: T is small (usually one step per thread), and unrolling spills registers.
#pragma unroll 1
    for (int64_t j = threadIdx.x; j < t; j += kThreads) {
      related += (static_cast<double>(a.relation[i * t + j]) +
                  static_cast<double>(a.relation[j * t + i])) *
                 static_cast<double>(a.per_task[j]);
    }
    d += block_allreduce_sum(related);
  }
  const double g_total = a.grad_total != nullptr ? static_cast<double>(*a.grad_total) : 0.0;
  const double g_i = a.grad_per_task != nullptr ? static_cast<double>(a.grad_per_task[i]) : 0.0;
  const double den = static_cast<double>(a.grad_scale[i]);  // 0: no valid label, zero gradient
  return den != 0.0 ? (g_total * d + g_i) / den : 0.0;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

// Block k scales the elements of work item k: out = coef_task * grad.
template <typename scalar_t, typename LossT>
__global__ void __launch_bounds__(kThreads)
    scale_grads_kernel(const ScaleTask* tasks, const ScaleWork* work,
                       CouplingArgs<LossT> coupling) {
  using Acc = at::opmath_type<scalar_t>;
  const ScaleWork w = work[blockIdx.x];
  const ScaleTask task = tasks[w.task];
  const Acc coef = static_cast<Acc>(task_coefficient(coupling, w.task));
  const auto* in = static_cast<const scalar_t*>(task.grad);
  auto* out = static_cast<scalar_t*>(task.out);
  int64_t scalar_begin = w.begin;
  if (task.vectorized) {
    // Work items start at multiples of kWorkElements, so every vector here is aligned.
    constexpr int kVec = kVecBytes / static_cast<int>(sizeof(scalar_t));
    using Vec = AlignedVector<scalar_t, kVec>;
    const int64_t vec_end = w.begin + (w.end - w.begin) / kVec * kVec;
    for (int64_t e = w.begin + static_cast<int64_t>(threadIdx.x) * kVec; e < vec_end;
         e += static_cast<int64_t>(kThreads) * kVec) {
      Vec v = *reinterpret_cast<const Vec*>(in + e);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        v.val[k] = static_cast<scalar_t>(coef * static_cast<Acc>(v.val[k]));
      }
      *reinterpret_cast<Vec*>(out + e) = v;
    }
    scalar_begin = vec_end;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < w.end; e += kThreads) {
    out[e] = static_cast<scalar_t>(coef * static_cast<Acc>(in[e]));
  }
}

// One block: grad_weights = g_total * L and grad_relation = g_total * L L^T (either may be
// null), in double, rounded to the loss dtype.
template <typename LossT>
__global__ void __launch_bounds__(kThreads)
    coupling_grads_kernel(int64_t num_tasks, const LossT* grad_total, const LossT* per_task,
                          LossT* grad_weights, LossT* grad_relation) {
  const double g = static_cast<double>(*grad_total);
  if (grad_weights != nullptr) {
    for (int64_t i = threadIdx.x; i < num_tasks; i += kThreads) {
      grad_weights[i] = static_cast<LossT>(g * static_cast<double>(per_task[i]));
    }
  }
  if (grad_relation != nullptr) {
    for (int64_t k = threadIdx.x; k < num_tasks * num_tasks; k += kThreads) {
      const int64_t i = k / num_tasks;
      const int64_t j = k - i * num_tasks;
      grad_relation[k] = static_cast<LossT>(g * static_cast<double>(per_task[i]) *
                                            static_cast<double>(per_task[j]));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host planning
// ---------------------------------------------------------------------------------------

// How a task is cut into work items: its units (rows, positions or elements), the units of one
// item and how the block walks them.
struct TaskPlan {
  WorkMode mode;
  int64_t units;
  int64_t units_per_item;
};

inline TaskPlan plan_task(const TaskView& tv) {
  // An empty task (a zero batch, or a zero-size spatial dimension of dense logits) has no work.
  if (tv.kind != LossKind::kCe || tv.numel() == 0) {
    return {WorkMode::kElementwise, tv.numel(), kWorkElements};
  }
  const int64_t units_in_budget = std::max<int64_t>(1, kWorkElements / tv.classes);
  if (tv.inner > 1 || tv.classes <= kThreadRowMaxClasses) {
    // A thread per position: whole multiples of the block, at least one position per thread.
    const int64_t per_item = std::max<int64_t>(kThreads, units_in_budget / kThreads * kThreads);
    return {WorkMode::kCePositions, tv.batch * tv.inner, per_item};
  }
  const WorkMode mode =
      tv.classes <= kWarpRowMaxClasses ? WorkMode::kCeWarpRows : WorkMode::kCeBlockRows;
  return {mode, tv.batch, units_in_budget};
}

// The forward's work list: every task's items, task by task (the finalize kernel relies on
// that order), and where each task's items start (first_item[i]; first_item[T] = the count).
struct WorkList {
  std::vector<WorkItem> work;
  std::vector<int64_t> first_item;
};

inline WorkList plan_work(const std::vector<TaskView>& views) {
  WorkList list;
  list.first_item.reserve(views.size() + 1);
  for (size_t i = 0; i < views.size(); ++i) {
    list.first_item.push_back(static_cast<int64_t>(list.work.size()));
    const TaskPlan plan = plan_task(views[i]);
    for (int64_t begin = 0; begin < plan.units; begin += plan.units_per_item) {
      list.work.push_back({static_cast<int32_t>(i), plan.mode, begin,
                           std::min(plan.units, begin + plan.units_per_item)});
    }
  }
  list.first_item.push_back(static_cast<int64_t>(list.work.size()));
  return list;
}

// The backward's work items for task `task`'s gradient of numel elements (none when empty):
// kWorkElements each, so every item starts at a multiple of the vector width.
inline void append_scale_work(int64_t task, int64_t numel, std::vector<ScaleWork>& work) {
  for (int64_t begin = 0; begin < numel; begin += kWorkElements) {
    work.push_back({task, begin, std::min(numel, begin + kWorkElements)});
  }
}

// A task's gradient as the backward scaling reads (in) and writes (out) it.
inline ScaleTask scale_task(const void* in, void* out) {
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
  };
  return {in, out, aligned(in) && aligned(out)};
}

}  // namespace mtlcore::cuda
