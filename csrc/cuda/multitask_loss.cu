// CUDA kernels of mtlcore::multitask_loss, multitask_loss_with_grad and multitask_loss_backward
// (schemas in csrc/mtlcore.cpp): T task losses (ce, bce, mse, l1) in one pass, coupled by the
// weights and the relation matrix, and the scaling of their gradients in the backward.
//
// Data layout. The shared argument checks (common/multitask_loss_args.h) describe task i by a
// TaskView: B items of C x S elements read through the item strides logits_stride and
// target_stride: ce element (b, c, s) at b * logits_stride + c * S + s and its int64 target at
// b * target_stride + s; bce/mse/l1 element (b, j) at b * logits_stride + j, target at
// b * target_stride + j (S = 1). Gradients are new contiguous tensors: element (b, c, s) at
// b * C * S + c * S + s. Every element offset is 64-bit.
//
// Parallel split. The host cuts every task into work items of about kWorkElements elements (a
// count fixed here, the same on every device) and uploads the TaskViews, each task's first work
// item and the work list with one asynchronous copy from pinned memory. One launch then runs a
// block of kThreads threads per work item, whatever the tasks' kinds:
//   ce, S > 1, or S == 1 with C <= kThreadRowMaxClasses: a thread per position (b, s),
//     consecutive threads on consecutive s (coalesced), each looping over the C classes;
//   ce, S == 1, C <= kWarpRowMaxClasses: a warp per row [C], lanes strided over the classes;
//   ce, S == 1, larger C: the whole block per row;
//   bce, mse, l1: the threads strided over the item's elements.
// Softmax takes one pass over the logits, keeping an online state (running max, sum of exp
// rescaled to that max, sum of the logits) merged across lanes and warps by shuffles in a fixed
// tree; a second pass re-reads the logits and writes each gradient element once. Each block
// stores its (sum of losses, count of valid positions) in a workspace slot of its own; a
// one-block launch then adds each task's slots in work-list order and computes per_task,
// grad_scale and total on the device. The backward is one launch over a work list of the
// gradients' elements: each block computes its task's coefficient from the device tensors (no
// host synchronisation) and scales its elements (16-byte vector accesses when aligned); a
// one-block launch writes grad_weights and grad_relation. No atomics: every sum is taken in an
// order fixed by the shapes, so results are bitwise identical from run to run. Launches go to
// the current stream of the logits' (per_task's) device.
//
// Numerics. Logits, and half/bfloat16 targets, are converted to float (double for double logits)
// on load; all loss and gradient math is done in that type with its exp/log/log1p, and the
// gradients are rounded once to the logits' dtype on store. No attempt is made to match the CPU
// kernels bit for bit (the device's exp and log differ from the host's), but the expressions
// are theirs: 1 - eps and eps / C in the math type, softmax as exp(x - max) * (1 / sum). Losses
// are summed in double (per thread, then per block, then per task). L_i = sum / count and
// grad_scale = count (grads[i] / grad_scale[i] = d L_i / d logits[i]: the gradients here are
// unscaled, mse's also without its factor 2, which makes its grad_scale count / 2, since
// 2 (x - y) would overflow half precision from |x - y| > 32752 on; the CPU forward pre-scales
// its own) are computed in double and rounded to the loss dtype; total is computed in double
// from the unrounded L. Backward: coef_i is computed in double, rounded to the gradient's
// op-math type and multiplied by the gradient, which is rounded once.
// A ce label outside [0, C) (and not ignore_index) trips a device-side assertion
// (CUDA_KERNEL_ASSERT, as torch's nll_loss does) at the end of the block that read it; the
// position is skipped (gradient 0), never read out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/multitask_loss_args.h"

// Host and device: the element math below can be exercised on the host.
#define MTLCORE_HD __host__ __device__ __forceinline__

