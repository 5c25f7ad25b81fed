"""The versions a report records (analysis/report_resume.software_versions) must not need what the
tool does not: the README's quickstart installs megatron-osp without transformers, and its 4-bit
evaluation of Megatron checkpoints failed on `import transformers` once the versions were recorded."""

import sys

from megatron_osp.analysis.report_resume import software_versions


def test_versions_are_recorded_without_transformers(monkeypatch):
    import torch

    import megatron_osp

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    versions = software_versions()
    assert versions == {"megatron_osp": megatron_osp.__version__, "torch": torch.__version__, "transformers": None}


def test_an_installed_transformers_is_recorded():
    import transformers

    assert software_versions()["transformers"] == transformers.__version__
