// One core for each thread of torch's intra-op pool.
//
// Unbound, the pool's threads move between cores with the OS scheduler. When another
// process keeps one core busy, two of them can land on the same core, and then one waits
// at every parallel region's barrier for a thread descheduled behind it: a SmolLM2 decode
// step at batch 16 took 0.4-1.6 s instead of 80 ms beside one busy process on two cores.
// Each thread bound to a core of its own, the pool only ever shares a core with the other
// work (what vLLM's CPU worker does too).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sched.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace pdserve_cpu {
namespace {

// Binds thread i of torch's pool to cpus[i % len(cpus)] and returns how many threads it
// bound. The calling thread is thread 0; a non-empty ``caller_cpus`` is its mask after
// (threads it starts later inherit it).
int64_t pin_threads(std::vector<int64_t> cpus, std::vector<int64_t> caller_cpus) {
  if (cpus.empty()) return 0;
  const int64_t n = at::get_num_threads();
  std::atomic<int64_t> bound{0};
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(static_cast<int>(cpus[at::get_thread_num() % cpus.size()]), &set);
      if (sched_setaffinity(0, sizeof(set), &set) == 0) bound.fetch_add(1);
    }
  });
  cpu_set_t caller;
  CPU_ZERO(&caller);
  for (int64_t c : caller_cpus) CPU_SET(static_cast<int>(c), &caller);
  if (!caller_cpus.empty()) sched_setaffinity(0, sizeof(caller), &caller);
  return bound.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("pin_threads(int[] cpus, int[] caller_cpus) -> int", &pin_threads);
}

}  // namespace pdserve_cpu
