"""Excess kurtosis of hidden states, the outlier metric of Outlier-Safe Pre-Training (Park et al. 2025).

Defined in ``megatron_osp.metrics.kurtosis`` (a layer below training, which measures it during
runs); re-exported here so analysis code and its users keep one import path.
"""

from megatron_osp.metrics.kurtosis import (  # noqa: F401 - the private helpers serve activation_stats
    HiddenStateRecorder,
    KurtosisReport,
    _Accumulator,
    _as_tensor,
    _first_tensor,
    _relu_kurtosis,
    excess_kurtosis,
    measure_kurtosis,
    token_excess_kurtosis,
)

__all__ = [
    "token_excess_kurtosis",
    "excess_kurtosis",
    "HiddenStateRecorder",
    "KurtosisReport",
    "measure_kurtosis",
]
