// Data-index builders for megatron-osp (pybind11).
//
// Everything is int64: a trillion-token corpus has more than 2^31 documents and more than 2^32
// samples, which overflow the int32 counters of Megatron-Core's helpers. The GIL is released while
// the loops run, so data-loading threads keep going. Shuffles live in shuffle.cpp, blending in
// blending.cpp, the fused document + sample index in document_samples.cpp; this file holds the
// sample index and the module definition.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "sample_walk.h"

namespace py = pybind11;

namespace {

// The sample index over a given document_index (boundaries as in sample_walk.h).
//
// Two passes over fixed chunks of document_index, each parallel over chunks: (A) tokens per
// chunk, then a prefix sum gives every chunk's first flat token; (B) each chunk emits the
// boundaries that fall inside it. The result equals the serial walk exactly, for any thread count.
constexpr int64_t kSampleChunk = int64_t{1} << 20;  // document_index positions per chunk
using osp::count_samples;
using osp::kPrefetch;

// The single-threaded walk; same result and errors as the chunked passes below.
template <typename DocIndexT>
void serial_walk(const int32_t* size, uint64_t num_sizes, const DocIndexT* docs, int64_t num_docs,
                 int64_t L, int64_t extra, int64_t num_samples, int64_t* out, int64_t& bad_doc_pos,
                 int64_t& short_at_sample) {
  out[0] = 0;
  out[1] = 0;
  int64_t p = 0;          // position in document_index
  int64_t doc_start = 0;  // flat token position where that document starts
  for (int64_t k = 1; k <= num_samples; ++k) {
    const int64_t needed = k * L + extra;
    for (;;) {
      if (p + kPrefetch < num_docs) {
        const uint64_t ahead = static_cast<uint64_t>(static_cast<int64_t>(docs[p + kPrefetch]));
        if (ahead < num_sizes) __builtin_prefetch(size + ahead);
      }
      const uint64_t doc = static_cast<uint64_t>(static_cast<int64_t>(docs[p]));
      if (doc >= num_sizes) { bad_doc_pos = p; return; }
      const int64_t len = size[doc];
      if (doc_start + len >= needed) break;
      if (p == num_docs - 1) {  // out of documents: legal only for the final, partial sample
        if (k != num_samples) { short_at_sample = k; return; }
        out[2 * k] = p;
        out[2 * k + 1] = len - extra;
        return;
      }
      doc_start += len;
      ++p;
    }
    out[2 * k] = p;
    out[2 * k + 1] = needed - extra - doc_start;
  }
  for (p = num_samples >= 1 ? p + 1 : 0; p < num_docs; ++p) {  // ids the walk did not reach
    if (static_cast<uint64_t>(static_cast<int64_t>(docs[p])) >= num_sizes) { bad_doc_pos = p; return; }
  }
}

template <typename DocIndexT>
py::array_t<int64_t> build_sample_index(py::array_t<int32_t, py::array::c_style> sizes,
                                        py::array_t<DocIndexT, py::array::c_style> document_index,
                                        int64_t sequence_length, int64_t num_epochs,
                                        int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                        bool add_extra_token_to_sequence, int threads) {
  if (sequence_length < 1) throw std::invalid_argument("sequence_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  if (document_index.ndim() != 1 || sizes.ndim() != 1)
    throw std::invalid_argument("sizes and document_index must be 1-D arrays");
  const int64_t num_docs = document_index.shape(0);
  if (num_docs == 0) throw std::invalid_argument("document_index is empty");
  const int64_t extra = add_extra_token_to_sequence ? 1 : 0;
  const int64_t num_samples = count_samples(num_epochs, tokens_per_epoch, sequence_length,
                                            drop_last_partial_sequence, extra);
  const int64_t L = sequence_length;

  py::array_t<int64_t> result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  const int32_t* size = sizes.data();
  const DocIndexT* docs = document_index.data();
  const uint64_t num_sizes = static_cast<uint64_t>(sizes.shape(0));
  const int64_t num_chunks = (num_docs + kSampleChunk - 1) / kSampleChunk;

  // Errors are recorded inside the GIL-free loops and raised after them (no Python calls there).
  int64_t bad_doc_pos = -1;       // first position in document_index of an out-of-range id
  int64_t short_at_sample = -1;   // sample that found the documents exhausted too early
  {
    py::gil_scoped_release release;
    if (threads == 1 || num_chunks == 1) {
      // One pass: the serial walk reads each size once (the chunked passes read it twice).
      serial_walk(size, num_sizes, docs, num_docs, L, extra, num_samples, out, bad_doc_pos,
                  short_at_sample);
    } else {
    std::vector<int64_t> chunk_tokens(static_cast<size_t>(num_chunks), 0);
    std::vector<int64_t> chunk_bad(static_cast<size_t>(num_chunks), -1);
    osp::parallel_for(num_chunks, threads, [&](int64_t c) {
      const int64_t begin = c * kSampleChunk, end = std::min(num_docs, begin + kSampleChunk);
      int64_t total = 0;
      for (int64_t p = begin; p < end; ++p) {
        if (p + kPrefetch < end) {
          const uint64_t ahead = static_cast<uint64_t>(static_cast<int64_t>(docs[p + kPrefetch]));
          if (ahead < num_sizes) __builtin_prefetch(size + ahead);
        }
        const uint64_t doc = static_cast<uint64_t>(static_cast<int64_t>(docs[p]));
        if (doc >= num_sizes) { chunk_bad[c] = p; return; }
        total += size[doc];
      }
      chunk_tokens[c] = total;
    });
    for (int64_t c = 0; c < num_chunks && bad_doc_pos < 0; ++c) bad_doc_pos = chunk_bad[c];
    if (bad_doc_pos < 0) {
      std::vector<int64_t> chunk_start(static_cast<size_t>(num_chunks), 0);
      int64_t total_tokens = 0;  // < 2^31 * num_docs <= 2^62 + ..., cannot overflow for real data
      for (int64_t c = 0; c < num_chunks; ++c) {
        chunk_start[c] = total_tokens;
        total_tokens += chunk_tokens[c];
      }
      osp::parallel_for(num_chunks, threads, [&](int64_t c) {
        const int64_t begin = c * kSampleChunk, end = std::min(num_docs, begin + kSampleChunk);
        osp::walk_run(size, docs, begin, end, chunk_start[c], chunk_start[c] + chunk_tokens[c], L,
                      extra, num_samples, out);
      });
      short_at_sample = osp::finish_walk(total_tokens, num_docs - 1,
                                         size[static_cast<int64_t>(docs[num_docs - 1])], L, extra,
                                         num_samples, out);
    }
    }
  }
  if (bad_doc_pos >= 0)
    throw std::invalid_argument("document_index[" + std::to_string(bad_doc_pos) + "] = " +
                                std::to_string(static_cast<int64_t>(docs[bad_doc_pos])) +
                                " is not a valid index into sizes (length " +
                                std::to_string(num_sizes) + ")");
  if (short_at_sample >= 0)
    throw std::invalid_argument(
        "document_index runs out of tokens at sample " + std::to_string(short_at_sample) + " of " +
        std::to_string(num_samples) +
        ": num_epochs * tokens_per_epoch exceeds the tokens the documents hold");
  return result;
}

}  // namespace

void register_shuffle(py::module_& m);   // shuffle.cpp
void register_blending(py::module_& m);  // blending.cpp
void register_document_samples(py::module_& m);  // document_samples.cpp

PYBIND11_MODULE(_index_builders, m) {
  m.doc() = "int64 data-index builders for megatron-osp";
  register_shuffle(m);
  register_blending(m);
  register_document_samples(m);
  m.def("build_sample_index_i32", &build_sample_index<int32_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),
        py::arg("add_extra_token_to_sequence"), py::arg("threads") = 1);
  m.def("build_sample_index_i64", &build_sample_index<int64_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),
        py::arg("add_extra_token_to_sequence"), py::arg("threads") = 1);
  // Megatron-Core's name and argument order; overload resolution picks the document_index dtype.
  m.def("build_sample_idx", &build_sample_index<int32_t>, py::arg("sizes"),
        py::arg("document_index").noconvert(), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = true, py::arg("threads") = 1);
  m.def("build_sample_idx", &build_sample_index<int64_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = true, py::arg("threads") = 1);
  m.def("count_samples", &count_samples, py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("sequence_length"), py::arg("drop_last_partial_sequence"), py::arg("extra"));
}
