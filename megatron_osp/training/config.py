"""A run's configuration: nested dataclasses, loaded from YAML and overridden from the command line.

    model:      ModelConfig (or `preset: tiny` plus field overrides)
    parallel:   tensor/pipeline (and virtual pipeline) sizes (data parallel is what remains of the world)
    optimizer:  OptimSettings (adam | muon, learning rates, clipping)
    data:       indexed-dataset prefixes, split, tokenizer
    train:      steps, batch sizes, schedule, logging, kurtosis cadence, run directory, checkpoints

Overrides are `section.field=value` strings (value parsed as YAML), e.g. `optimizer.name=muon`.
An unknown section or field is an error that names it, never silently ignored; so is a value of the
wrong type (every value is checked against its field's annotation, from YAML and command line alike),
and so is a key given twice in one YAML mapping (PyYAML would keep the last silently).
YAML 1.1 reads `1e-3` (no decimal point) as a string: float fields take it as the number it spells.
Numbers are read as YAML 1.2 does, not PyYAML's YAML 1.1: `2:3` is the string '2:3', not 123 in base
60, and `010` is 10, not octal 8.
Then every value's range and the relations between values are checked (training/validation.py):
`train.global_batch_size=0` is refused here, naming the field, the value and the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_osp.fileio import atomic_write_text
from megatron_osp.models.config import ModelConfig
from megatron_osp.models.presets import get_preset
from megatron_osp.optimizer.builder import OptimSettings
from megatron_osp.training.validation import WSD_DECAY_FRACTION, ConfigError, check_relations, check_section


@dataclass
class ParallelSettings:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Model chunks per pipeline stage (interleaved 1F1B): 1 = one contiguous block of layers per
    # stage; V > 1 needs pipeline_parallel_size > 1, model.num_layers divisible by PP x V and a number
    # of micro-batches per step (global batch / (micro batch x DP)) divisible by PP.
    virtual_pipeline_size: int = 1
    sequence_parallel: bool = False


@dataclass
class DataSettings:
    # Indexed dataset prefixes (path without .bin/.idx); several are blended by `weights`.
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    split: str = "98,2,0"  # train, validation, test shares of the documents
    # A held-out validation set of its own (Megatron-LM's --valid-data-path): indexed dataset prefixes
    # (a sharded output's family prefix stands for its shards) whose documents, all of them, give the
    # eval loss and the kurtosis batches; `valid_weights` blends them as `weights` blends `paths`. With
    # it, training reads every document of `paths`: `split` must then give them all to training
    # ("100"; a validation or test share is refused, naming both fields). A validation dataset that is
    # also a training one (same file, or a family of which `paths` holds a shard), or of another
    # tokenizer, is refused. It may change when a run resumes (training reads the same samples).
    valid_paths: list[str] | None = None
    valid_weights: list[float] | None = None
    tokenizer_model: str | None = None  # SentencePiece .model (its EOD id separates documents)
    eod_id: int | None = None  # used when no tokenizer model is given
    cache_dir: str | None = None  # index cache; default <run_dir>/index_cache
    num_workers: int = 0  # must be 0: samples are read by the training process (kept so older run configs load)


@dataclass
class TrainSettings:
    train_steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    warmup_steps: int = 10
    decay_style: str = "cosine"
    # WSD: share of the steps spent in the final decay; another value with another decay_style is refused
    wsd_decay_fraction: float = WSD_DECAY_FRACTION
    seed: int = 1234
    bf16: bool | None = None  # None = bf16 on CUDA, fp32 on CPU
    log_interval: int = 10
    eval_interval: int = 0  # 0 = only at the end
    eval_batches: int = 2
    kurtosis_interval: int = 0  # 0 = only at the end
    kurtosis_batches: int = 1
    run_dir: str = "runs/default"
    tensorboard: bool = True
    # Weights & Biases (training/metric_sinks.py; pip install megatron-osp[wandb]): on when a project
    # is named. The name defaults to the run directory's name, the directory given to wandb.init to
    # $WANDB_DIR or run_dir (W&B writes into its wandb/ folder). The mode is W&B's: WANDB_MODE=offline
    # logs without network (upload later with `wandb sync`).
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_dir: str | None = None
    progress_bar: bool = True
    # Checkpointing (training/checkpoint.py). A run with a checkpoint in save_dir resumes from it.
    save: bool = True  # write checkpoints (every save_interval steps, at the end, on SIGTERM)
    save_dir: str | None = None  # default <run_dir>/checkpoints
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM / exit_at_step)
    keep_last: int = 0  # keep the K newest checkpoints in save_dir; 0 = keep all
    # Interval saves written by a forked process while training goes on (training/async_checkpoint.py);
    # the end-of-run, SIGTERM and time-limit saves wait for it and are written at once.
    async_save: bool = False
    load: str | None = None  # a new run starts from this checkpoint (a save dir or one iter_N dir)
    # With load: take only its model weights: step 0, a fresh optimizer, LR schedule and data order,
    # any optimizer settings (Megatron-LM's --finetune). The run's own checkpoints resume in full.
    load_weights_only: bool = False
    auto_resume: bool = True  # continue from save_dir's latest checkpoint if any (before `load`)
    exit_at_step: int = 0  # stop (after saving) once this many steps are done; 0 = run to the end
    # Stop (after saving) at the first step ending this many minutes after the run started (the Trainer
    # was built): a job time limit's fallback where no SIGTERM comes first; leave room for the save. 0 = off
    exit_after_minutes: float = 0.0
    save_on_sigterm: bool = True  # SIGTERM: finish the step, save, exit cleanly (Ctrl-C always does, then exits 130)
    # A rank whose step, evaluation, kurtosis measurement, checkpoint save or part of the start-up
    # (building the datasets, the model and optimizer, loading a checkpoint, waiting for every rank, ...)
    # runs longer than this prints its threads' stacks and exits with code 3 (training/hang_watchdog.py),
    # so a job stuck in a collective (a dead peer, a network fault) or on a stalled filesystem ends and
    # can be requeued instead of burning its allocation. 30: well above what any of these takes in a
    # healthy run at the presets' scales (a step takes seconds; a synchronous 70B save or load, an index
    # build over a large corpus or the first step's warm-up, minutes), well below the hours a hung job
    # would waste. The start-up needs no limit of its own: the limit counts per part, and its longest
    # parts (a checkpoint load, an index build) are of a save's order. Raise it where a part
    # legitimately takes longer. 0 = off
    hang_timeout_minutes: float = 30.0
    # torch.profiler trace of these steps, "START-END" (inclusive; "N": one step), one Chrome trace per
    # rank in <run_dir>/profile/ (training/profiling.py). null = off
    profile_steps: str | None = None
    # Activation recompute (Megatron's recompute_granularity; models/gpt.py maps it): "none" keeps
    # every activation; "selective" recomputes core attention (softmax(QK^T)V) in the backward pass;
    # "full" recomputes whole transformer layers from their inputs. method and num_layers are for
    # "full" only (null = uniform, 1): uniform checkpoints each chunk of num_layers layers, block
    # checkpoints only the first num_layers layers of each pipeline stage.
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    optimizer: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_class(name: str):
    return {
        "model": ModelConfig,
        "parallel": ParallelSettings,
        "optimizer": OptimSettings,
        "data": DataSettings,
        "train": TrainSettings,
    }[name]


def _typed(value, hint, where: str, source: str):
    """``value`` as the annotation ``hint`` wants it, or a ValueError naming ``where`` and ``source``.

    Ints stay ints (a bool or a float is refused), floats take ints and numeric strings, strings take
    numbers as they were written (``data.split: 100``; ``train.run_dir=007`` is '007', not '7'), bools
    only bools; ``X | None`` takes None; lists are checked item by item.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(value, inner[0], where, source) if len(inner) == 1 else value
    wrong = lambda kind: ValueError(f"{source}: {where} must be {kind}, got {value!r}")  # noqa: E731
    if origin is list:
        if not isinstance(value, list):
            raise wrong("a list, e.g. [a, b]")
        return [_typed(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)] if args else value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if hint is int:
        if number and isinstance(value, int):
            return int(value)
        raise wrong("an integer")
    if hint is float:
        if number:
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if number:  # the text the YAML held (_ConfigLoader keeps it): 007, 1.10, 1_000 stay as written
            return getattr(value, "text", str(value))
        raise wrong("a string")
    return value


