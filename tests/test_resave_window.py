"""A job killed while it saves a step again, between its two renames, resumes from that step.

Found by the training sweep: saving an iteration whose directory exists (a run resumed from an
older checkpoint) moves iter_N aside to iter_N.old, then renames iter_N.tmp to iter_N. A kill
between the two renames left `latest` naming a missing iter_N, with the complete earlier save in
iter_N.old, and every later start failed ("latest points to .../iter_N, which does not exist").
Now the resume reads iter_N.old in its place, and the next save renames it back to iter_N.
"""

import os
import shutil
from pathlib import Path

from megatron_osp.testing.distributed import run_distributed
from test_checkpoint import _overrides


def _worker(rank, world, corpus, root):
    from megatron_osp.training.config import load_config
    from megatron_osp.training.loop import Trainer

    base = _overrides(corpus, root, steps=6) + ["train.save_interval=2"]
    Trainer(load_config(None, base + ["train.exit_at_step=4"]), log=lambda *_: None).train()
    save_dir = Path(root) / "checkpoints"
    # The moment between the renames of a second save of step 4: the first save aside, the new one
    # complete but not yet renamed into place, latest still naming iter_0000004.
    os.replace(save_dir / "iter_0000004", save_dir / "iter_0000004.old")
    shutil.copytree(save_dir / "iter_0000004.old", save_dir / "iter_0000004.tmp")
    lines = []
    trainer = Trainer(load_config(None, base), log=lines.append)
    resumed_at = trainer.step
    trainer.train()
    return resumed_at, lines, sorted(p.name for p in save_dir.iterdir()), (save_dir / "latest").read_text().strip()


def test_a_kill_between_the_renames_of_a_resave_resumes_from_the_earlier_save(toy_corpus, tmp_path):
    run = tmp_path / "run"
    resumed_at, lines, listing, latest = run_distributed(_worker, 1, toy_corpus, str(run))[0]
    assert resumed_at == 4
    assert any(line.startswith(f"loaded checkpoint {run / 'checkpoints' / 'iter_0000004.old'} at iteration 4")
               for line in lines), lines
    assert latest == "iter_0000006"
    # The earlier save of step 4 is back under its name; nothing aside or unfinished is left.
    assert listing == [".run.lock", "iter_0000002", "iter_0000004", "iter_0000006", "latest"]
