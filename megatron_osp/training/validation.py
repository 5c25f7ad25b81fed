"""One place that refuses configuration values that cannot work, by field and value, before any work.

Three stages, each run as soon as what it needs is known, and all before a model is built:

- ``check_section`` (from ``load_config``, on each section before its dataclass is constructed):
  every field's range, e.g. ``train.global_batch_size=0: must be >= 1``. ``RULES`` has one entry per
  field of every settings dataclass; a test fails when a new field has none.
- ``check_relations`` (from ``load_config``, on the whole RunConfig): values that must agree, e.g.
  ``train.global_batch_size`` a multiple of ``train.micro_batch_size``, ``model.hidden_size``
  divisible by ``model.num_attention_heads``, ``train.warmup_steps < train.train_steps``, the
  tensor/pipeline sizes against the model's heads, query groups, FFN width and layers (PP x virtual
  pipeline size dividing the layers, a virtual pipeline only with PP > 1), and
  ``train.recompute_method``/``recompute_num_layers`` only with ``train.recompute=full``, fitting a
  pipeline stage's layers; settings that would do nothing are refused too (``train.exit_at_step``
  or the end of ``train.profile_steps`` past ``train.train_steps``, sequence parallelism at TP 1, a
  non-default ``train.wsd_decay_fraction`` without ``train.decay_style=wsd``, ``data.valid_weights``
  without ``data.valid_paths``, and beside ``data.valid_paths`` a ``data.split`` holding out documents).
- ``check_world`` and data_checks.py's ``check_data_settings`` (from the Trainer, once the world size
  is known and before the process groups, datasets and model exist): TP x PP divides the world, the
  global batch divides into micro-batches x data-parallel ranks (with virtual pipeline stages, a
  multiple of PP micro-batches per step, as Megatron-Core's interleaved schedule needs); the data
  files and tokenizer exist, the tokenizer's vocabulary fits ``model.vocab_size`` and it has an
  end-of-document id, and the data were made with that tokenizer. The Trainer
  first runs ``check_config`` (ranges and relations) for a RunConfig built in code. What the machine
  cannot run (bf16 on CPU, a missing Transformer Engine or Triton) is platform_checks.py's.

Every problem found in a stage is reported at once, one line each, as a ``ConfigError`` (a
ValueError), so a user fixes a config in one round. The token ids inside the data files are checked
when the datasets open (``megatron_osp.data.token_range``).
"""

from __future__ import annotations

import math

from megatron_osp.models.layer_specs import BACKENDS
from megatron_osp.models.ssnorm import SSNORM_KERNELS
from megatron_osp.optimizer.builder import OPTIMIZERS
from megatron_osp.optimizer.muon import LR_SCALES
from megatron_osp.optimizer.newton_schulz import BACKENDS as NS_BACKENDS
from megatron_osp.optimizer.newton_schulz import COEFFICIENTS
from megatron_osp.training.field_rules import (
    Rule, boolean, choice, integer, is_number, number, optional, path, path_problem, unset_or_text)

DECAY_STYLES = ("cosine", "linear", "wsd", "constant")
QKV_SPLITS = ("qkv", "per_head", "none")
NORMALIZATIONS = ("rmsnorm", "ssnorm")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# train.wsd_decay_fraction's default (config.py uses it). Saved run configs hold every field, so a
# value equal to it cannot be told from the default; any other value was set on purpose.
WSD_DECAY_FRACTION = 0.2
_SEED_LIMIT = 2**32  # numpy's seed range


