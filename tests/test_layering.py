"""Layers import downwards only: data -> models -> metrics/optimizer -> training -> analysis/convert -> tools.

The pretrain loop measures the kurtosis metric during runs; the metric lives in megatron_osp.metrics
(re-exported by megatron_osp.analysis), so importing training loads nothing of the analysis package."""

import subprocess
import sys


def test_training_does_not_import_analysis():
    code = (
        "import sys, megatron_osp.training.loop, megatron_osp.training.pretrain\n"
        "up = sorted(m for m in sys.modules if m.startswith(('megatron_osp.analysis', 'megatron_osp.convert')))\n"
        "print(up); assert not up, up\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_analysis_reexports_the_metric():
    from megatron_osp.analysis import kurtosis as analysis_kurtosis
    from megatron_osp.metrics import kurtosis

    names = ("HiddenStateRecorder", "KurtosisReport", "excess_kurtosis", "measure_kurtosis", "token_excess_kurtosis")
    for name in names:
        assert getattr(analysis_kurtosis, name) is getattr(kurtosis, name)
