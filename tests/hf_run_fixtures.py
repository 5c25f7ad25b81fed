"""Shared by the HF export tests (test_hf_tokenizer.py, test_export_safety.py): a tiny run made the way
a user makes one, with the CLI tools, on WikiText-like text full of the literal strings ``<unk>``,
``<s>`` and ``</s>``.

``make_run(root)``: corpus.jsonl -> tools/train_tokenizer.py (SentencePiece BPE, byte fallback) ->
tools/preprocess_data.py --append-eod -> ``python -m megatron_osp.training.pretrain`` (test preset, a
few steps, so the weights are not the initialisation) -> ``root/run`` with config.yaml,
metrics.jsonl and checkpoints/. Each step is a subprocess from the repository root, as in the README.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320
SEQ = 32
LITERALS = ("<unk>", "<s>", "</s>")
WORDS = ("the", "of", "and", "in", "to", "was", "a", "game", "season", "valkyria", "@-@", "@,@", "=", "(", ")",
         "1998", "série", "naïve", "<unk>", "<unk>", "<s>", "</s>", "<", ">", "s>", "</", "unk")


def sample_text(rng: random.Random, words: int) -> str:
    """A line in the style of WikiText-2 (``<unk>`` for rare words), with <s>/</s> literals too."""
    out = []
    for _ in range(words):
        w = rng.choice(WORDS)
        if rng.random() < 0.1:  # literals glued to words and punctuation: "<unk>'s", "(<s>"
            w = rng.choice(LITERALS) + rng.choice(("'s", ",", ".", "", "x"))
        out.append(w)
    return " ".join(out)


def write_corpus(path: Path, docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [" = " + sample_text(rng, 6) + " = \n" + "\n".join(sample_text(rng, rng.randint(8, 30))
                                                          for _ in range(rng.randint(1, 4))) for _ in range(docs)]
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return texts


def run_tool(args: list[str], cwd: Path | str = REPO, check: bool = True, timeout: int = 300):
    """``python <args>`` as a user runs it; returns the CompletedProcess (stdout/stderr text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tool(name: str) -> str:
    return str(REPO / "tools" / f"{name}.py")


def preprocess(corpus: Path, tokenizer: Path, prefix: Path) -> str:
    run_tool([tool("preprocess_data"), "--input", str(corpus), "--tokenizer-model", str(tokenizer),
              "--output-prefix", str(prefix), "--append-eod", "--workers", "1", "--no-progress"])
    return f"{prefix}_text_document"


def make_run(root: Path, steps: int = 3) -> dict:
    """The run described in the module docstring; returns its paths."""
    root = Path(root)
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, 160, seed=0)
    run_tool([tool("train_tokenizer"), "--input", str(corpus), "--output-prefix", str(root / "tokenizer"),
              "--vocab-size", str(VOCAB)])
    data = preprocess(corpus, root / "tokenizer.model", root / "corpus")
    run = root / "run"
    # Vocabulary padding on purpose (320 -> 384 rows): the export drops the padding rows, so the
    # analysis tools' Megatron perplexity must leave them out too (this run is too short to have pushed
    # their logits down, so a perplexity over the padded vocabulary differs by ~15%).
    run_tool(["-m", "megatron_osp.training.pretrain", "model.preset=test", f"model.vocab_size={VOCAB}",
              f"model.seq_length={SEQ}", "model.normalization=ssnorm", "model.embedding_projection=true",
              f"data.paths=[{data}]", f"data.tokenizer_model={root / 'tokenizer.model'}", "data.split=90,10,0",
              "optimizer.name=adam", "optimizer.lr=0.01", f"train.train_steps={steps}", "train.warmup_steps=0",
              "train.global_batch_size=4", "train.micro_batch_size=4", "train.eval_batches=1",
              "train.tensorboard=false", "train.progress_bar=false", f"train.run_dir={run}"])
    return {"root": root, "corpus": corpus, "tokenizer": root / "tokenizer.model", "data": data, "run": run,
            "checkpoints": run / "checkpoints"}
