"""The pretrain loop: Megatron-Core's schedules, DDP and optimizer around the OSP model.

One step = one global batch through ``get_forward_backward_func()`` (1F1B under pipeline
parallelism, interleaved 1F1B over model chunks with ``parallel.virtual_pipeline_size`` > 1; see
model_setup.py), gradient reduction by Megatron's DDP (one wrapper per model chunk), then the
(Muon +) AdamW step and the LR schedule.
Every ``log_interval`` steps the loss, LR, grad norm and tokens/s go to the console, to
``metrics.jsonl`` and to TensorBoard and/or W&B (metric_sinks.py); every ``kurtosis_interval`` steps
(and at the end) the paper's excess-kurtosis metric is measured on a fixed held-out batch.

Checkpoints (training/checkpoint.py) are written every ``save_interval`` steps, at the end, at
``exit_at_step`` and on SIGTERM or the first Ctrl-C (the step in flight finishes first; a second
Ctrl-C aborts without saving, training/stop_signals.py); a run whose ``save_dir`` holds
a checkpoint, or that names one in ``train.load``, continues from it on exactly the next batch.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_osp import parallel, platform
from megatron_osp.parallel import any_rank
from megatron_osp.fileio import atomic_write_json
from megatron_osp.metrics.kurtosis import HiddenStateRecorder, KurtosisReport, merge_rank_reports
from megatron_osp.models.layout import unwrap  # noqa: F401 - the Trainer's callers (tests, tools) import it from here
from megatron_osp.optimizer.builder import ddp_config, ddp_wrapper, get_osp_optimizer
from megatron_osp.training.async_checkpoint import AsyncSaver
from megatron_osp.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    newest_checkpoint,
    read_run_config,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_osp.training import model_setup, run_lock
from megatron_osp.training.config import RunConfig, save_config
from megatron_osp.training.data import build_datasets
from megatron_osp.training.hang_watchdog import HangWatchdog
from megatron_osp.training.lr_schedule import build_scheduler
from megatron_osp.training.metric_sinks import open_sinks
from megatron_osp.training.platform_checks import check_launch, check_platform
from megatron_osp.training.profiling import StepProfiler
from megatron_osp.training.progress import finished_summary, tokens_at_resume
from megatron_osp.training.resume_check import check_compatible, check_steps_left, checkpoint_to_load, continues
from megatron_osp.training.run_log import RunLog, mean_tail, progress_bar
from megatron_osp.training.step_guard import check_step
from megatron_osp.training import stop_signals
from megatron_osp.training.stop_signals import StopSignals
from megatron_osp.training.data_checks import check_data_settings
from megatron_osp.training.validation import check_config, check_world


def _world_size() -> int:
    """The number of processes this run has, known before torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "MASTER_ADDR" not in os.environ:  # a plain process: parallel.init_distributed makes a world of one
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_logging_rank() -> bool:
    """Last pipeline stage (it has the loss), first TP and DP rank."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _loss_func(loss_mask, output_tensor):
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(device, data_iterator, model):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


class Trainer:
    """Owns the model, optimizer, data and logs of one run; `train()` runs it to the end."""

    def __init__(self, config: RunConfig, log=print):
        self.started = time.monotonic()  # train.exit_after_minutes counts from here
        self.config = config
        self.log = log
        par, train = config.parallel, config.train
        # Every value, the world size and the data settings are checked before anything is started,
        # built or written (validation.py); the datasets (whose token ids are checked when they
        # open) are built before the model.
        check_config(config)
        # From here each part of the start-up is watched (a stalled filesystem, a peer that never joins a
        # collective); the watchdog is closed however the start ends, and train() starts it again.
        self.watchdog = HangWatchdog(train.hang_timeout_minutes, parallel.process_rank())
        with self.watchdog.watching():
            self.watchdog.arm("start-up: checking the launch, the data files and the platform")
            check_launch(os.environ)
            check_world(config, _world_size())
            check_data_settings(config)
            check_platform(config, on_cpu=platform.cpu_mode_requested())
            self.run_dir = Path(train.run_dir)
            # The checkpoint this run continues from, checked against the config before anything starts
            # (a data index build can take minutes).
            # The run's own checkpoints come first, so a preempted job that started from train.load
            # and is requeued with the same command continues its progress instead of restarting.
            self.watchdog.arm("start-up: finding the checkpoint to continue from")
            self.save_dir = Path(train.save_dir) if train.save_dir else self.run_dir / "checkpoints"
            load_path, same_run = checkpoint_to_load(train, self.save_dir)
            resume, self._valid_change = False, None  # another validation set: recorded in metrics.jsonl
            if load_path is not None:  # resolved once here (each resolution stats every shard)
                ckpt = resolve_checkpoint(load_path)
                resume = continues(ckpt, train, same_run, resolved=True)  # else a new run from its weights
                self._valid_change = check_compatible(ckpt, config, resume=resume, same_run=same_run, resolved=True)
                if resume and not same_run:
                    check_steps_left(ckpt, config)
            self.watchdog.arm("start-up: joining the process groups")
            parallel.init_distributed(par.tensor_parallel_size, par.pipeline_parallel_size,
                                      par.virtual_pipeline_size)
            # TensorBoard and W&B start first: a W&B that cannot start (no login, no network) stops the
            # run before the data and model are built; a start that fails later closes them as failed.
            self.watchdog.arm("start-up: opening TensorBoard / W&B")
            self.sinks = open_sinks(config, is_logging_rank(), resume, log=self.log, device=platform.device())
            self.run_log = RunLog.for_config(config, self.sinks, self.log, _world_size(), is_logging_rank(),
                                             platform.device())
            try:
                self._build(load_path, resume)
            except BaseException:
                self.sinks.close(failed=True)
                raise

    def _build(self, load_path, resume: bool):
        config, train = self.config, self.config.train
        platform.seed_everything(train.seed)
        self.device = platform.device()
        self.bf16 = train.bf16 if train.bf16 is not None else not platform.is_cpu()
        self.profiler = StepProfiler(train.profile_steps, self.run_dir, dist.get_rank(), self.device, self._rank0_log)
        n_train = train.train_steps * train.global_batch_size
        n_eval = max(train.eval_batches, train.kurtosis_batches) * train.global_batch_size
        self.watchdog.arm("start-up: building the datasets")
        self.train_ds, self.valid_ds = build_datasets(config, n_train, n_eval)

        # One model chunk per virtual pipeline stage (one in all without them), each in its own DDP.
        self.watchdog.arm("start-up: building the model and optimizer")
        self.tconfig = model_setup.run_transformer_config(config, self.bf16)
        chunks = model_setup.build_chunks(config, self.tconfig, self.device, self.bf16)
        self.model_chunks = [self._wrap_chunk(chunk) for chunk in chunks]
        model_setup.attach_grad_hooks(self.tconfig, self.model_chunks, ddp_wrapper(config.optimizer)[1])
        self.optimizer = get_osp_optimizer(
            config.optimizer, self.model_chunks, bf16=self.bf16, log=self.log if self._is_stage_leader() else None
        )
        self.scheduler = build_scheduler(config, self.optimizer)

        self.step = 0
        self.n_params = sum(p.numel() for chunk in self.model_chunks for p in chunk.parameters())

        # Last, so the restored RNG states are the ones the next step sees.
        self.last_saved_step = None
        self.saver = AsyncSaver(self._rank0_log) if train.save and train.async_save else None
        consumed = 0
        self._checkpoint_seq_length = config.model.seq_length
        if load_path is not None:
            self.watchdog.arm(f"start-up: loading checkpoint {load_path}")
            state = load_checkpoint(load_path, self.model_chunks, self.optimizer, self.scheduler, load_rng=resume,
                                    weights_only=not resume, log=self._rank0_log)
            if resume:
                self.step, consumed = state["iteration"], state["consumed_samples"]
                self.last_saved_step = self.step
                self._checkpoint_seq_length = read_run_config(state["path"], resolved=True).model.seq_length
        self.train_iters = model_setup.chunk_iterators(self.train_ds, train, len(self.model_chunks), consumed)
        self.train_iter = self.train_iters[0]  # its `consumed` is the run's
        # Tokens consumed so far (all segments); _train refines it from metrics.jsonl on resume.
        self.tokens = consumed * self._checkpoint_seq_length
        # Written once the run has started cleanly: a start that fails (bad data, a checkpoint that
        # does not fit), or a rerun of a finished run (which trains nothing), leaves it as it was.
        config_file = self.run_dir / "config.yaml"
        self.watchdog.arm("start-up: writing config.yaml and waiting for every rank")
        busy = None
        if dist.get_rank() == 0:  # before anything of the run (config.yaml, metrics, saves) is written
            busy = run_lock.claim(self.run_dir, self.save_dir if train.save else None)
        if any_rank(self.device, busy is not None)[0]:
            raise run_lock.RunDirInUse(busy or f"train.run_dir={self.run_dir} or train.save_dir={self.save_dir} is in "
                                       "use by another job (see rank 0)")
        if dist.get_rank() == 0:
            stop_signals.clear_mark(self.run_dir)  # this launch's own Ctrl-C decides whether a job requeues
            if self.step < train.train_steps or not config_file.exists():
                save_config(config, config_file)
        dist.barrier()

    def _wrap_chunk(self, chunk):
        """One model chunk in Megatron's DDP (gradient buffers; all-reduce over data-parallel ranks, or
        with distributed_optimizer=true delivery to unit owners: optimizer/zero/ddp.py)."""
        ddp_cls, _ = ddp_wrapper(self.config.optimizer)
        return ddp_cls(self.tconfig, ddp_config(self.config.optimizer), chunk)

    @property
    def model(self):
        """The model when it is one chunk (``parallel.virtual_pipeline_size=1``); else see model_chunks."""
        if len(self.model_chunks) != 1:
            raise AttributeError(f"the model has {len(self.model_chunks)} chunks: use Trainer.model_chunks")
        return self.model_chunks[0]

    def _rank0_log(self, msg):
        if dist.get_rank() == 0:
            self.log(msg)

    def _is_stage_leader(self) -> bool:
        return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0

    def _phase(self, name: str, what: str):
        """A part of the run: the hang watchdog's limit starts again for ``what``; ``name``'s range in a profile."""
        self.watchdog.arm(what)
        return self.profiler.range(name)

    # ------------------------------------------------------------------ steps
    def _run_schedule(self, iters: list, forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, self.device),
            data_iterator=model_setup.schedule_inputs(iters),
            model=self.model_chunks,
            num_microbatches=iters[0].num_microbatches,
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.config.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _mean_loss(self, outputs: list[dict]) -> float:
        """Mean of the micro-batch losses over this step and over data-parallel ranks (last stage)."""
        if not parallel_state.is_pipeline_last_stage():
            return float("nan")
        loss = torch.stack([o["lm loss"].float() for o in outputs]).mean().reshape(1).to(self.device)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return loss.item() / parallel_state.get_data_parallel_world_size()

    def train_step(self) -> dict:
        self.profiler.step_begins(self.step + 1)
        self.watchdog.arm(f"step {self.step + 1}")
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self.profiler.range("forward_backward"):
            outputs = self._run_schedule(self.train_iters, forward_only=False)
        with self.profiler.range("optimizer_step"):
            ok, grad_norm, _ = self.optimizer.step()
        loss = self._mean_loss(outputs)
        check_step(self.step + 1, ok, loss, grad_norm, self.device, self._newest_checkpoint)  # before any save
        if ok:
            self.scheduler.step(increment=1)
        self.step += 1
        self.tokens += self.config.train.global_batch_size * self.config.model.seq_length
        return {
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped": not ok,
        }

    def _newest_checkpoint(self) -> str | None:
        try:
            self.finish_saves()  # a background save of an earlier, finite step is still good
        except CheckpointError as e:
            self._rank0_log(str(e))
        newest = newest_checkpoint(self.save_dir)
        return str(newest) if newest is not None else None

    @torch.no_grad()
    def evaluate(self) -> float:
        with self._phase("evaluate", f"the evaluation after step {self.step}"):
            self._eval_mode()
            it = model_setup.chunk_iterators(self.valid_ds, self.config.train, len(self.model_chunks))
            losses = [self._mean_loss(self._run_schedule(it, forward_only=True))
                      for _ in range(self.config.train.eval_batches)]
        return sum(losses) / len(losses)

    @torch.no_grad()
    def measure_kurtosis(self) -> KurtosisReport:
        """The paper's metric on the first held-out global batch(es); the whole model's report on every rank."""
        with self._phase("kurtosis", f"the kurtosis measurement after step {self.step}"):
            self._eval_mode()
            first = model_setup.core_chunks(self.model_chunks)[0]
            it = model_setup.chunk_iterators(self.valid_ds, self.config.train, len(self.model_chunks))
            # The layers of all chunks, each named by its global number (not contiguous under interleaving).
            layers = model_setup.decoder_layers(self.model_chunks)
            with HiddenStateRecorder(layers, record_input=first.pre_process) as rec:
                for _ in range(self.config.train.kurtosis_batches):
                    self._run_schedule(it, forward_only=True)
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, (parallel_state.get_tensor_model_parallel_rank(), rec.report().to_dict()))
        # TP ranks hold copies of the same hidden states: TP rank 0's are used.
        return merge_rank_reports([report for tp_rank, report in reports if tp_rank == 0])

    def _eval_mode(self):
        for chunk in self.model_chunks:
            chunk.eval()

    # ------------------------------------------------------------------ checkpoints
    def save(self, background: bool = False) -> None:
        """Checkpoint the full training state at the current step (collective); ``background``: with
        train.async_save, written while training goes on (any earlier one is finished first)."""
        state = dict(optimizer=self.optimizer, scheduler=self.scheduler, consumed_samples=self.train_iter.consumed,
                     keep_last=self.config.train.keep_last)
        self.finish_saves()
        with self._phase("save_checkpoint", f"the checkpoint save of step {self.step}"):
            if background and self.saver is not None:
                self.saver.start(self.save_dir, self.step, self.model_chunks, self.config, **state)
            else:
                save_checkpoint(self.save_dir, self.step, self.model_chunks, self.config, log=self._rank0_log, **state)
        self.last_saved_step = self.step

    def finish_saves(self) -> None:
        """Wait for a background save in flight, if any, and publish it (collective)."""
        if self.saver is not None and self.saver.in_flight is not None:
            with self._phase("save_checkpoint", f"the background save of step {self.saver.in_flight}"):
                self.saver.wait()

    def _stop_reason(self, signals: "StopSignals | None", clock: bool = True) -> str | None:
        """Why the run stops after this step (None: it goes on); ``clock``: whether the time limit
        counts (not before the first step: a job makes at least one)."""
        train = self.config.train
        if signals is not None or train.exit_after_minutes:  # agreed on: ranks' signals and clocks differ
            late = (clock and bool(train.exit_after_minutes)
                    and time.monotonic() - self.started >= 60 * train.exit_after_minutes)
            sigint, sigterm, late = any_rank(self.device, signals is not None and signals.sigint,
                                             signals is not None and signals.sigterm, late)
            if sigint or sigterm:
                return stop_signals.INTERRUPT if sigint else "SIGTERM"
            if late and self.step < train.train_steps:
                return f"train.exit_after_minutes={train.exit_after_minutes:g}"
        if train.exit_at_step and self.step >= train.exit_at_step and self.step < train.train_steps:
            return f"train.exit_at_step={train.exit_at_step}"
        return None

    # ------------------------------------------------------------------ run
    def train(self) -> dict:
        train = self.config.train
        signals = StopSignals.install(self.run_dir, saves=train.save, sigterm=train.save_on_sigterm)
        self.watchdog.start()
        try:
            return self._train(signals)
        finally:
            self.watchdog.close()
            self.profiler.close()
            self.sinks.close(failed=sys.exc_info()[0] is not None)
            if signals is not None:
                signals.uninstall()

    def _train(self, signals) -> dict:
        train = self.config.train
        tokens_per_step = train.global_batch_size * self.config.model.seq_length
        if is_logging_rank():
            self.log(
                f"model: {self.n_params:,} parameters on this rank | optimizer={self.config.optimizer.name} "
                f"normalization={self.config.model.normalization} "
                f"embedding_projection={self.config.model.embedding_projection} | "
                f"{train.train_steps} steps x {tokens_per_step} tokens | device={self.device} bf16={self.bf16}"
            )
        start_step = self.step
        if self.step and is_logging_rank():
            self.log(f"resuming at step {self.step} ({self.train_iter.consumed} samples consumed)")
        bar = progress_bar(train.train_steps, initial=self.step) if (is_logging_rank() and train.progress_bar) else None
        history = self.history = []  # this session's logged steps
        # A fresh start drops the lines of an attempt killed before its first checkpoint.
        earlier = self.run_log.earlier_metrics(self.step)
        if earlier:
            self.tokens = tokens_at_resume(earlier, self.train_iter.consumed, self._checkpoint_seq_length)
        if self.step and self.step >= train.train_steps:
            done = finished_summary(self.run_dir, self.step, is_logging_rank(), self.device)
            if done is not None:  # nothing to train: keep the summary the run finished with
                if bar is not None:
                    bar.close()
                self._rank0_log(
                    f"the run already finished at step {self.step}; {self.run_dir / 'summary.json'} is kept as "
                    "it was (tools/evaluate_quantization.py measures a checkpoint with other settings)"
                )
                dist.barrier()
                return done
        self.run_log.valid_set_changed(self.step, self._valid_change)  # None: the same set
        t0 = time.perf_counter()
        # A log window's rate is of its training steps: the time spent evaluating, measuring kurtosis
        # and saving in it (``paused``) is not counted (a save could take minutes at scale).
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        kurtosis_history = []
        stop = self._stop_reason(signals, clock=False)  # e.g. resumed at or past exit_at_step: no further step
        if stop is not None:
            if bar is not None:
                bar.close()
            return self._stop_early(stop, history)
        while self.step < train.train_steps:
            stats = self.train_step()
            window_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if self.step % train.log_interval == 0 or self.step == train.train_steps:
                rate = window_steps * tokens_per_step / max(time.perf_counter() - window_start - paused, 1e-9)
                stats.update(
                    step=self.step,
                    tokens_per_s=rate,
                    tflops_per_device=self.run_log.tflops_per_device(rate),
                    consumed_samples=self.train_iter.consumed,
                    tokens=self.tokens,
                    **self.run_log.memory.window(),  # peak GPU memory since the last line (absent on CPU)
                )
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
                history.append(stats)
                self.run_log.metrics(stats, bar)
            side_start = time.perf_counter()
            if train.eval_interval and self.step % train.eval_interval == 0 and self.step < train.train_steps:
                self.run_log.validation(self.evaluate(), self.step, bar)
            if train.kurtosis_interval and self.step % train.kurtosis_interval == 0 and self.step < train.train_steps:
                report = self.measure_kurtosis()
                kurtosis_history.append({"step": self.step, "mean": report.mean, "max": report.max})
                self.run_log.kurtosis(report, self.step, bar)
            if train.save and train.save_interval and self.step % train.save_interval == 0:
                self.save(background=True)
            elif self.saver is not None:
                self.saver.poll()
            paused += time.perf_counter() - side_start
            stop = self._stop_reason(signals)
            if stop is not None:
                if bar is not None:
                    bar.close()
                return self._stop_early(stop, history)
        if bar is not None:
            bar.close()
        self.finish_saves()
        if train.save and self.last_saved_step != self.step:
            self.save()
        train_time = time.perf_counter() - t0
        val_loss = self.evaluate()
        report = self.measure_kurtosis()
        kurtosis_history.append({"step": self.step, "mean": report.mean, "max": report.max})
        summary = {
            "run_dir": str(self.run_dir),
            "optimizer": self.config.optimizer.name,
            "normalization": self.config.model.normalization,
            "embedding_projection": self.config.model.embedding_projection,
            "steps": self.step,
            "tokens": self.tokens,
            "train_loss": mean_tail(earlier + history),
            "val_loss": val_loss,
            "kurtosis_mean": report.mean,
            "kurtosis_max": report.max,
            "kurtosis_history": kurtosis_history,
            "train_time_s": train_time,
            "tokens_per_s": (self.step - start_step) * tokens_per_step / train_time if self.step > start_step else float("nan"),
        }
        summary["tflops_per_device"] = self.run_log.tflops_per_device(summary["tokens_per_s"])
        summary.update(self.run_log.memory.run_peak())  # this process's peak GPU memory (absent on CPU)
        if is_logging_rank():
            self.sinks.scalar("val/loss", val_loss, self.step)
            self.run_log.kurtosis(report, self.step, echo=False)
            report.save(self.run_dir / "kurtosis.json")
            atomic_write_json(self.run_dir / "summary.json", summary)
            self.log(f"\nexcess kurtosis after {self.step} steps (held-out batch):\n{report.format_table()}")
            self.log(f"val loss {val_loss:.4f} | kurtosis mean {report.mean:.4f} max {report.max:.4f}")
        dist.barrier()
        return summary

    def _stop_early(self, reason: str, history) -> dict:
        """Save (when checkpointing is on) and return before the end of the schedule."""
        saved = None
        self.finish_saves()
        if self.config.train.save:
            if self.last_saved_step != self.step:
                self.save()
            saved = self.save_dir
        again = ("Run it again without train.exit_at_step (or with a larger one) to continue."
                 if reason.startswith("train.exit_at_step") else "Run the same command again to continue" + (
                     " (a job script does not requeue it)." if reason == stop_signals.INTERRUPT else "."))
        where = f"checkpoint of step {self.step} in {self.save_dir}. {again}" if saved else (
            "no checkpoint was written (train.save=false).")
        self._rank0_log(f"{reason}: stopped after step {self.step} of {self.config.train.train_steps}; {where}")
        dist.barrier()
        return {
            "run_dir": str(self.run_dir),
            "stopped": reason,
            "steps": self.step,
            "train_loss": mean_tail(history),
            "checkpoint": str(self.save_dir) if saved else None,
        }
