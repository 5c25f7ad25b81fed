"""Metrics that training measures during a run and analysis reads afterwards.

A layer below training (data -> models -> metrics/optimizer -> training -> analysis/convert -> tools),
so the pretrain loop does not import the analysis package. kurtosis.py: the paper's excess-kurtosis
outlier metric, the hidden-state recorder and its report (re-exported by megatron_osp.analysis).
"""
