"""The learning-rate and weight-decay schedule of a run: Megatron-Core's OptimizerParamScheduler
from ``train`` (warmup, decay style, WSD decay fraction) and ``optimizer`` (peak LR, min LR ratio,
weight decay) settings; the LR rises from 0 over ``train.warmup_steps`` and decays until
``train.train_steps``, the weight decay is constant."""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(config, optimizer) -> OptimizerParamScheduler:
    opt, train = config.optimizer, config.train
    decay_style = "WSD" if train.decay_style == "wsd" else train.decay_style
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.lr * opt.min_lr_ratio,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=train.train_steps,
        lr_decay_style=decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=train.train_steps,
        wd_incr_style="constant",
        wsd_decay_steps=int(train.train_steps * train.wsd_decay_fraction) if decay_style == "WSD" else None,
        lr_wsd_decay_style="cosine" if decay_style == "WSD" else None,
    )