namespace mtlcore {

namespace {

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
// Host side
// ---------------------------------------------------------------------------------------

const std::vector<at::ScalarType>& cuda_dtypes() {
  static const std::vector<at::ScalarType> d{at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  return d;
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

// Bytes of one host array to upload.
struct HostPart {
  const void* data;
  size_t bytes;
};

template <typename V>
HostPart host_part(const std::vector<V>& v) {
  static_assert(std::is_trivially_copyable_v<V>);
  return {v.data(), v.size() * sizeof(V)};
}

// The host arrays `parts` in one device buffer, each at a kUploadAlign-aligned offset, copied
// with one asynchronous copy from pinned memory on the current stream (the copy keeps the
// pinned block from reuse until it is done). offsets[k] receives where part k starts.
at::Tensor upload(const std::vector<HostPart>& parts, c10::Device device,
                  std::vector<size_t>& offsets) {
  offsets.clear();
  size_t bytes = 0;
  for (const HostPart& part : parts) {
    offsets.push_back(bytes);
    bytes += (part.bytes + kUploadAlign - 1) / kUploadAlign * kUploadAlign;
  }
  const int64_t size = static_cast<int64_t>(std::max<size_t>(bytes, 1));
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* host_bytes = static_cast<uint8_t*>(host.mutable_data_ptr());
  for (size_t k = 0; k < parts.size(); ++k) {
    if (parts[k].bytes > 0) std::memcpy(host_bytes + offsets[k], parts[k].data, parts[k].bytes);
  }
  return host.to(at::TensorOptions().dtype(at::kByte).device(device), /*non_blocking=*/true);
}

template <typename V>
const V* uploaded(const at::Tensor& buffer, size_t offset) {
  return reinterpret_cast<const V*>(static_cast<const uint8_t*>(buffer.const_data_ptr()) + offset);
}

// How a task is cut into work items: its units (rows, positions or elements), the units of one
// item and how the block walks them.
struct TaskPlan {
  WorkMode mode;
  int64_t units;
  int64_t units_per_item;
};

TaskPlan plan_task(const TaskView& tv) {
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

struct ForwardOutputs {
  at::Tensor total;
  at::Tensor per_task;
  at::Tensor grad_scale;
  std::vector<at::Tensor> grads;
};

ForwardOutputs multitask_loss_forward_cuda(const char* op, at::TensorList logits,
                                           at::TensorList targets,
                                           const std::vector<std::string>& kinds,
                                           const std::optional<at::Tensor>& weights,
                                           const std::optional<at::Tensor>& relation,
                                           int64_t ignore_index, double label_smoothing,
                                           bool with_grad) {
  const MultitaskLossProblem problem = check_multitask_loss_args(
      op, logits, targets, kinds, weights, relation, ignore_index, label_smoothing, cuda_dtypes());
  const c10::Device device = logits[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": the CUDA kernel got logits on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();

  ForwardOutputs out;
  if (with_grad) out.grads = problem.new_grads(logits);
  const std::vector<TaskView> views = problem.views(out.grads);
  const int64_t num_tasks = static_cast<int64_t>(views.size());

  // Work list, task by task (the finalize kernel relies on that order).
  std::vector<WorkItem> work;
  std::vector<int64_t> first_item;
  first_item.reserve(views.size() + 1);
  for (int64_t i = 0; i < num_tasks; ++i) {
    first_item.push_back(static_cast<int64_t>(work.size()));
    const TaskPlan plan = plan_task(views[i]);
    for (int64_t begin = 0; begin < plan.units; begin += plan.units_per_item) {
      work.push_back({static_cast<int32_t>(i), plan.mode, begin,
                      std::min(plan.units, begin + plan.units_per_item)});
    }
  }
  first_item.push_back(static_cast<int64_t>(work.size()));
  const int64_t num_work = static_cast<int64_t>(work.size());
  TORCH_CHECK_VALUE(num_work <= std::numeric_limits<int32_t>::max(), op,
                    ": too many elements for the CUDA kernel");

  std::vector<size_t> offsets;
  const at::Tensor meta =
      upload({host_part(views), host_part(first_item), host_part(work)}, device, offsets);

  const at::TensorOptions loss_options = logits[0].options().dtype(problem.loss_dtype);
  out.total = at::empty({}, loss_options);
  out.per_task = at::empty({num_tasks}, loss_options);
  out.grad_scale = at::empty({num_tasks}, loss_options);
  const at::Tensor partial_loss = at::empty({num_work}, loss_options.dtype(at::kDouble));
  const at::Tensor partial_count = at::empty({num_work}, loss_options.dtype(at::kLong));
  const at::Tensor task_loss = at::empty({num_tasks}, loss_options.dtype(at::kDouble));
  const at::Tensor w = problem.weights.value_or(at::Tensor());
  const at::Tensor r = problem.relation.value_or(at::Tensor());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, problem.dtype, "mtlcore.multitask_loss", [&] {
        using Acc = at::opmath_type<scalar_t>;
        if (num_work > 0) {
          const auto smoothing = static_cast<Acc>(problem.label_smoothing);
          const CeParams<Acc> ce{problem.ignore_index, smoothing, Acc(1) - smoothing};
          multitask_loss_kernel<scalar_t><<<static_cast<unsigned>(num_work), kThreads, 0, stream>>>(
              uploaded<TaskView>(meta, offsets[0]), uploaded<WorkItem>(meta, offsets[2]), ce,
              partial_loss.mutable_data_ptr<double>(), partial_count.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // Also with no work at all: every output gets defined.
        finalize_kernel<Acc><<<1, kThreads, 0, stream>>>(
            uploaded<int64_t>(meta, offsets[1]), partial_loss.const_data_ptr<double>(),
            partial_count.const_data_ptr<int64_t>(), num_tasks, data_or_null<Acc>(w),
            data_or_null<Acc>(r), uploaded<TaskView>(meta, offsets[0]),
            task_loss.mutable_data_ptr<double>(), out.per_task.mutable_data_ptr<Acc>(),
            out.grad_scale.mutable_data_ptr<Acc>(), out.total.mutable_data_ptr<Acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

bool is_vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// grad_logits[i] = coef_i * grads[i] for the tasks whose gradient has dtype `dtype` and
// elements: one upload and one launch.
template <typename LossT>
void scale_grads(at::ScalarType dtype, at::TensorList grads,
                 const std::vector<at::Tensor>& grad_logits, const CouplingArgs<LossT>& coupling,
                 c10::Device device, const at::cuda::CUDAStream& stream) {
  std::vector<ScaleTask> tasks(grads.size(), ScaleTask{nullptr, nullptr, false});
  std::vector<ScaleWork> work;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t numel = grads[i].numel();
    if (numel == 0 || grads[i].scalar_type() != dtype) continue;
    const void* in = grads[i].const_data_ptr();
    void* out = grad_logits[i].mutable_data_ptr();
    tasks[i] = {in, out, is_vector_aligned(in) && is_vector_aligned(out)};
    for (int64_t begin = 0; begin < numel; begin += kWorkElements) {
      work.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kWorkElements)});
    }
  }
  TORCH_CHECK_VALUE(work.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
                    "mtlcore.multitask_loss_backward: too many elements for the CUDA kernel");
  std::vector<size_t> offsets;
  const at::Tensor meta = upload({host_part(tasks), host_part(work)}, device, offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "mtlcore.multitask_loss_backward", [&] {
        scale_grads_kernel<scalar_t, LossT>
            <<<static_cast<unsigned>(work.size()), kThreads, 0, stream>>>(
                uploaded<ScaleTask>(meta, offsets[0]), uploaded<ScaleWork>(meta, offsets[1]),
                coupling);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

template <typename LossT>
void multitask_loss_backward_typed(const CouplingArgs<LossT>& coupling, at::TensorList grads,
                                   const std::vector<at::Tensor>& grad_logits, bool want_logits,
                                   LossT* grad_weights, LossT* grad_relation, c10::Device device,
                                   const at::cuda::CUDAStream& stream) {
  if (want_logits) {
    // The forward writes every gradient in the logits' dtype: normally one group, one launch.
    std::vector<at::ScalarType> dtypes;
    for (const at::Tensor& g : grads) {
      if (g.numel() > 0 &&
          std::find(dtypes.begin(), dtypes.end(), g.scalar_type()) == dtypes.end()) {
        dtypes.push_back(g.scalar_type());
      }
    }
    for (at::ScalarType dtype : dtypes) {
      scale_grads(dtype, grads, grad_logits, coupling, device, stream);
    }
  }
  if (coupling.grad_total != nullptr && (grad_weights != nullptr || grad_relation != nullptr)) {
    coupling_grads_kernel<LossT><<<1, kThreads, 0, stream>>>(
        coupling.num_tasks, coupling.grad_total, coupling.per_task, grad_weights, grad_relation);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multitask_loss_cuda(
    at::TensorList logits, at::TensorList targets, const std::vector<std::string>& kinds,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    int64_t ignore_index, double label_smoothing) {
  ForwardOutputs out =
      multitask_loss_forward_cuda("mtlcore.multitask_loss", logits, targets, kinds, weights,
                                  relation, ignore_index, label_smoothing, /*with_grad=*/false);
  return {out.total, out.per_task};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>
multitask_loss_with_grad_cuda(at::TensorList logits, at::TensorList targets,
                              const std::vector<std::string>& kinds,
                              const std::optional<at::Tensor>& weights,
                              const std::optional<at::Tensor>& relation, int64_t ignore_index,
                              double label_smoothing) {
  ForwardOutputs out =
      multitask_loss_forward_cuda("mtlcore.multitask_loss_with_grad", logits, targets, kinds,
                                  weights, relation, ignore_index, label_smoothing,
                                  /*with_grad=*/true);
  return {out.total, out.per_task, out.grad_scale, std::move(out.grads)};
}

namespace {

// The backward's kernels, writing grad_logits (when want_logits; they may be the grads
// themselves: the scaling is element-wise) and the coupling gradients (undefined: not wanted).
void backward_into(const char* op, const std::optional<at::Tensor>& grad_total,
                   const std::optional<at::Tensor>& grad_per_task, const at::Tensor& per_task,
                   const at::Tensor& grad_scale, at::TensorList grads,
                   const std::optional<at::Tensor>& weights,
                   const std::optional<at::Tensor>& relation,
                   const std::vector<at::Tensor>& grad_logits, bool want_logits,
                   at::Tensor& grad_weights, at::Tensor& grad_relation) {
  check_multitask_loss_backward_args(op, grad_total, grad_per_task, per_task, grad_scale, grads,
                                     weights, relation);
  TORCH_CHECK_VALUE(per_task.is_cuda(), op, ": the CUDA kernel got per_task on ",
                    per_task.device());
  const c10::cuda::CUDAGuard guard(per_task.device());
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  const int64_t num_tasks = per_task.size(0);
  const at::ScalarType loss_dtype = per_task.scalar_type();
  // Without grad_total the coupling gradients are zero.
  const bool coupled = has(grad_total);
  for (at::Tensor* g : {&grad_weights, &grad_relation}) {
    if (g->defined() && !coupled) g->zero_();
  }

  const at::Tensor loss = per_task.contiguous();
  const at::Tensor scale = grad_scale.contiguous();
  const at::Tensor g_per_task = has(grad_per_task) ? grad_per_task->contiguous() : at::Tensor();
  const at::Tensor w = has(weights) ? weights->to(loss_dtype).contiguous() : at::Tensor();
  const at::Tensor r = has(relation) ? relation->to(loss_dtype).contiguous() : at::Tensor();
  const at::Tensor g_total = coupled ? *grad_total : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(loss_dtype, "mtlcore.multitask_loss_backward", [&] {
    using LossT = scalar_t;
    const CouplingArgs<LossT> coupling{num_tasks,
                                       data_or_null<LossT>(loss),
                                       data_or_null<LossT>(scale),
                                       data_or_null<LossT>(g_total),
                                       data_or_null<LossT>(g_per_task),
                                       data_or_null<LossT>(w),
                                       data_or_null<LossT>(r)};
    multitask_loss_backward_typed<LossT>(
        coupling, grads, grad_logits, want_logits,
        grad_weights.defined() && coupled ? grad_weights.mutable_data_ptr<LossT>() : nullptr,
        grad_relation.defined() && coupled ? grad_relation.mutable_data_ptr<LossT>() : nullptr,
        per_task.device(), stream);
  });
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multitask_loss_backward_cuda(
    const std::optional<at::Tensor>& grad_total, const std::optional<at::Tensor>& grad_per_task,
    const at::Tensor& per_task, const at::Tensor& grad_scale, at::TensorList grads,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& relation,
    std::array<bool, 3> output_mask) {
  const auto [want_logits, want_weights, want_relation] = output_mask;
  const int64_t num_tasks = per_task.dim() == 1 ? per_task.size(0) : 0;
  const at::TensorOptions loss_options = per_task.options();
  // Gradients not asked for come back as empty tensors.
  std::vector<at::Tensor> grad_logits;
  grad_logits.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    grad_logits.push_back(want_logits ? at::empty(g.sizes(), g.options())
                                      : at::empty({0}, g.options()));
  }
  using Shape = std::vector<int64_t>;
  at::Tensor grad_weights = at::empty(want_weights ? Shape{num_tasks} : Shape{0}, loss_options);
  at::Tensor grad_relation =
      at::empty(want_relation ? Shape{num_tasks, num_tasks} : Shape{0}, loss_options);
  at::Tensor no_weights, no_relation;
  backward_into("mtlcore.multitask_loss_backward", grad_total, grad_per_task, per_task, grad_scale,
                grads, weights, relation, grad_logits, want_logits,
                want_weights ? grad_weights : no_weights,
                want_relation ? grad_relation : no_relation);
  return {std::move(grad_logits), grad_weights, grad_relation};
}

void multitask_loss_backward_inplace_cuda(const std::optional<at::Tensor>& grad_total,
                                          const std::optional<at::Tensor>& grad_per_task,
                                          const at::Tensor& per_task, const at::Tensor& grad_scale,
                                          at::TensorList grads,
                                          const std::optional<at::Tensor>& weights,
                                          const std::optional<at::Tensor>& relation) {
  const std::vector<at::Tensor> in_place(grads.begin(), grads.end());
  at::Tensor no_weights, no_relation;
  backward_into("mtlcore.multitask_loss_backward_", grad_total, grad_per_task, per_task, grad_scale,
                grads, weights, relation, in_place, true, no_weights, no_relation);
}

}  // namespace mtlcore

TORCH_LIBRARY_IMPL(mtlcore, CUDA, m) {
  m.impl("multitask_loss", &mtlcore::multitask_loss_cuda);
  m.impl("multitask_loss_with_grad", &mtlcore::multitask_loss_with_grad_cuda);
  m.impl("multitask_loss_backward", &mtlcore::multitask_loss_backward_cuda);
  m.impl("multitask_loss_backward_", &mtlcore::multitask_loss_backward_inplace_cuda);
}
