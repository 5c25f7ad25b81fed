// Data-index builders for megatron-osp (pybind11).
//
// Everything is int64: a trillion-token corpus has more than 2^31 documents and more than 2^32
// samples, which overflow the int32 counters of Megatron-Core's helpers. The GIL is released while
// the loops run, so data-loading threads keep going.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

// Number of samples of `sequence_length` tokens in `num_epochs * tokens_per_epoch` tokens, when a
// sample reads `extra` more token than it consumes (the label of its last position).
int64_t count_samples(int64_t num_epochs, int64_t tokens_per_epoch, int64_t sequence_length,
                      bool drop_last_partial_sequence, int64_t extra) {
  int64_t total = 0;
  if (__builtin_mul_overflow(num_epochs, tokens_per_epoch, &total))
    throw std::overflow_error("num_epochs * tokens_per_epoch overflows int64");
  const int64_t usable = total - extra;
  if (usable <= 0) return 0;
  if (drop_last_partial_sequence) return usable / sequence_length;
  return (usable + sequence_length - 1) / sequence_length;  // exact ceil, no float rounding
}

// Sample k starts at flat token position k * L of the concatenated documents (in document_index
// order). Its boundary is stored as (position in document_index, offset in that document), using
// the document that holds the last token the previous sample reads: position k*L + extra - 1.
template <typename DocIndexT>
py::array_t<int64_t> build_sample_index(py::array_t<int32_t, py::array::c_style> sizes,
                                        py::array_t<DocIndexT, py::array::c_style> document_index,
                                        int64_t sequence_length, int64_t num_epochs,
                                        int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                                        bool add_extra_token_to_sequence) {
  if (sequence_length < 1) throw std::invalid_argument("sequence_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1");
  if (document_index.ndim() != 1 || sizes.ndim() != 1)
    throw std::invalid_argument("sizes and document_index must be 1-D arrays");
  const int64_t num_docs = document_index.shape(0);
  if (num_docs == 0) throw std::invalid_argument("document_index is empty");
  const int64_t extra = add_extra_token_to_sequence ? 1 : 0;
  const int64_t num_samples = count_samples(num_epochs, tokens_per_epoch, sequence_length,
                                            drop_last_partial_sequence, extra);

  py::array_t<int64_t> result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  const int32_t* size = sizes.data();
  const DocIndexT* docs = document_index.data();
  const int64_t num_sizes = sizes.shape(0);

  // Errors are recorded inside the GIL-free loop and raised after it (no Python calls there).
  int64_t bad_doc_pos = -1;       // position in document_index of an out-of-range document id
  int64_t short_at_sample = -1;   // sample that found the documents exhausted too early
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;    // position in document_index
    int64_t doc_start = 0;  // flat token position where that document starts
    out[0] = 0;
    out[1] = 0;
    for (int64_t k = 1; k <= num_samples; ++k) {
      const int64_t needed = k * sequence_length + extra;  // tokens that must have been read
      int64_t offset = -1;
      for (;;) {
        const int64_t doc = static_cast<int64_t>(docs[doc_pos]);
        if (doc < 0 || doc >= num_sizes) { bad_doc_pos = doc_pos; break; }
        const int64_t len = size[doc];
        if (doc_start + len >= needed) { offset = needed - extra - doc_start; break; }
        if (doc_pos == num_docs - 1) {
          // Out of documents: legal only for the final, partial sample (Megatron asserts this).
          if (k != num_samples) short_at_sample = k;
          offset = len - extra;
          break;
        }
        doc_start += len;
        ++doc_pos;
      }
      if (bad_doc_pos >= 0 || short_at_sample >= 0) break;
      out[2 * k] = doc_pos;
      out[2 * k + 1] = offset;
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

PYBIND11_MODULE(_index_builders, m) {
  m.doc() = "int64 data-index builders for megatron-osp";
  m.def("build_sample_index_i32", &build_sample_index<int32_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),
        py::arg("add_extra_token_to_sequence"));
  m.def("build_sample_index_i64", &build_sample_index<int64_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),
        py::arg("add_extra_token_to_sequence"));
  // Megatron-Core's name and argument order; overload resolution picks the document_index dtype.
  m.def("build_sample_idx", &build_sample_index<int32_t>, py::arg("sizes"),
        py::arg("document_index").noconvert(), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = true);
  m.def("build_sample_idx", &build_sample_index<int64_t>, py::arg("sizes"),
        py::arg("document_index"), py::arg("sequence_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token_to_sequence") = true);
  m.def("count_samples", &count_samples, py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("sequence_length"), py::arg("drop_last_partial_sequence"), py::arg("extra"));
}
