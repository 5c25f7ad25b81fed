// Parallel, thread-count-independent shuffles: the document index over epochs and the shuffle
// index (a permutation of the samples).
//
// Algorithm (a scatter shuffle, after Sanders 1998): element i of the virtual input goes to bucket
// b(i), drawn uniformly and independently from a counter-based hash of (seed, stream, i); the
// buckets are laid out one after another (offsets from per-chunk counts) and each bucket is then
// shuffled by Fisher-Yates with its own stream. Independent uniform bucket choice followed by a
// uniform shuffle of every bucket gives a uniform permutation. Chunks and buckets depend only on
// the input length, so the result is the same for 1 or 64 threads. The input is virtual (a range,
// or an array tiled over epochs), so no second buffer of the output's size is ever allocated.
//
// The permutation is NOT numpy's RandomState.shuffle: a seed gives a different (equally uniform)
// order than Megatron-Core's document and shuffle indices.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace {

constexpr int64_t kBucketTarget = int64_t{1} << 17;  // elements per bucket (~L2-sized shuffles)
constexpr int64_t kChunkMin = int64_t{1} << 20;      // elements per counting/scatter chunk
constexpr int64_t kMaxChunks = 256;

// Writes into out[0, count) a uniform random permutation of value(i) for i in [0, count), where
// the values come from `source(j)` with j = i mod period.
template <typename T, typename Source>
void scatter_shuffle(T* out, int64_t count, int64_t period, const Source& source, uint64_t seed,
                     uint64_t stream, int threads) {
  if (count <= 0) return;
  const int64_t num_buckets = (count + kBucketTarget - 1) / kBucketTarget;
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (count + kChunkMin - 1) / kChunkMin));
  const int64_t chunk_size = (count + num_chunks - 1) / num_chunks;
  const uint64_t assign_key = osp::stream_key(seed, 2 * stream, 0);
  auto bucket_of = [&](int64_t i) {
    return static_cast<int64_t>(
        osp::scale_to(osp::mix64(assign_key + static_cast<uint64_t>(i) * osp::kGolden),
                      static_cast<uint64_t>(num_buckets)));
  };

  // 1. How many elements of each chunk fall in each bucket.
  std::vector<int64_t> slots(static_cast<size_t>(num_chunks * num_buckets), 0);
  osp::parallel_for(num_chunks, threads, [&](int64_t c) {
    int64_t* row = slots.data() + c * num_buckets;
    const int64_t end = std::min(count, (c + 1) * chunk_size);
    for (int64_t i = c * chunk_size; i < end; ++i) ++row[bucket_of(i)];
  });
  // 2. Bucket-major exclusive prefix sum: where chunk c writes its first element of bucket b.
  std::vector<int64_t> bucket_start(static_cast<size_t>(num_buckets + 1), 0);
  int64_t running = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    bucket_start[b] = running;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t n = slots[c * num_buckets + b];
      slots[c * num_buckets + b] = running;
      running += n;
    }
  }
  bucket_start[num_buckets] = running;
  // 3. Scatter each chunk's elements, in input order, to their buckets.
  osp::parallel_for(num_chunks, threads, [&](int64_t c) {
    int64_t* next = slots.data() + c * num_buckets;
    const int64_t begin = c * chunk_size;
    const int64_t end = std::min(count, begin + chunk_size);
    int64_t j = begin % period;
    for (int64_t i = begin; i < end; ++i) {
      out[next[bucket_of(i)]++] = source(j);
      if (++j == period) j = 0;
    }
  });
  // 4. Fisher-Yates within each bucket, each with its own stream.
  osp::parallel_for(num_buckets, threads, [&](int64_t b) {
    osp::Stream rng(osp::stream_key(seed, 2 * stream + 1, static_cast<uint64_t>(b)));
    T* base = out + bucket_start[b];
    for (int64_t i = bucket_start[b + 1] - bucket_start[b] - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
      std::swap(base[i], base[j]);
    }
  });
}

void check_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
}

// out = a permutation of [begin, begin + period) tiled over len(out) values.
template <typename T>
void shuffle_range_into(py::array_t<T, py::array::c_style> out_array, int64_t begin,
                        int64_t period, uint64_t seed, uint64_t stream, int threads) {
  check_threads(threads);
  if (out_array.ndim() != 1) throw std::invalid_argument("out must be a 1-D array");
  if (period < 1) throw std::invalid_argument("period must be >= 1");
  const int64_t count = out_array.shape(0);
  T* out = out_array.mutable_data();
  py::gil_scoped_release release;
  scatter_shuffle(out, count, period, [begin](int64_t j) { return static_cast<T>(begin + j); },
                  seed, stream, threads);
}

// out = a permutation of `values` tiled over len(out) values.
template <typename T>
void shuffle_tiled_into(py::array_t<T, py::array::c_style> out_array,
                        py::array_t<T, py::array::c_style> values, uint64_t seed, uint64_t stream,
                        int threads) {
  check_threads(threads);
  if (values.ndim() != 1 || out_array.ndim() != 1)
    throw std::invalid_argument("out and values must be 1-D arrays");
  const int64_t n = values.shape(0);
  if (n == 0) throw std::invalid_argument("values is empty");
  const int64_t count = out_array.shape(0);
  T* out = out_array.mutable_data();
  const T* in = values.data();
  py::gil_scoped_release release;
  scatter_shuffle(out, count, n, [in](int64_t j) { return in[j]; }, seed, stream, threads);
}

}  // namespace

void register_shuffle(py::module_& m) {
  // noconvert: `out` must be the caller's array itself, never a converted temporary copy.
  const char* range_doc = "fill out with a permutation of [begin, begin + period) tiled";
  const char* tiled_doc = "fill out with a permutation of values tiled";
#define OSP_SHUFFLE_DEFS(T)                                                                      \
  m.def("shuffle_range_into", &shuffle_range_into<T>, range_doc, py::arg("out").noconvert(),     \
        py::arg("begin"), py::arg("period"), py::arg("seed"), py::arg("stream"),                 \
        py::arg("threads"));                                                                     \
  m.def("shuffle_tiled_into", &shuffle_tiled_into<T>, tiled_doc, py::arg("out").noconvert(),     \
        py::arg("values").noconvert(), py::arg("seed"), py::arg("stream"), py::arg("threads"));
  OSP_SHUFFLE_DEFS(int32_t)
  OSP_SHUFFLE_DEFS(uint32_t)
  OSP_SHUFFLE_DEFS(int64_t)
#undef OSP_SHUFFLE_DEFS
}
