// The scatter shuffle's steps, shared by the plain shuffles (shuffle.cpp) and the fused document +
// sample index builder (document_samples.cpp).
//
// Algorithm (after Sanders 1998): element i of the virtual input goes to bucket b(i), drawn
// uniformly and independently from a counter-based hash of (seed, stream, i); the buckets are laid
// out one after another and each bucket is then shuffled by Fisher-Yates with its own stream.
// Independent uniform bucket choice followed by a uniform shuffle of every bucket gives a uniform
// permutation. Inside a bucket, before its Fisher-Yates, elements sit in input order whatever the
// chunking, so the result depends only on (seed, stream, count), never on chunks or threads.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"

namespace osp {

constexpr int64_t kBucketTarget = int64_t{1} << 17;  // elements per bucket (~L2-sized shuffles)
constexpr int64_t kChunkMin = int64_t{1} << 20;      // elements per counting/scatter chunk
constexpr int64_t kMaxChunks = 256;

// Where every element of one scatter shuffle of `count` elements goes.
struct ScatterPlan {
  int64_t count = 0, num_buckets = 0, num_chunks = 0, chunk_size = 0;
  uint64_t seed = 0, stream = 0, assign_key = 0;
  std::vector<int64_t> slots;          // [chunk * num_buckets + bucket]: next output position
  std::vector<int64_t> bucket_start;   // num_buckets + 1 output positions
  std::vector<int64_t> bucket_weight;  // per bucket: sum of weight(element) (when asked for)

  int64_t bucket_of(int64_t i) const {
    return static_cast<int64_t>(scale_to(mix64(assign_key + static_cast<uint64_t>(i) * kGolden),
                                         static_cast<uint64_t>(num_buckets)));
  }
};

// Counts elements (and, unless `weight` is nullptr, sums weight(j) for the element's source index
// j = i mod period) per (chunk, bucket), then lays the buckets out. count >= 1.
template <typename Weight>
ScatterPlan plan_scatter(int64_t count, int64_t period, uint64_t seed, uint64_t stream, int threads,
                         Weight weight) {
  constexpr bool kWeighted = !std::is_same_v<Weight, std::nullptr_t>;
  ScatterPlan plan;
  plan.count = count;
  plan.seed = seed;
  plan.stream = stream;
  plan.num_buckets = (count + kBucketTarget - 1) / kBucketTarget;
  plan.num_chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (count + kChunkMin - 1) / kChunkMin));
  plan.chunk_size = (count + plan.num_chunks - 1) / plan.num_chunks;
  plan.assign_key = stream_key(seed, 2 * stream, 0);
  const int64_t nb = plan.num_buckets;
  plan.slots.assign(static_cast<size_t>(plan.num_chunks * nb), 0);
  std::vector<int64_t> weights(kWeighted ? static_cast<size_t>(plan.num_chunks * nb) : 0, 0);
  parallel_for(plan.num_chunks, threads, [&](int64_t c) {
    int64_t* row = plan.slots.data() + c * nb;
    const int64_t begin = c * plan.chunk_size, end = std::min(count, begin + plan.chunk_size);
    if constexpr (kWeighted) {
      int64_t* wrow = weights.data() + c * nb;
      int64_t j = begin % period;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = plan.bucket_of(i);
        ++row[b];
        wrow[b] += weight(j);
        if (++j == period) j = 0;
      }
    } else {
      for (int64_t i = begin; i < end; ++i) ++row[plan.bucket_of(i)];
    }
  });
  // Bucket-major exclusive prefix sum: where chunk c writes its first element of bucket b.
  plan.bucket_start.assign(static_cast<size_t>(nb + 1), 0);
  if (kWeighted) plan.bucket_weight.assign(static_cast<size_t>(nb), 0);
  int64_t running = 0;
  for (int64_t b = 0; b < nb; ++b) {
    plan.bucket_start[b] = running;
    for (int64_t c = 0; c < plan.num_chunks; ++c) {
      const int64_t n = plan.slots[c * nb + b];
      plan.slots[c * nb + b] = running;
      running += n;
      if constexpr (kWeighted) plan.bucket_weight[b] += weights[c * nb + b];
    }
  }
  plan.bucket_start[nb] = running;
  return plan;
}

// Writes each chunk's elements, in input order, to their buckets (uses up plan.slots).
template <typename T, typename Source>
void scatter(ScatterPlan& plan, T* out, int64_t period, const Source& source, int threads) {
  parallel_for(plan.num_chunks, threads, [&](int64_t c) {
    int64_t* next = plan.slots.data() + c * plan.num_buckets;
    const int64_t begin = c * plan.chunk_size, end = std::min(plan.count, begin + plan.chunk_size);
    int64_t j = begin % period;
    for (int64_t i = begin; i < end; ++i) {
      out[next[plan.bucket_of(i)]++] = source(j);
      if (++j == period) j = 0;
    }
  });
}

// Fisher-Yates of bucket b with its own stream.
template <typename T>
void shuffle_bucket(const ScatterPlan& plan, T* out, int64_t b) {
  Stream rng(stream_key(plan.seed, 2 * plan.stream + 1, static_cast<uint64_t>(b)));
  T* base = out + plan.bucket_start[b];
  for (int64_t i = plan.bucket_start[b + 1] - plan.bucket_start[b] - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(base[i], base[j]);
  }
}

}  // namespace osp
