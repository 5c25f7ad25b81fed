"""A checkpoint whose vocabulary was padded to another size is refused before anything is built.

Found by the training sweep: a resume whose layout pads the vocabulary differently (the padded size
is vocab_size rounded up to model.make_vocab_size_divisible_by x TP, so another TP size or divisor)
was refused only in load_checkpoint, after the datasets (a data index build can take minutes) and the
model had been built. The refusal (same message) now comes with the config check on resume
(resume_check.check_compatible), before the process groups, datasets and model.
"""

from megatron_osp.testing.distributed import run_distributed
from test_checkpoint import _overrides


def _worker(rank, world, corpus, root):
    from megatron_osp.training import loop, model_setup
    from megatron_osp.training.checkpoint import CheckpointError
    from megatron_osp.training.config import load_config

    base = _overrides(corpus, root, steps=4)  # the test preset: vocab_size 256, padded to 256 at TP 1
    loop.Trainer(load_config(None, base + ["train.exit_at_step=2"]), log=lambda *_: None).train()

    def built(*args, **kwargs):
        raise AssertionError("the datasets or the model were built before the refusal")

    loop.build_datasets = model_setup.build_chunks = built
    try:  # divisible by 96: padded to 288
        loop.Trainer(load_config(None, base + ["model.make_vocab_size_divisible_by=96"]),
                     log=lambda *_: None)
    except CheckpointError as e:
        return str(e)
    return None


def test_a_resume_that_pads_the_vocabulary_differently_is_refused_before_the_build(toy_corpus, tmp_path):
    message = run_distributed(_worker, 1, toy_corpus, str(tmp_path / "run"))[0]
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    assert message == (
        f"checkpoint {ckpt} has a vocabulary padded to 256 (vocab_size 256 at tensor_parallel_size=1), this model "
        "to 288; choose model.make_vocab_size_divisible_by so both layouts pad to the same size"
    )
