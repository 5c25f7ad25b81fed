"""Whether a run may load a checkpoint (its weights) or continue it (optimizer, schedule, samples).

``check_compatible`` is called by the Trainer before the model is built. It refuses, naming every
field with both values:

- any load: another architecture (model fields but those that only change how it runs);
- a resume (the checkpoint has optimizer state): another optimizer or LR schedule, or another
  value of a hyperparameter the optimizer state carries in its param groups (loading them would
  silently put the checkpoint's values back);
- any load: a vocabulary padded to another size (another TP size or
  ``model.make_vocab_size_divisible_by``: the layouts cannot reshard the embedding);
- a resume: a ``muon_only`` distributed-optimizer checkpoint saved before 2026-12-04, whose
  vocabulary parameters' optimizer state has the padding rows (checkpoint_shapes.py);
- any load: a model that learned another tokenizer's ids than this run's data hold (the
  checkpoint's record against the data's manifests or ``data.tokenizer_model``, tokenizer_record.py);
- a resume from the run's own ``train.save_dir`` (auto-resume, "the same command again"): other
  data or another seed. The run would continue at the checkpoint's consumed samples of another
  sample order, and a finished run would train nothing and report the earlier run's results. To
  continue a checkpoint on other data on purpose, start a new run from it with ``train.load``.

The validation set (``data.valid_paths``/``valid_weights``, like ``train.eval_batches``) may change on
any resume: training reads the same samples, only the eval loss and kurtosis batches come from the new
set (a resume of the run's own checkpoint gets the change back from ``check_compatible``, and the
loop records it in metrics.jsonl). Whether validation is a share of ``data.paths`` or a set of its own
is still part of the identity, through ``data.split`` (with ``data.valid_paths`` it must be "100",
validation.py).

Parallel layout, batch sizes and the sequence length may change (progress.py counts the tokens),
and so may what the optimizer and schedule read from the config at every step (clip_grad, the
Newton-Schulz steps, coefficients, backend and LR scale, wsd_decay_fraction): the new values apply.

``checkpoint_to_load`` picks the checkpoint (the run's own latest first) and refuses a run that
would save into a ``train.save_dir`` holding checkpoints it does not continue: its saves of the
same steps would replace them, ``latest`` would move to it and ``keep_last`` prune the rest.
"""

from __future__ import annotations

import os

from pathlib import Path

from megatron_osp.training.checkpoint import (
    LATEST,
    CheckpointError,
    has_checkpoint,
    read_run_config,
    read_train_state,
    resolve_checkpoint,
    vocab_padding_problem,
)
from megatron_osp.training.checkpoint_shapes import old_vocab_master_problem
from megatron_osp.training.tokenizer_record import checkpoint_record, describe, run_record, same

# Model fields that may differ between the run that saved a checkpoint and the run that loads it.
_FREE_MODEL_FIELDS = {"transformer_impl", "ssnorm_kernel", "hidden_dropout", "attention_dropout", "seq_length", "make_vocab_size_divisible_by"}
# What a resumed run (optimizer and schedule state loaded) must share with the run that saved it.
_RESUME_FIELDS = (
    ("optimizer", "name"),
    ("train", "train_steps"),
    ("train", "warmup_steps"),
    ("train", "decay_style"),
    ("optimizer", "lr"),
    ("optimizer", "min_lr_ratio"),
    ("optimizer", "weight_decay"),
    # The optimizer state's form: per-shard tensors, or per-unit tensors on owners whose keys
    # follow the Muon split (optimizer/zero/). Either loads at any layout, not as the other.
    ("optimizer", "distributed_optimizer"),
    ("optimizer", "muon_qkv_split"),
)
# Hyperparameters that the optimizer state carries in its param groups: loading it (torch's
# load_state_dict) would put the checkpoint's values back over other ones of this run, silently.
_ADAM_STATE_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps")  # optimizer.name adam and muon
_MUON_STATE_FIELDS = ("muon_momentum", "muon_lr")  # muon and muon_only; muon_lr as used (None = lr)


def _state_hyperparameters(opt) -> dict:
    names = (_ADAM_STATE_FIELDS if opt.name != "muon_only" else ()) + (_MUON_STATE_FIELDS if opt.name != "adam" else ())
    return {f"optimizer.{n}": opt.lr if n == "muon_lr" and opt.muon_lr is None else getattr(opt, n) for n in names}


def _sample_order(config) -> dict:
    """What decides which samples a run reads, in which order: the datasets (by real path), their
    weights, the split (by its shares: '98,2' is '98,2,0') and the seed. Not data.valid_paths: the
    validation set decides no training sample (data.split says whether data.paths lends it documents)."""
    from megatron_osp.data.gpt_dataset import parse_split

    d = config.data
    return {
        "data.paths": [os.path.realpath(p) for p in d.paths],
        "data.weights": d.weights,
        "data.split": parse_split(d.split),
        "train.seed": config.train.seed,
    }


