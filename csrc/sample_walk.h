// The sample-index walk over a run of document_index positions, shared by the standalone sample
// index builder (index_builders.cpp) and the fused document + sample index builder
// (document_samples.cpp).
//
// Sample k starts at flat token position k * L of the concatenated documents (in document_index
// order). Its boundary is stored as (position in document_index, offset in that document), using
// the first position whose document ends at or after the last token the previous sample reads
// (flat position k*L + extra - 1). Given the flat token where a run of positions starts (`first`)
// and ends (`last`), the run emits exactly the boundaries k with first < k*L + extra <= last, so
// runs of any length, walked in any order, give the serial walk's result.

#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace osp {

constexpr int64_t kPrefetch = 64;  // positions ahead to prefetch sizes[] (a random read each)

// Number of samples of `sequence_length` tokens in `num_epochs * tokens_per_epoch` tokens, when a
// sample reads `extra` more token than it consumes (the label of its last position).
inline int64_t count_samples(int64_t num_epochs, int64_t tokens_per_epoch, int64_t sequence_length,
                             bool drop_last_partial_sequence, int64_t extra) {
  int64_t total = 0;
  if (__builtin_mul_overflow(num_epochs, tokens_per_epoch, &total))
    throw std::overflow_error("num_epochs * tokens_per_epoch overflows int64");
  const int64_t usable = total - extra;
  if (usable <= 0) return 0;
  if (drop_last_partial_sequence) return usable / sequence_length;
  return (usable + sequence_length - 1) / sequence_length;  // exact ceil, no float rounding
}

// First sample k >= 1 whose needed position k*L + extra exceeds `tokens`.
inline int64_t first_sample_beyond(int64_t tokens, int64_t L, int64_t extra) {
  const int64_t r = tokens - extra;
  return r < 0 ? int64_t{1} : std::max<int64_t>(1, r / L + 1);
}

// Emits the boundaries of the positions [begin, end) whose documents hold flat tokens
// (first, last]; docs[p] must index size[] for every p in the run (checked by the caller).
template <typename DocT, typename OutT>
void walk_run(const int32_t* size, const DocT* docs, int64_t begin, int64_t end, int64_t first,
              int64_t last, int64_t L, int64_t extra, int64_t num_samples, OutT* out) {
  int64_t p = begin;         // position in document_index
  int64_t doc_start = first;  // flat token position where that document starts
  for (int64_t k = first_sample_beyond(first, L, extra); k <= num_samples; ++k) {
    const int64_t needed = k * L + extra;  // tokens that must have been read
    if (needed > last) break;
    for (;;) {
      if (p + kPrefetch < end) __builtin_prefetch(size + static_cast<int64_t>(docs[p + kPrefetch]));
      const int64_t len = size[static_cast<int64_t>(docs[p])];
      if (doc_start + len >= needed) break;
      doc_start += len;
      ++p;
    }
    out[2 * k] = static_cast<OutT>(p);
    out[2 * k + 1] = static_cast<OutT>(needed - extra - doc_start);
  }
}

// After every run: the samples that need more tokens than the documents hold. Only the final,
// partial one may (it ends at the last document, as in Megatron's walk); returns the first sample
// that finds the documents exhausted too early, or -1.
template <typename OutT>
int64_t finish_walk(int64_t total_tokens, int64_t last_position, int64_t last_size, int64_t L,
                    int64_t extra, int64_t num_samples, OutT* out) {
  out[0] = 0;
  out[1] = 0;
  const int64_t beyond = first_sample_beyond(total_tokens, L, extra);
  if (beyond < num_samples) return beyond;
  if (beyond == num_samples) {
    out[2 * num_samples] = static_cast<OutT>(last_position);
    out[2 * num_samples + 1] = static_cast<OutT>(last_size - extra);
  }
  return -1;
}

}  // namespace osp
