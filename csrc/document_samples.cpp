// The document index and the sample index in one build, equal to shuffle_{range,tiled}_into
// followed by build_sample_index (the same arrays, byte for byte) but with less memory traffic.
//
// Built separately, the sample index reads sizes[document_index[p]] for every position p: one
// random read of `sizes` per document, twice (tokens per chunk, then the walk). Here the tokens of
// each scatter-shuffle bucket are summed while the buckets are counted, where the documents are
// still read in order, so every bucket's first flat token is known before any bucket is shuffled;
// then one task per bucket shuffles it (Fisher-Yates, as scatter.h) and at once walks its sample
// boundaries (sample_walk.h) while its document ids are in cache. The random reads of `sizes` drop
// from two per document to one, and the document index is read once, right after it is written.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "sample_walk.h"
#include "scatter.h"

namespace py = pybind11;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// CPU seconds of the whole process (all threads, user + system) since `c`.
double cpu_since(std::clock_t c) { return static_cast<double>(std::clock() - c) / CLOCKS_PER_SEC; }

// One run of positions the walk handles as a unit: a bucket of one of the (one or two) shuffles.
struct Run {
  int part;            // which shuffle: 0 = positions [0, split_at), 1 = the rest
  int64_t bucket;      // bucket in that shuffle's plan
  int64_t begin, end;  // positions in document_index
  int64_t first;       // flat token where the run starts
  int64_t tokens;      // tokens of its documents
};