def _valid_set(config) -> dict:
    d = config.data
    return {"valid_paths": getattr(d, "valid_paths", None), "valid_weights": getattr(d, "valid_weights", None)}


def valid_set_change(saved, config) -> tuple[dict, dict] | None:
    """(the validation set of the run config ``saved``, this run's), as ``data.valid_paths`` and
    ``data.valid_weights``, where they differ (datasets by real path), else None."""
    old, new = _valid_set(saved), _valid_set(config)

    def key(v):
        return [os.path.realpath(p) for p in v["valid_paths"]] if v["valid_paths"] else None, v["valid_weights"]

    return (old, new) if key(old) != key(new) else None


def check_compatible(path, config, *, resume: bool, same_run: bool = False,
                     resolved: bool = False) -> tuple[dict, dict] | None:
    """CheckpointError naming every field where ``config`` cannot load (``resume=False``) or
    continue (``resume=True``) the checkpoint at ``path``; ``same_run``: it is this run's own
    ``train.save_dir`` (auto-resume), so the data and seed must be the checkpoint's too. Returns
    what may differ and is recorded in the run's metrics.jsonl: on a resume of the same run, the
    validation set's change (``valid_set_change``), else None. The checkpoint is resolved (every
    shard's presence and size checked) once, or not at all when ``resolved`` (``path`` is what
    ``resolve_checkpoint`` returned)."""
    ckpt = Path(path) if resolved else resolve_checkpoint(path)
    saved, state = read_run_config(ckpt, resolved=True), read_train_state(ckpt, resolved=True)
    diffs = []
    for name in vars(saved.model):
        if name in _FREE_MODEL_FIELDS:
            continue
        old, new = getattr(saved.model, name), getattr(config.model, name)
        if old != new:
            diffs.append(f"model.{name}: checkpoint {old!r}, this run {new!r}")
    if resume:
        for section, name in _RESUME_FIELDS:
            old, new = getattr(getattr(saved, section), name), getattr(getattr(config, section), name)
            if old != new:
                diffs.append(f"{section}.{name}: checkpoint {old!r}, this run {new!r}")
        if saved.optimizer.name == config.optimizer.name:
            old_values = _state_hyperparameters(saved.optimizer)
            for name, new in _state_hyperparameters(config.optimizer).items():
                if old_values[name] != new:
                    diffs.append(f"{name}: checkpoint {old_values[name]!r}, this run {new!r}")
    data_diffs = []
    if resume and same_run:
        old_order, new_order = _sample_order(saved), _sample_order(config)
        for name in old_order:
            if old_order[name] != new_order[name]:
                section, field = name.split(".")
                old, new = getattr(getattr(saved, section), field), getattr(getattr(config, section), field)
                data_diffs.append(f"{name}: checkpoint {old!r}, this run {new!r}")
    tokens = _tokenizer_problems(state, saved, config)
    if diffs or data_diffs or tokens:
        way_out = _way_out(diffs, resume, same_run) if diffs else ""
        if data_diffs:
            way_out += (
                f"\n(a resume continues the run in {ckpt.parent} on its data and seed; to continue this "
                f"checkpoint on other data or with another seed, start a new run from it: "
                f"train.load={ckpt} with another train.run_dir)"
            )
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this run:\n  " + "\n  ".join(diffs + data_diffs + tokens) + way_out
        )
    _check_vocab_padding(ckpt, state, config)
    if resume and (problem := old_vocab_master_problem(ckpt, config, same_run)):
        raise CheckpointError(problem)
    return valid_set_change(saved, config) if resume and same_run else None


def check_steps_left(ckpt, config) -> None:
    """CheckpointError when continuing another run's checkpoint (``train.load`` without
    ``train.load_weights_only``) would train nothing: it is at (or past) the train.train_steps a resume
    keeps, so the new run would end at once and report the checkpoint's steps with no loss of its own.
    ``ckpt``: what ``resolve_checkpoint`` returned."""
    step, steps = read_train_state(ckpt, resolved=True).get("iteration"), config.train.train_steps
    if isinstance(step, int) and step >= steps:
        raise CheckpointError(
            f"train.load={ckpt}: the checkpoint is at step {step}, the end of its run's train.train_steps={steps}, "
            "which a resume keeps: there is nothing left to train. To train on from its weights with a schedule of "
            "its own, set train.load_weights_only=true; to continue the run's schedule, load an earlier iteration")


