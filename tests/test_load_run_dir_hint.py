"""train.load=<a run directory> says where its checkpoints are.

Found by the training sweep: the evaluation tools and convert_to_hf.py take a run directory for its
checkpoints/, but train.load=RUN_DIR was refused as "not a checkpoint" without saying that the
checkpoints are in RUN_DIR/checkpoints. Still refused (a run directory is not a checkpoint to load),
now with the path to give.
"""

import pytest

from megatron_osp.training.checkpoint import CheckpointError, find_iteration_dir


def test_a_run_directory_given_as_a_checkpoint_names_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("iter_0000004\n")
    with pytest.raises(CheckpointError, match=rf"{run} is not a checkpoint: .*; it looks like a run directory: "
                                              rf"its checkpoints are {run / 'checkpoints'}$"):
        find_iteration_dir(run)
    assert find_iteration_dir(run / "checkpoints") == run / "checkpoints" / "iter_0000004"
    with pytest.raises(CheckpointError) as other:
        find_iteration_dir(tmp_path)  # not a run directory: no hint
    assert "run directory" not in str(other.value)
