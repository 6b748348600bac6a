// Work lists for the CPU ops' parallel regions: jobs handed out one at a time.
//
// Why. at::parallel_for gives each thread a fixed contiguous share of the range. On a shared
// machine one core is often slowed by another process for a while, and the whole op then waits
// for that core's share. Here the threads take the next job from a shared counter instead, so
// a slowed thread simply takes fewer of them.
// Results. Which thread runs a job varies from call to call, so a job must write only outputs
// of its own (or its own partial sums, added afterwards in job order): then results do not
// depend on the thread count or on the timing.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mtlcore::cpu {

// Calls body(job, state) for every job in [0, jobs), in increasing order of job within each
// thread, on up to torch's intra-op thread count of threads (one thread inside another parallel
// region). make_state() runs once on each thread that takes part, before its first job, and
// returns that thread's state (e.g. its scratch buffers), which lives until the thread is done.
template <typename MakeState, typename Body>
void for_each_job(int64_t jobs, const MakeState& make_state, const Body& body) {
  if (jobs <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(jobs, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t job = next.fetch_add(1, std::memory_order_relaxed); job < jobs;
         job = next.fetch_add(1, std::memory_order_relaxed)) {
      body(job, state);
    }
  });
}

// for_each_job without per-thread state: body(job).
template <typename Body>
void for_each_job(int64_t jobs, const Body& body) {
  for_each_job(jobs, [] { return 0; }, [&](int64_t job, int) { body(job); });
}

}  // namespace mtlcore::cpu