def _check_vocab_padding(ckpt, state: dict, config) -> None:
    """The model this run builds pads its vocabulary as the checkpoint's did (the padding depends on
    the TP size and model.make_vocab_size_divisible_by; differently padded layouts cannot reshard)."""
    vocab = config.model.padded_vocab_size(config.parallel.tensor_parallel_size)
    problem = vocab_padding_problem(ckpt, state, vocab)
    if problem is not None:
        raise CheckpointError(problem)


def _way_out(diffs: list[str], resume: bool, same_run: bool) -> str:
    """What to do about ``diffs`` (fields where this run differs from the checkpoint's). A run's own
    checkpoints are left to it: another run directory starts anew. A ``train.load`` of another run's
    checkpoint is already a new run: it continues that run's schedule and optimizer state, so another
    schedule or optimizer setting is ``train.load_weights_only=true`` (its weights alone, at step 0); the
    model fields must be the checkpoint's either way."""
    if same_run:
        return "\n(to start a new run instead, use another train.run_dir or train.save_dir)"
    if any(d.startswith("model.") for d in diffs):
        return "\n(train.load takes the checkpoint's model: set the model fields above to the checkpoint's values)"
    if resume:
        return ("\n(train.load continues the checkpoint's run: its schedule, optimizer state and step count; to "
                "start from its weights alone, with this run's schedule and optimizer at step 0, add "
                "train.load_weights_only=true)")
    return ""


def _tokenizer_problems(state: dict, saved, config) -> list[str]:
    """The checkpoint's model (train state ``state``, run config ``saved``) learned another tokenizer's
    ids than this run's data hold (both known: training/tokenizer_record.py): the vocabulary sizes may
    agree, the tokens do not."""
    theirs = checkpoint_record(state, saved)
    mine = run_record(config)
    if same(theirs, mine) is not False:
        return []
    return [f"tokenizer: the checkpoint's model learned the ids of {describe(theirs)}, this run's data are ids of "
            f"{describe(mine)}, which encodes differently: every token would be read as another one's embedding; "
            "tokenize the data with the checkpoint's tokenizer"]


def continues(path, train, same_run: bool, resolved: bool = False) -> bool:
    """Whether loading the checkpoint at ``path`` continues its run (weights, optimizer, schedule,
    samples) or starts a new one from its weights: a weights-only checkpoint (converted from Hugging
    Face) and ``train.load_weights_only`` (not for the run's own checkpoints) start a new one.
    ``resolved``: as ``check_compatible``'s."""
    contents = read_train_state(path, resolved=resolved)["contents"]
    return "optimizer" in contents and (same_run or not train.load_weights_only)


def _in_save_dir(load, save_dir: Path) -> bool:
    path, save_dir = Path(load).resolve(), save_dir.resolve()
    return path == save_dir or path.parent == save_dir


def checkpoint_to_load(train, save_dir: Path) -> tuple:
    """(the checkpoint this run starts from or None, whether it is the run's own: in its save_dir).

    The save_dir's latest with ``train.auto_resume``, else ``train.load``. CheckpointError when the
    run would save into a save_dir whose checkpoints it does not continue."""
    own = has_checkpoint(save_dir)
    if train.auto_resume and own:
        return save_dir, True
    _check_run_dir_free(train, save_dir)
    inside = train.load is not None and _in_save_dir(train.load, save_dir)
    if own and train.save and not inside:
        latest = (save_dir / LATEST).read_text().strip()
        started = f"from train.load={train.load}" if train.load is not None else "from scratch"
        raise CheckpointError(
            f"train.save_dir={save_dir} holds the checkpoints of an earlier run (latest: {latest}); this run "
            f"starts {started} (train.auto_resume=false), and its saves would replace and prune them. "
            "Use another train.save_dir or train.run_dir, or remove that directory to start over"
        )
    return train.load, inside


def _check_run_dir_free(train, save_dir: Path) -> None:
    """A run that does not continue its own checkpoints must not take over a ``train.run_dir`` whose
    ``checkpoints/`` holds another run's while saving elsewhere (``train.save_dir``): its config.yaml,
    summary.json and kurtosis.json would replace that run's, beside checkpoints they do not describe."""
    default = Path(train.run_dir) / "checkpoints"
    if default.resolve() == save_dir.resolve() or not has_checkpoint(default):
        return
    latest = (default / LATEST).read_text().strip()
    raise CheckpointError(
        f"train.run_dir={train.run_dir} holds another run (its checkpoints: {default}, latest: {latest}); this "
        f"run saves into train.save_dir={save_dir} and would write its config.yaml, metrics.jsonl and "
        "summary.json over that run's. Use another train.run_dir"
    )
