// Blending indices: which dataset, and which of its samples, each sample of a blend reads.
//
// Both builders make the same greedy choice as Megatron-Core's helpers (build_blending_indices,
// build_exhaustive_blending_indices), with the same double arithmetic and tie-breaking (lowest
// dataset id wins), so a blend reads exactly the samples Megatron-Core's would. They are serial by
// nature (each choice depends on all earlier ones); the loop runs without the GIL.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxDatasets = 32767;  // dataset ids are stored as int16

// `size` samples; at each step the dataset furthest below its weighted share is chosen.
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> blending_indices(
    py::array_t<double, py::array::c_style> weights_array, int64_t size) {
  if (weights_array.ndim() != 1) throw std::invalid_argument("weights must be a 1-D array");
  const int64_t n = weights_array.shape(0);
  if (n < 1 || n > kMaxDatasets)
    throw std::invalid_argument("weights must have 1 to 32767 entries, got " + std::to_string(n));
  if (size < 0) throw std::invalid_argument("size must be >= 0, got " + std::to_string(size));
  std::vector<double> weights(weights_array.data(), weights_array.data() + n);
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(static_cast<size_t>(n), 0);
    for (int64_t k = 0; k < size; ++k) {
      const double progress = std::max(static_cast<double>(k), 1.0);
      int64_t best = 0;
      double best_error = weights[0] * progress - static_cast<double>(taken[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double error = weights[d] * progress - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[k] = static_cast<int16_t>(best);
      within[k] = taken[best]++;
    }
  }
  return {dataset_index, dataset_sample_index};
}

// Exactly sizes[d] samples from dataset d, interleaved in proportion to the sizes.
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> exhaustive_blending_indices(
    py::array_t<int64_t, py::array::c_style> sizes_array) {
  if (sizes_array.ndim() != 1) throw std::invalid_argument("sizes must be a 1-D array");
  const int64_t n = sizes_array.shape(0);
  if (n < 1 || n > kMaxDatasets)
    throw std::invalid_argument("sizes must have 1 to 32767 entries, got " + std::to_string(n));
  const int64_t* sizes = sizes_array.data();
  int64_t total = 0;
  for (int64_t d = 0; d < n; ++d) {
    if (sizes[d] < 1)
      throw std::invalid_argument("sizes[" + std::to_string(d) + "] = " + std::to_string(sizes[d]) +
                                  " must be >= 1");
    if (__builtin_add_overflow(total, sizes[d], &total))
      throw std::overflow_error("sum of sizes overflows int64");
  }
  py::array_t<int16_t> dataset_index(total);
  py::array_t<int64_t> dataset_sample_index(total);
  int16_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<double> weights(static_cast<size_t>(n));
    for (int64_t d = 0; d < n; ++d) weights[d] = sizes[d] / static_cast<double>(total);
    std::vector<int64_t> taken(static_cast<size_t>(n), 0);
    std::vector<int64_t> unspent(static_cast<size_t>(n));  // ascending ids, like Megatron's std::set
    for (int64_t d = 0; d < n; ++d) unspent[d] = d;
    for (int64_t k = 0; !unspent.empty(); ++k) {
      const double progress = std::max(static_cast<double>(k), 1.0);
      int64_t best = -1;
      size_t best_slot = 0;
      double best_error = std::numeric_limits<double>::lowest();
      for (size_t s = 0; s < unspent.size(); ++s) {
        const int64_t d = unspent[s];
        const double error = weights[d] * progress - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
          best_slot = s;
        }
      }
      which[k] = static_cast<int16_t>(best);
      within[k] = taken[best]++;
      if (taken[best] == sizes[best]) unspent.erase(unspent.begin() + best_slot);
    }
  }
  return {dataset_index, dataset_sample_index};
}

}  // namespace

void register_blending(py::module_& m) {
  m.def("blending_indices", &blending_indices,
        "(dataset_index int16, dataset_sample_index int64) of `size` weighted samples",
        py::arg("weights"), py::arg("size"));
  m.def("exhaustive_blending_indices", &exhaustive_blending_indices,
        "(dataset_index int16, dataset_sample_index int64) taking exactly sizes[d] from dataset d",
        py::arg("sizes"));
}
