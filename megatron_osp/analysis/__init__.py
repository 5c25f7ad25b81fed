"""Analysis tools: the outlier (excess kurtosis) metric of Outlier-Safe Pre-Training."""

from megatron_osp.analysis.kurtosis import (
    HiddenStateRecorder,
    KurtosisReport,
    excess_kurtosis,
    measure_kurtosis,
    token_excess_kurtosis,
)

__all__ = [
    "HiddenStateRecorder",
    "KurtosisReport",
    "excess_kurtosis",
    "measure_kurtosis",
    "token_excess_kurtosis",
]
