// Parallel, thread-count-independent shuffles: the document index over epochs and the shuffle
// index (a permutation of the samples).
//
// Algorithm: the scatter shuffle of scatter.h (bucket by a counter-based hash, then Fisher-Yates
// per bucket). Chunks and buckets depend only on the input length, so the result is the same for 1
// or 64 threads. The input is virtual (a range, or an array tiled over epochs), so no second buffer
// of the output's size is ever allocated.
//
// The permutation is NOT numpy's RandomState.shuffle: a seed gives a different (equally uniform)
// order than Megatron-Core's document and shuffle indices.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "scatter.h"

namespace py = pybind11;

namespace {

// Writes into out[0, count) a uniform random permutation of value(i) for i in [0, count), where
// the values come from `source(j)` with j = i mod period.
template <typename T, typename Source>
void scatter_shuffle(T* out, int64_t count, int64_t period, const Source& source, uint64_t seed,
                     uint64_t stream, int threads) {
  if (count <= 0) return;
  osp::ScatterPlan plan = osp::plan_scatter(count, period, seed, stream, threads, nullptr);
  osp::scatter(plan, out, period, source, threads);
  osp::parallel_for(plan.num_buckets, threads, [&](int64_t b) { osp::shuffle_bucket(plan, out, b); });
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
