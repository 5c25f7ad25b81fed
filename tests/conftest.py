import os
import warnings

import pytest

# Megatron-Core warns at import that Apex/TE are missing: expected on CPU, noise in test output.
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def megatron_single_rank():
    """A world of one process with TP=PP=1 (gloo on CPU), torn down after the test."""
    from megatron_osp import parallel, platform

    parallel.init_distributed(1, 1)
    platform.seed_everything(1234)
    yield
    parallel.shutdown()
