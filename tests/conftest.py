import os
import warnings

import numpy as np
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


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """An indexed corpus of 200 random documents (ids < 250, EOD 255) written by Megatron-Core."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "toy")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        n = int(rng.integers(10, 120))
        builder.add_document(np.append(rng.integers(0, 250, n), 255).astype(np.uint16), [n + 1])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A SentencePiece BPE model of 300 pieces (byte fallback) on short mixed-script lines."""
    import json

    from megatron_osp.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i}: abc xyz é漢 the fox {i * 7}"}) + "\n" for i in range(200)))
    return str(train_sentencepiece(corpus, d / "tok", vocab_size=300))