def _build_section(name: str, values: dict, source: str):
    cls = _section_class(name)
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    preset = values.pop("preset", None) if name == "model" else None
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"{source}: model.preset must be a preset name, got {preset!r}")
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(name + '.' + u for u in unknown)}")
    hints = typing.get_type_hints(cls)
    values = {k: _typed(v, hints[k], f"{name}.{k}", source) for k, v in values.items()}
    base = get_preset(preset) if preset is not None else None
    defaults = {
        f.name: getattr(base, f.name) if base is not None
        else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(cls)
    }
    # Ranges first, so the dataclasses' own checks never see a value like 0 heads.
    check_section(name, {**defaults, **values}, source)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ValueError as e:
        raise ConfigError(str(e), source) from None


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "a.c=x"]` -> {"a": {"b": 1, "c": "x"}}."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        section, fieldname = key.split(".", 1)
        if section not in _SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; known: {sorted(_SECTIONS)}")
        tree.setdefault(section, {})[fieldname] = yaml.load(raw, Loader=_ConfigLoader)
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one
    silently, so a second ``train:`` section would drop every field of the first."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_scalar(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (first on line {first[key] + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


class _ConfigLoader(_UniqueKeyLoader):
    """``_UniqueKeyLoader`` reading numbers as YAML 1.2 does. PyYAML follows YAML 1.1, where a number
    written with colons is base 60 and one with a leading zero is octal, silently: ``2:3`` is 123,
    ``1:30`` is 90, ``010`` is 8. Here ``2:3`` and ``1:30`` stay strings (a numeric field then refuses
    them, naming the field; ``train.profile_steps=2:3`` is refused as not START-END) and ``010`` is 10."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text[0] == "-" else 1
        text = text.lstrip("+-")
        base = {"0b": 2, "0x": 16}.get(text[:2], 10)
        return _WrittenInt(sign * int(text[2:] if base != 10 else text, base), self.construct_scalar(node))

    def construct_yaml_float(self, node):
        return _WrittenFloat(super().construct_yaml_float(node), self.construct_scalar(node))


class _WrittenInt(int):
    """A number read from YAML with the text it was written as, for a string field to take as written
    (``train.run_dir=007`` is the directory '007', ``data.paths=[0123]`` the file '0123'; str() would
    give '7' and '123', another directory or dataset). _typed turns it into a plain int or float."""

    def __new__(cls, value, text: str):
        self = super().__new__(cls, value)
        self.text = text
        return self


class _WrittenFloat(float):
    """_WrittenInt's float."""

    def __new__(cls, value, text: str):
        self = super().__new__(cls, value)
        self.text = text
        return self


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?[0-9][0-9_]*)$"),
    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_yaml_float)


def _as_it_ran(raw: dict) -> dict:
    """A run config saved with a checkpoint, with each setting that did nothing in that run set to
    what the run did. Earlier versions accepted these settings; validation.py now refuses them for a
    new run, and a checkpoint's run_config.yaml (covered by its checksums) cannot be edited, so
    without this its checkpoints could no longer be resumed, exported or evaluated."""
    def section(name):
        values = raw.get(name)
        return values if isinstance(values, dict) else {}

    def field_value(name, key):
        return section(name).get(key, getattr(_section_class(name)(), key))

    data, parallel, train = section("data"), section("parallel"), section("train")
    if data.get("num_workers"):  # never used: samples were read by the training process
        data["num_workers"] = 0
    if parallel.get("sequence_parallel") and field_value("parallel", "tensor_parallel_size") == 1:
        parallel["sequence_parallel"] = False  # models/gpt.py passed it on only at TP > 1
    if field_value("train", "decay_style") != "wsd" and "wsd_decay_fraction" in train:
        train["wsd_decay_fraction"] = WSD_DECAY_FRACTION  # read only by the wsd schedule
    if field_value("train", "exit_at_step") > field_value("train", "train_steps"):
        train["exit_at_step"] = 0  # past the end: it never stopped the run
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, saved: bool = False) -> RunConfig:
    """The RunConfig of a YAML file (or the defaults) with ``section.field=value`` overrides, every
    value checked (validation.py). ``saved``: the file is a run config saved with a checkpoint; the
    settings that did nothing in that run are read as what the run did (``_as_it_ran``)."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path) as stream:  # YAML errors then name the file with the line
                raw = yaml.load(stream, Loader=_ConfigLoader) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except OSError as e:  # a directory, no permission
            raise ValueError(f"config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        unknown = sorted(set(raw) - set(_SECTIONS), key=str)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
        for name, values in raw.items():
            if values is not None and not isinstance(values, dict):
                raise ValueError(f"{path}: {name} must be a mapping of its fields (field: value), got {values!r}")
        if saved:
            raw = _as_it_ran(raw)
    tree = parse_overrides(list(overrides))
    for section, values in tree.items():
        merged = dict(raw.get(section) or {})
        merged.update(values)
        raw[section] = merged
    if tree:
        source = "command line" if path is None else f"{source} + command line"
    sections, problems = {}, []
    for name in _SECTIONS:  # every section's range problems are reported together
        try:
            sections[name] = _build_section(name, raw.get(name), source)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems, source)
    config = RunConfig(**sections)
    check_relations(config, source)
    return config


def save_config(config: RunConfig, path: Path):
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