class ConfigError(ValueError):
    """Configuration values (or combinations) that cannot work; each problem names field and value.

    ``problems`` holds one line per problem, ``source`` where the values came from (a file,
    "command line"); the message is ``source: problem`` or a list of them."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = prefix + self.problems[0]
        else:
            message = prefix + f"{len(self.problems)} invalid settings:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


def _fail(problems: list[str], source: str | None = None) -> None:
    if problems:
        raise ConfigError(problems, source)


# ------------------------------------------------------------------------------ rules per field
# The rule builders (integer, number, choice, ...) are field_rules.py's.


def _paths(v):
    if not isinstance(v, list):
        return "must be a list of dataset prefixes"
    bad = [i for i, p in enumerate(v) if not isinstance(p, str) or not p.strip()]
    if bad:
        return f"entry {bad[0]} must be a non-empty path"
    return next((f"entry {i} ({p!r}) {path_problem(p)}" for i, p in enumerate(v) if path_problem(p)), None)


def _weights(v):
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        return "must be a non-empty list of numbers (or null for weights by size)"
    for i, w in enumerate(v):
        if not is_number(w) or not math.isfinite(w) or w <= 0:  # the blend refuses 0 (normalize_weights)
            return f"entry {i} ({w!r}) must be a finite number > 0 (leave a dataset out of data.paths to skip it)"
    return None


def _valid_paths(v):
    return None if v is None else ("must be a non-empty list of dataset prefixes (or null: validate on "
                                   "data.split's share)" if v == [] else _paths(v))


def _split(v):
    from megatron_osp.data.gpt_dataset import parse_split

    try:
        parse_split(v)
    except ValueError:
        return "must be 1 to 3 comma-separated non-negative shares with a positive sum, e.g. '98,2,0'"
    return None


def _step_range(v):
    from megatron_osp.training.profiling import parse_step_range

    try:
        parse_step_range(v)
    except ValueError:
        return "must be START-END (training steps, 1 <= START <= END, e.g. '2-3') or one step N"
    return None


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
PROBABILITY_OPEN = number(0.0, 1.0, hi_open=True)  # dropout, betas, momentum: [0, 1)

RULES: dict[str, dict[str, Rule]] = {
    "model": {
        "num_layers": POSITIVE,
        "hidden_size": POSITIVE,
        "num_attention_heads": POSITIVE,
        "num_query_groups": optional(POSITIVE),
        "ffn_hidden_size": POSITIVE,
        "vocab_size": POSITIVE,
        "make_vocab_size_divisible_by": POSITIVE,
        "seq_length": POSITIVE,
        "rotary_base": POSITIVE,
        "normalization": choice(NORMALIZATIONS),
        "ssnorm_kernel": choice(tuple(SSNORM_KERNELS)),
        "embedding_projection": boolean,
        "qk_layernorm": boolean,
        "untie_embeddings_and_output_weights": boolean,
        "init_method_std": number(0.0, lo_open=True),
        "layernorm_epsilon": number(0.0, lo_open=True),
        "hidden_dropout": PROBABILITY_OPEN,
        "attention_dropout": PROBABILITY_OPEN,
        "transformer_impl": choice(BACKENDS),
    },
    "parallel": {
        "tensor_parallel_size": POSITIVE,
        "pipeline_parallel_size": POSITIVE,
        "virtual_pipeline_size": POSITIVE,
        "sequence_parallel": boolean,
    },
    "optimizer": {
        "name": choice(OPTIMIZERS),
        "lr": number(0.0, lo_open=True),
        "min_lr_ratio": number(0.0, 1.0),
        "weight_decay": number(0.0),
        "adam_beta1": PROBABILITY_OPEN,
        "adam_beta2": PROBABILITY_OPEN,
        "adam_eps": number(0.0, lo_open=True),
        "clip_grad": number(0.0, what="must be >= 0 (0 = no clipping)"),
        "muon_lr": optional(number(0.0, lo_open=True)),
        "muon_momentum": PROBABILITY_OPEN,
        "muon_ns_steps": POSITIVE,
        "muon_coefficients": choice(sorted(COEFFICIENTS)),
        "muon_qkv_split": choice(QKV_SPLITS),
        "muon_lr_scale": choice(LR_SCALES),
        "muon_ns_backend": choice(NS_BACKENDS),
        "distributed_optimizer": boolean,
        "overlap_grad_reduce": boolean,
        "overlap_param_gather": boolean,
        "early_newton_schulz": boolean,
        "grad_reduce_dtype": choice(("fp32", "bf16")),
        "bucket_size": POSITIVE,
        "round_size": optional(POSITIVE),
        "delivery": choice(("direct", "relay", "auto")),
    },
    "data": {
        "paths": _paths,
        "weights": _weights,
        "split": _split,
        "valid_paths": _valid_paths,
        "valid_weights": lambda v: (_weights(v) or "").replace("data.paths", "data.valid_paths") or None,
        "tokenizer_model": optional(path),
        "eod_id": optional(NON_NEGATIVE),
        "cache_dir": optional(path),
        # Never used: samples are read by the training process (kept so older run configs load).
        "num_workers": lambda v: None if v == 0 and v is not False else "must be 0 (samples are read by the training process)",
    },
    "train": {
        "train_steps": POSITIVE,
        "global_batch_size": POSITIVE,
        "micro_batch_size": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
        "decay_style": choice(DECAY_STYLES),
        "wsd_decay_fraction": number(0.0, 1.0),
        "seed": integer(0, _SEED_LIMIT),
        "bf16": optional(boolean),
        "log_interval": POSITIVE,
        "eval_interval": NON_NEGATIVE,
        "eval_batches": POSITIVE,
        "kurtosis_interval": NON_NEGATIVE,
        "kurtosis_batches": POSITIVE,
        "run_dir": path,
        "tensorboard": boolean,
        "wandb_project": unset_or_text,
        "wandb_entity": unset_or_text,
        "wandb_name": unset_or_text,
        "wandb_dir": lambda v: unset_or_text(v) or (v and path_problem(v)),
        "progress_bar": boolean,
        "save": boolean,
        "save_dir": optional(path),
        "save_interval": NON_NEGATIVE,
        "keep_last": NON_NEGATIVE,
        "async_save": boolean,
        "load": optional(path),
        "load_weights_only": boolean,
        "auto_resume": boolean,
        "exit_at_step": NON_NEGATIVE,
        "exit_after_minutes": number(0.0, what="must be >= 0 (0 = off)"),
        "save_on_sigterm": boolean,
        "hang_timeout_minutes": number(0.0, what="must be >= 0 (0 = off)"),
        "profile_steps": optional(_step_range),
        "recompute": choice(RECOMPUTE),
        "recompute_method": optional(choice(RECOMPUTE_METHODS)),
        "recompute_num_layers": optional(POSITIVE),
    },
}


def section_problems(section: str, values: dict) -> list[str]:
    """Every field of ``section`` (all of them, defaults included) against its rule."""
    rules = RULES[section]
    problems = []
    for name, value in values.items():
        rule = rules.get(name)  # every field has one (tests/test_validation.py checks)
        reason = rule(value) if rule is not None else None
        if reason is not None:
            problems.append(f"{section}.{name}={value!r}: {reason}")
    return problems


def check_section(section: str, values: dict, source: str | None = None) -> None:
    _fail(section_problems(section, values), source)


# ------------------------------------------------------------------------------ relations
def relation_problems(config) -> list[str]:
    """What must agree between values of one RunConfig (no world size, files or tokenizer needed)."""
    m, p, t = config.model, config.parallel, config.train
    problems = []
    if m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    elif (m.hidden_size // m.num_attention_heads) % 2:
        problems.append(
            f"model.hidden_size={m.hidden_size} / model.num_attention_heads={m.num_attention_heads} = "
            f"{m.hidden_size // m.num_attention_heads} channels per head: must be even (rotary embeddings "
            "rotate pairs of channels)"
        )
    o = config.optimizer
    for flag in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(o, flag) and not o.distributed_optimizer:
            problems.append(f"optimizer.{flag}=true needs optimizer.distributed_optimizer=true")
    if o.grad_reduce_dtype != "fp32" and not o.distributed_optimizer:
        problems.append(f"optimizer.grad_reduce_dtype={o.grad_reduce_dtype} needs optimizer.distributed_optimizer=true")
    if o.delivery == "relay" and not o.distributed_optimizer:
        problems.append("optimizer.delivery=relay needs optimizer.distributed_optimizer=true")
    if o.distributed_optimizer and not m.untie_embeddings_and_output_weights:
        # Its owners hold each parameter once; optimizer/zero/build.py refused tied ones only once built.
        problems.append("optimizer.distributed_optimizer=true needs model.untie_embeddings_and_output_weights=true")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={groups}"
        )
    tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    for name, value in (
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", groups),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
    ):
        if value % tp:
            problems.append(f"{name}={value} is not divisible by parallel.tensor_parallel_size={tp}")
    if p.sequence_parallel and tp == 1:
        # Megatron-Core's ModelParallelConfig refuses it ("Cannot use sequence parallelism without
        # tensor parallelism"); models/gpt.py passed it on only for TP > 1, so it did nothing.
        problems.append(
            "parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1 (it splits activations "
            "over the TP ranks; with parallel.tensor_parallel_size=1 it does nothing): set "
            "parallel.sequence_parallel=false or parallel.tensor_parallel_size >= 2"
        )
    elif p.sequence_parallel and m.seq_length % tp:
        problems.append(
            f"model.seq_length={m.seq_length} is not divisible by parallel.tensor_parallel_size={tp} "
            "(parallel.sequence_parallel=true splits the sequence over TP ranks)"
        )
    vp = p.virtual_pipeline_size
    if m.num_layers % pp:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel_size={pp}")
    elif m.num_layers % (pp * vp):
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel_size={pp} x "
            f"parallel.virtual_pipeline_size={vp} (each of the {pp * vp} model chunks gets the same number of layers)"
        )
    if vp > 1 and pp == 1:
        problems.append(
            f"parallel.virtual_pipeline_size={vp} needs parallel.pipeline_parallel_size > 1 (model chunks "
            "interleave pipeline stages)"
        )
    if t.exit_at_step > t.train_steps:
        problems.append(
            f"train.exit_at_step={t.exit_at_step} is past train.train_steps={t.train_steps}, so it would never "
            f"stop the run: set train.exit_at_step to at most {t.train_steps} (or 0 to run to the end)"
        )
    if t.load_weights_only and t.load is None:
        problems.append("train.load_weights_only=true needs train.load (the checkpoint whose weights start the run)")
    if t.profile_steps is not None and _step_range(t.profile_steps) is None:
        from megatron_osp.training.profiling import parse_step_range

        last = parse_step_range(t.profile_steps)[1]
        if last > t.train_steps:
            problems.append(
                f"train.profile_steps={t.profile_steps!r} ends past train.train_steps={t.train_steps}: the steps "
                f"after it are never run, so they cannot be profiled; end the range at step {t.train_steps} at the latest"
            )
    if t.decay_style != "wsd" and t.wsd_decay_fraction != WSD_DECAY_FRACTION:
        problems.append(
            f"train.wsd_decay_fraction={t.wsd_decay_fraction} is used only with train.decay_style=wsd "
            f"(train.decay_style={t.decay_style!r}): remove it, or set train.decay_style=wsd"
        )
    if t.warmup_steps >= t.train_steps:
        problems.append(f"train.warmup_steps={t.warmup_steps} must be smaller than train.train_steps={t.train_steps}")
    if t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    problems += _recompute_problems(t, m.num_layers // (pp * vp) if not m.num_layers % (pp * vp) else None, vp)
    from megatron_osp.data.gpt_dataset import parse_split

    d = config.data
    if d.weights is not None and d.paths and len(d.weights) != len(d.paths):
        problems.append(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    problems += _valid_set_problems(d)
    if _split(d.split) is None and parse_split(d.split)[0] is None:
        # The train share is 0: the datasets used to be built without a train split and the first
        # step stopped on a TypeError (len(None)) after the run directory and indices were made.
        problems.append(f"data.split={d.split!r} gives training no documents (its first share, train, is 0): "
                        "give the train share a positive value, e.g. data.split='98,2,0'")
    if d.eod_id is not None and d.eod_id >= m.vocab_size:
        problems.append(f"data.eod_id={d.eod_id} is outside the vocabulary (model.vocab_size={m.vocab_size})")
    return problems


def _valid_set_problems(d) -> list[str]:
    """data.valid_weights only with data.valid_paths, one per entry; with data.valid_paths, data.split
    gives every document of data.paths to training (validation reads data.valid_paths instead)."""
    from megatron_osp.data.gpt_dataset import parse_split

    if d.valid_paths is None:
        return [f"data.valid_weights={d.valid_weights!r} is used only with data.valid_paths: remove it, or set "
                "data.valid_paths"] if d.valid_weights is not None else []
    problems = []
    if d.valid_weights is not None and d.valid_paths and len(d.valid_weights) != len(d.valid_paths):
        problems.append(f"data.valid_weights has {len(d.valid_weights)} entries but data.valid_paths has "
                        f"{len(d.valid_paths)}")
    if _split(d.split) is None and any(parse_split(d.split)[1:]):
        problems.append(
            f"data.split={d.split!r} holds out validation/test shares of data.paths, but data.valid_paths is set: "
            "validation reads data.valid_paths, so set data.split='100' (train on every document of data.paths)")
    return problems


def _recompute_problems(t, layers_per_stage: int | None, vp: int = 1) -> list[str]:
    """train.recompute_method / recompute_num_layers only with recompute=full, and a layer count that
    fits a pipeline stage (uniform: chunks of it tile the stage's layers, as Megatron's loop needs).
    With virtual pipeline stages, "stage" is one model chunk (Megatron recomputes per chunk)."""
    if t.recompute != "full":
        return [
            f"train.{name}={getattr(t, name)!r} is used only with train.recompute=full "
            f"(train.recompute={t.recompute!r}): remove it"
            for name in ("recompute_method", "recompute_num_layers")
            if getattr(t, name) is not None
        ]
    n = t.recompute_num_layers or 1
    if layers_per_stage is None:
        return []  # the layers/pipeline mismatch is reported on its own
    stage, split = ("pipeline stage", "model.num_layers / parallel.pipeline_parallel_size") if vp == 1 else (
        "model chunk", "model.num_layers / (parallel.pipeline_parallel_size x parallel.virtual_pipeline_size)")
    if n > layers_per_stage:
        return [f"train.recompute_num_layers={n} is more than the {layers_per_stage} layers of a {stage} ({split})"]
    if (t.recompute_method or "uniform") == "uniform" and layers_per_stage % n:
        return [
            f"train.recompute_num_layers={n} does not divide the {layers_per_stage} layers of a {stage} "
            "(train.recompute_method=uniform recomputes chunks of that many layers)"
        ]
    return []


def check_relations(config, source: str | None = None) -> None:
    _fail(relation_problems(config), source)


def check_config(config, source: str | None = None) -> None:
    """Every field's range, then the relations: for a RunConfig built without ``load_config``."""
    import dataclasses

    problems = []
    for section in RULES:
        part = getattr(config, section)
        problems += section_problems(section, {f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    _fail(problems or relation_problems(config), source)


# ------------------------------------------------------------------------------ start-up checks
def world_problems(config, world_size: int) -> list[str]:
    p, t = config.parallel, config.train
    tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    if world_size % (tp * pp):
        return [
            f"parallel.tensor_parallel_size={tp} x parallel.pipeline_parallel_size={pp} = {tp * pp} "
            f"does not divide the world size {world_size} (processes started)"
        ]
    dp = world_size // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x {dp} data-parallel ranks (world {world_size} / TP {tp} / PP {pp})"
        ]
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.virtual_pipeline_size > 1 and microbatches % pp:
        # Megatron-Core's interleaved schedule runs micro-batches in groups of PP per model chunk
        # (microbatch_group_size_per_vp_stage); a last, smaller group would stall the pipeline.
        return [
            f"parallel.virtual_pipeline_size={p.virtual_pipeline_size}: the {microbatches} micro-batches per step "
            f"(train.global_batch_size={t.global_batch_size} / train.micro_batch_size={t.micro_batch_size} / "
            f"{dp} data-parallel ranks) must be a multiple of parallel.pipeline_parallel_size={pp}"
        ]
    return []


def check_world(config, world_size: int) -> None:
    _fail(world_problems(config, world_size))