// document_index (out_docs, len n * num_epochs) = the n ids (values, or [begin, begin + n) when
// values is empty) tiled over the epochs, positions [0, split_at) shuffled with stream_a and the
// rest with stream_b; returns (sample index over it, stage timings: wall and process CPU seconds).
template <typename DocT, typename OutT>
py::tuple build_documents_and_samples(py::array_t<int32_t, py::array::c_style> sizes,
                                      py::array_t<DocT, py::array::c_style> out_docs,
                                      py::array_t<DocT, py::array::c_style> values, int64_t begin,
                                      int64_t n, int64_t split_at, uint64_t seed,
                                      uint64_t stream_a, uint64_t stream_b,
                                      int64_t sequence_length, int64_t num_epochs,
                                      int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                      bool add_extra_token_to_sequence, int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
  if (sequence_length < 1) throw std::invalid_argument("sequence_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1");
  if (n < 1) throw std::invalid_argument("no documents (n < 1)");
  if (sizes.ndim() != 1 || out_docs.ndim() != 1 || values.ndim() != 1)
    throw std::invalid_argument("sizes, out_docs and values must be 1-D arrays");
  int64_t count = 0;
  if (__builtin_mul_overflow(n, num_epochs, &count))
    throw std::overflow_error("documents * num_epochs overflows int64");
  if (out_docs.shape(0) != count)
    throw std::invalid_argument("out_docs has " + std::to_string(out_docs.shape(0)) +
                                " entries, expected documents * num_epochs = " + std::to_string(count));
  if (split_at < 0 || split_at > count)
    throw std::invalid_argument("split_at must lie in [0, " + std::to_string(count) + "]");
  const int64_t num_sizes = sizes.shape(0);
  const int32_t* size = sizes.data();
  const bool from_range = values.shape(0) == 0;
  const DocT* vals = values.data();
  if (from_range) {
    if (begin < 0 || begin > num_sizes - n)
      throw std::invalid_argument("documents [" + std::to_string(begin) + ", " +
                                  std::to_string(begin + n) + ") do not all index sizes (length " +
                                  std::to_string(num_sizes) + ")");
  } else {
    if (values.shape(0) != n) throw std::invalid_argument("values must hold n ids");
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = static_cast<int64_t>(vals[j]);
      if (v < 0 || v >= num_sizes)
        throw std::invalid_argument("documents[" + std::to_string(j) + "] = " + std::to_string(v) +
                                    " is not a valid index into sizes (length " +
                                    std::to_string(num_sizes) + ")");
    }
  }
  const int64_t extra = add_extra_token_to_sequence ? 1 : 0;
  const int64_t L = sequence_length;
  const int64_t num_samples =
      osp::count_samples(num_epochs, tokens_per_epoch, L, drop_last_partial_sequence, extra);
  py::array_t<OutT> result({num_samples + 1, int64_t{2}});
  OutT* out = result.mutable_data();
  DocT* docs = out_docs.mutable_data();

  double t_plan = 0, t_scatter = 0, t_walk = 0, c_plan = 0, c_scatter = 0, c_walk = 0;
  int64_t short_at_sample = -1;
  int64_t negative_doc = -1;  // a document with a negative size (checked as its size is summed)
  {
    py::gil_scoped_release release;
    auto build = [&](const auto& source) {
      std::atomic<bool> negative{false};
      auto weight = [&](int64_t j) -> int64_t {
        const int32_t s = size[static_cast<int64_t>(source(j))];
        if (s < 0) negative.store(true, std::memory_order_relaxed);
        return s;
      };
      const int64_t part_begin[2] = {0, split_at};
      const int64_t part_count[2] = {split_at, count - split_at};
      const uint64_t part_stream[2] = {stream_a, stream_b};
      std::vector<osp::ScatterPlan> plans(2);
      auto t = Clock::now();
      auto c = std::clock();
      for (int q = 0; q < 2; ++q)
        if (part_count[q] > 0)
          plans[q] = osp::plan_scatter(part_count[q], n, seed, part_stream[q], threads, weight);
      std::vector<Run> runs;
      int64_t total_tokens = 0;
      for (int q = 0; q < 2; ++q) {
        for (int64_t b = 0; b < plans[q].num_buckets; ++b) {
          const int64_t lo = part_begin[q] + plans[q].bucket_start[b];
          const int64_t hi = part_begin[q] + plans[q].bucket_start[b + 1];
          runs.push_back({q, b, lo, hi, total_tokens, plans[q].bucket_weight[b]});
          total_tokens += plans[q].bucket_weight[b];
        }
      }
      t_plan = seconds_since(t);
      c_plan = cpu_since(c);
      if (negative.load()) {
        for (int64_t j = 0; j < n && negative_doc < 0; ++j)
          if (size[static_cast<int64_t>(source(j))] < 0) negative_doc = static_cast<int64_t>(source(j));
        return;
      }
      t = Clock::now();
      c = std::clock();
      for (int q = 0; q < 2; ++q)
        if (part_count[q] > 0) osp::scatter(plans[q], docs + part_begin[q], n, source, threads);
      t_scatter = seconds_since(t);
      c_scatter = cpu_since(c);
      t = Clock::now();
      c = std::clock();
      osp::parallel_for(static_cast<int64_t>(runs.size()), threads, [&](int64_t r) {
        const Run& run = runs[r];
        osp::shuffle_bucket(plans[run.part], docs + part_begin[run.part], run.bucket);
        osp::walk_run(size, static_cast<const DocT*>(docs), run.begin, run.end, run.first,
                      run.first + run.tokens, L, extra, num_samples, out);
      });
      short_at_sample = osp::finish_walk(total_tokens, count - 1,
                                         size[static_cast<int64_t>(docs[count - 1])], L, extra,
                                         num_samples, out);
      t_walk = seconds_since(t);
      c_walk = cpu_since(c);
    };
    if (from_range) {
      build([begin](int64_t j) { return static_cast<DocT>(begin + j); });
    } else {
      build([vals](int64_t j) { return vals[j]; });
    }
  }
  if (negative_doc >= 0)
    throw std::invalid_argument("sizes must be >= 0, found " + std::to_string(size[negative_doc]) +
                                " at " + std::to_string(negative_doc));
  if (short_at_sample >= 0)
    throw std::invalid_argument(
        "the document index runs out of tokens at sample " + std::to_string(short_at_sample) + " of " +
        std::to_string(num_samples) +
        ": num_epochs * tokens_per_epoch exceeds the tokens the documents hold");
  py::dict timings;
  timings["plan_s"] = t_plan;
  timings["scatter_s"] = t_scatter;
  timings["shuffle_walk_s"] = t_walk;
  timings["plan_cpu_s"] = c_plan;
  timings["scatter_cpu_s"] = c_scatter;
  timings["shuffle_walk_cpu_s"] = c_walk;
  return py::make_tuple(result, timings);
}

}  // namespace

void register_document_samples(py::module_& m) {
  const char* doc = "fill out_docs with the document index and return (sample index, timings)";
#define OSP_FUSED_DEF(DocT, OutT, name)                                                          \
  m.def(name, &build_documents_and_samples<DocT, OutT>, doc, py::arg("sizes"),                 \
        py::arg("out_docs").noconvert(), py::arg("values").noconvert(), py::arg("begin"),        \
        py::arg("n"), py::arg("split_at"), py::arg("seed"), py::arg("stream_a"),                 \
        py::arg("stream_b"), py::arg("sequence_length"), py::arg("num_epochs"),                  \
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),                      \
        py::arg("add_extra_token_to_sequence"), py::arg("threads"));
  OSP_FUSED_DEF(int32_t, int64_t, "build_documents_and_samples_i32_i64")
  OSP_FUSED_DEF(int64_t, int64_t, "build_documents_and_samples_i64_i64")
  OSP_FUSED_DEF(int32_t, int32_t, "build_documents_and_samples_i32_i32")
  OSP_FUSED_DEF(int64_t, int32_t, "build_documents_and_samples_i64_i32")
#undef OSP_FUSED_DEF
}
