"""A synchronous save that fails (a full disk) stops the run with one error naming the save.

Found by the training sweep: with train.save_dir on a filesystem that filled up at the second save,
the run ended in a raw torch.distributed.checkpoint CheckpointException traceback ("Worker failure:
... unexpected pos 704 vs 598", exit code 1) that named neither the save, nor the checkpoint kept,
nor the disk; a background save (train.async_save) already said which save failed and which
checkpoint is the newest complete one. Now both say so, with the free space where the save was going.
"""

import errno

from megatron_osp.testing.distributed import run_distributed


def _failing_save_worker(rank, world, save_dir, failure):
    from pathlib import Path

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_osp.training import checkpoint
    from megatron_osp.training.checkpoint import CheckpointError

    errors = {
        "disk_full": OSError(errno.ENOSPC, "No space left on device"),
        "writer": CheckpointException("write", {0: _wrap_exception(RuntimeError("Worker failure: unexpected pos 704 vs 598"))}),
    }

    def write_shards(state, directory):
        (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise errors[failure]

    checkpoint.training_state = lambda *args: ({}, ["model"])
    checkpoint._write_shards = write_shards
    try:
        checkpoint.save_checkpoint(save_dir, 2, [], None)
    except CheckpointError as e:
        return str(e)
    return None


def _earlier_checkpoint(tmp_path):
    save_dir = tmp_path / "checkpoints"
    (save_dir / "iter_0000001").mkdir(parents=True)
    (save_dir / "latest").write_text("iter_0000001\n")
    return save_dir


def test_a_save_that_fails_names_the_save_the_kept_checkpoint_and_the_free_space(tmp_path):
    for failure, why in (("disk_full", "OSError: [Errno 28] No space left on device"),
                         ("writer", "CheckpointException")):
        save_dir = _earlier_checkpoint(tmp_path / failure)
        message = run_distributed(_failing_save_worker, 1, str(save_dir), failure)[0]
        assert message is not None, f"{failure}: the save's failure was not a CheckpointError"
        assert message.startswith(f"the save of step 2 into {save_dir / 'iter_0000002.tmp'} failed: {why}"), message
        assert f"{save_dir / 'iter_0000001'} is the newest complete checkpoint (" in message
        assert f"MiB free on {save_dir})" in message
        # Nothing published: latest still names the earlier checkpoint, which is whole.
        assert (save_dir / "latest").read_text() == "iter_0000001\n"
        assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", "iter_0000002.tmp", "latest"]
