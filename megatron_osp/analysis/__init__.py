"""Analysis tools: the paper's outlier metric (excess kurtosis), activation statistics, and the 4-bit
quantization evaluation (fake quantization, Hadamard/QuaRot rotations, GPTQ, perplexity).

Modules: kurtosis.py (the metric and hidden-state recorder, re-exported from megatron_osp.metrics),
activation_stats.py (per-point kurtosis, max |x|, outlier channels), model_parts.py (one structural
view of Megatron and HF Llama models), quantization.py (RTN fake quant, W-A-KV settings),
hadamard.py, rotation.py, gptq.py, evaluation.py (perplexity, settings applied in place),
weight_error.py (which roles' 4-bit weight rounding costs what, and why), quant_report.py, plots.py,
loading.py, compare.py (run tables).
"""

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
