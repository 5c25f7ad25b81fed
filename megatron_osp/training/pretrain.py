"""Entry point: `torchrun --nproc-per-node N -m megatron_osp.training.pretrain --config run.yaml [section.field=value ...]`.

Also runs as a plain single process (`python -m megatron_osp.training.pretrain ...`).
Checkpoints go to `<train.run_dir>/checkpoints` (train.save_dir); running the same command again
resumes from the latest one, and SIGTERM saves before exiting (see training/checkpoint.py). The
first Ctrl-C (SIGINT) does the same and exits 130; a second one aborts at once without saving, also
130 (training/stop_signals.py).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (see megatron_osp/configs/); the last one given counts")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. optimizer.name=muon")
    # Intermixed: the launch scripts put --config CONFIG and their own overrides before the user's
    # arguments, which may hold a --config of their own after those overrides.
    args = parser.parse_intermixed_args(argv)

    from megatron_osp.training.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from megatron_osp import parallel
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.loop import Trainer
    from megatron_osp.training.metric_sinks import SinkStartError
    from megatron_osp.training.step_guard import NonFiniteStep
    from megatron_osp.training.stop_signals import EXIT_INTERRUPTED, INTERRUPT

    try:
        # Start-up: a value, data file or checkpoint that cannot work is one line naming it, and
        # nothing has been trained yet (a fault during training keeps its traceback). The data
        # readers' errors are ValueErrors naming the file (a damaged .idx, an empty split); a W&B
        # that does not start is a SinkStartError.
        try:
            trainer = Trainer(config)
        except (ValueError, FileNotFoundError, SinkStartError) as e:  # ConfigError, TokenRangeError among them
            print(f"error: {e}", file=sys.stderr)
            return 2
        if trainer.train().get("stopped") == INTERRUPT:
            return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (start-up, the end): nothing to save there
        print("interrupted (Ctrl-C) outside the training steps: nothing was saved; the newest complete checkpoint "
              "is kept as it was", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteStep as e:  # a diverged step: nothing was saved after it (training/step_guard.py)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
