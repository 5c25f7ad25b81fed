// Threads and a counter-based RNG shared by the index builders.
//
// Every random number is a pure function of (seed, stream, counter), so work can be cut into
// tasks and run on any number of threads in any order and still give the same result: the
// partition into tasks depends only on the problem size, never on the thread count.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace osp {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// SplitMix64's output function: a bijective 64-bit mixer with good avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Key of an independent stream: distinct (seed, stream, sub) triples give unrelated keys.
inline uint64_t stream_key(uint64_t seed, uint64_t stream, uint64_t sub) {
  return mix64(mix64(seed ^ mix64(stream * kGolden + 1)) + sub * kGolden + 0x632BE59BD9B4E019ULL);
}

// Uniform in [0, bound) from one 64-bit word, by multiply-high (bias < bound / 2^64).
inline uint64_t scale_to(uint64_t x, uint64_t bound) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * bound) >> 64);
}

// Sequential generator over one stream: the i-th draw is mix64(key + i * golden) (SplitMix64).
class Stream {
 public:
  explicit Stream(uint64_t key) : state_(key) {}
  uint64_t next() { return mix64(state_ += kGolden); }
  // Exactly uniform in [0, bound), bound >= 1 (Lemire's multiply-shift with rejection).
  uint64_t below(uint64_t bound) {
    uint64_t x = next();
    unsigned __int128 m = static_cast<unsigned __int128>(x) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        x = next();
        m = static_cast<unsigned __int128>(x) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

// Runs fn(task) for task in [0, num_tasks) on up to `threads` threads (dynamic scheduling).
// The first exception thrown by a task is rethrown after all threads have joined.
template <typename Fn>
void parallel_for(int64_t num_tasks, int threads, Fn&& fn) {
  if (num_tasks <= 0) return;
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, num_tasks)));
  if (n == 1) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    for (;;) {
      const int64_t t = next.fetch_add(1);
      if (t >= num_tasks) return;
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(num_tasks);
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  for (int i = 1; i < n; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace osp
