#!/usr/bin/env python
"""Benchmark: preprocessing throughput, our tools/preprocess_data.py vs Megatron-LM's, same corpus,
same tokenizer (SentencePiece BPE, or with --tokenizer hf a Hugging Face byte-level BPE), same worker
count, in one run.

Corpus: the builtin corpus (Python's own documentation and module sources, megatron_osp/data/
builtin_corpus.py, ~12.9 MB of JSON lines), cut to --corpus-mb; above that it repeats, and repeated
text flatters our word cache (every word of a second copy is a hit), so the default stays within one
copy. Tokenizer: trained on it by our train_sentencepiece, or with --tokenizer hf a GPT-2 style
byte-level BPE (ByteLevel pre-tokenizer with its regex, ByteLevel decoder, <|endoftext|> as EOD)
trained on it by the `tokenizers` library and saved as a directory with tokenizer.json and a
tokenizer_config.json (what Megatron-LM's HuggingFaceTokenizer loads through transformers'
AutoTokenizer). Each side runs in its own subprocess, one after the other:
  megatron-lm  Megatron-LM's own tools/preprocess_data.py (pass --megatron-lm DIR: a Megatron-LM
               checkout or `git archive core_v0.16.1 megatron/training megatron/legacy tools` of
               one; it is run from there with the installed megatron-core, never copied here).
               Its package __init__ (which imports triton) is bypassed by a small shim. Its rate is
               its own final "Processed N documents (X docs/s)" line (startup excluded).
  re-enactment without --megatron-lm: the same per-document logic (json.loads + SentencePiece
               encode, or `tokenizers` Tokenizer.encode(...).ids, per line + Megatron-Core's
               IndexedDatasetBuilder.add_document per document, Pool.imap(chunksize=32)), labelled
               as a re-enactment in the table.
  ours-no-cache  megatron_osp.data.preprocess.preprocess with word_cache=False (sp.encode or the HF
               library's encode_batch per chunk of 256 documents); rate from its own timer, which
               includes pool start and finalize.
  ours         the same with the exact word cache (megatron_osp/data/word_cache.py, for HF
               megatron_osp/data/hf_fast.py): the row the ratio and the >= 3x target are about.
The token streams must be identical (checked: the .bin files are compared byte for byte).

    python tools/bench_preprocess.py --megatron-lm /tmp/mlm --workers 1 2
    python tools/bench_preprocess.py --megatron-lm /tmp/mlm --workers 1 2 --tokenizer hf
    python tools/bench_preprocess.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs Megatron-LM's tools/preprocess_data.py with its checkout's megatron/training added to the
# installed megatron namespace; megatron/training/__init__.py is skipped (it imports triton and the
# whole training stack, none of which preprocessing uses).
_SHIM = r"""
import runpy, sys, types
root = sys.argv.pop(1)
import megatron
megatron.__path__.append(root + "/megatron")
pkg = types.ModuleType("megatron.training")
pkg.__path__ = [root + "/megatron/training"]
sys.modules["megatron.training"] = pkg
from megatron.training import global_vars
for name in dir(global_vars):
    if name.startswith("get_"):
        setattr(pkg, name, getattr(global_vars, name))
sys.argv[0] = root + "/tools/preprocess_data.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_corpus(path: str, target_mb: float) -> int:
    """Builtin corpus repeated (whole copies, then a partial one) to about ``target_mb`` MB."""
    from megatron_osp.data.builtin_corpus import iter_documents

    lines = [json.dumps({"text": d}) + "\n" for d in iter_documents(include_source=True)]
    target, written, docs = int(target_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for line in lines:
                f.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= target:
                    break
    if written > sum(len(x.encode("utf-8")) for x in lines):
        print(f"warning: --corpus-mb {target_mb} repeats the corpus; repeated text flatters the word cache")
    return docs


def _reenact_encode(line):
    data = json.loads(line)
    ids = _REENACT_ENCODE(data["text"])  # Megatron's tokenizer.tokenize
    if ids:
        ids.append(_REENACT_EOD)
    return ids, len(line)


def _reenact_init(model):
    """SentencePiece .model, or an HF directory (tokenizers' own encode, EOD <|endoftext|>)."""
    global _REENACT_ENCODE, _REENACT_EOD, _REENACT_VOCAB
    if os.path.isdir(model):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
        _REENACT_ENCODE = lambda text: tok.encode(text).ids  # noqa: E731
        _REENACT_EOD, _REENACT_VOCAB = tok.token_to_id(HF_EOD), tok.get_vocab_size(with_added_tokens=True)
        return
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    _REENACT_ENCODE, _REENACT_EOD, _REENACT_VOCAB = sp.encode, sp.eos_id(), sp.get_piece_size()


HF_EOD = "<|endoftext|>"


def train_byte_level_bpe(corpus: str, out_dir: str, vocab_size: int) -> str:
    """A GPT-2 style byte-level BPE trained on the corpus, saved where transformers can load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(corpus, encoding="utf-8") as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[HF_EOD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": HF_EOD, "bos_token": HF_EOD,
                   "unk_token": HF_EOD, "model_max_length": 10**12}, f)
    return out_dir


def _child(args) -> None:
    """One side, in its own process; prints a JSON line with its documents and processing seconds."""
    if args.child in ("ours", "ours-no-cache"):
        from megatron_osp.data.preprocess import preprocess

        s = preprocess([args.corpus], args.model, args.out, workers=args.child_workers, progress=False,
                       word_cache=args.child == "ours")
        print(json.dumps({"docs": s.documents, "seconds": s.seconds}))
        return
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    _reenact_init(args.model)
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(args.out + "_text_document.bin", dtype=DType.optimal_dtype(_REENACT_VOCAB))
    docs = 0
    with open(args.corpus, encoding="utf-8") as fin, \
            multiprocessing.Pool(args.child_workers, _reenact_init, (args.model,)) as pool:
        for ids, _ in pool.imap(_reenact_encode, fin, 32):
            builder.add_document(ids, [len(ids)])
            docs += 1
    builder.finalize(args.out + "_text_document.idx")
    print(json.dumps({"docs": docs, "seconds": time.perf_counter() - start}))


def _run(cmd: list[str], env=None) -> tuple[float, str, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, r.stdout, r.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"),
                   help="Megatron-LM checkout (core_v0.16.1) to run its tools/preprocess_data.py; "
                        "without it a labelled re-enactment of its logic is run")
    p.add_argument("--corpus-mb", type=float, default=12.0, help="above ~12.9 the corpus repeats (see above)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tokenizer", choices=["sentencepiece", "hf"], default="sentencepiece",
                   help="hf: a byte-level BPE tokenizer.json (Megatron-LM side: --tokenizer-type HuggingFaceTokenizer)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="8 MB corpus, vocab 2000, 1 worker")
    p.add_argument("--keep", default=None, help="directory to keep the corpus/tokenizer/outputs in")
    p.add_argument("--child", choices=["ours", "ours-no-cache", "reenact"], help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    if args.quick:
        args.corpus_mb, args.vocab_size, args.workers = 8.0, 2000, [1]
    mlm = args.megatron_lm
    if mlm and not os.path.exists(os.path.join(mlm, "tools", "preprocess_data.py")):
        sys.exit(f"--megatron-lm {mlm}: no tools/preprocess_data.py there")

    from megatron_osp.data.indexed import IndexedDataset
    from megatron_osp.data.tokenizer import train_sentencepiece

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_preprocess_") if args.keep is None else None
    tmp = args.keep or tmp_ctx.name
    os.makedirs(tmp, exist_ok=True)
    corpus = os.path.join(tmp, "corpus.jsonl")
    t = time.perf_counter()
    num_docs = make_corpus(corpus, args.corpus_mb)
    mb = os.path.getsize(corpus) / 1e6
    if args.tokenizer == "hf":
        model = train_byte_level_bpe(corpus, os.path.join(tmp, "hf_tok"), args.vocab_size)
        mlm_tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model]
    else:
        model = train_sentencepiece(corpus, os.path.join(tmp, "tok"), args.vocab_size, sample_documents=20000)
        mlm_tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model)]
    kind = "HF byte-level BPE" if args.tokenizer == "hf" else "SentencePiece BPE"
    print(f"corpus: {num_docs:,} documents, {mb:.1f} MB; {kind} vocab {args.vocab_size} "
          f"(corpus + tokenizer in {time.perf_counter() - t:.0f} s)", flush=True)
    shim = os.path.join(tmp, "megatron_lm_shim.py")
    with open(shim, "w") as f:
        f.write(_SHIM)
    base = "megatron-lm" if mlm else "re-enactment"
    me = os.path.abspath(__file__)
    rows = []
    for w in args.workers:
        res = {}
        for side in (base, "ours-no-cache", "ours"):
            out = os.path.join(tmp, f"{side}_w{w}")
            if side.startswith("ours"):
                wall, so, _ = _run([sys.executable, me, "--child", side, "--child-workers", str(w),
                                    "--corpus", corpus, "--model", str(model), "--out", out])
                r = json.loads(so.strip().splitlines()[-1])
            elif side == "re-enactment":
                wall, so, _ = _run([sys.executable, me, "--child", "reenact", "--child-workers", str(w),
                                    "--corpus", corpus, "--model", str(model), "--out", out])
                r = json.loads(so.strip().splitlines()[-1])
            else:
                wall, _, se = _run([sys.executable, shim, os.path.abspath(mlm), "--input", corpus,
                                    "--output-prefix", out, *mlm_tok, "--workers", str(w), "--append-eod",
                                    "--log-interval", str(num_docs)])
                m = re.findall(r"Processed (\d+) documents \(([\d.e+]+) docs/s", se)
                if not m:
                    sys.exit(f"no 'Processed N documents' line from Megatron-LM:\n{se[-3000:]}")
                n, rate = int(m[-1][0]), float(m[-1][1])
                r = {"docs": n, "seconds": n / rate}
            ds = IndexedDataset(out + "_text_document")
            r.update(wall=wall, tokens=int(ds.sequence_lengths.sum()), out=out + "_text_document")
            res[side] = r
        for side in ("ours-no-cache", "ours"):
            with open(res[base]["out"] + ".bin", "rb") as a, open(res[side]["out"] + ".bin", "rb") as b:
                same = a.read() == b.read()
            if not same:
                sys.exit(f"token streams differ between {base} and {side} (workers={w})")
        rows.append((w, res))

    print(f"\nsame tokens in all outputs: yes   tokenizer: {kind}   baseline: {base}"
          + (f" ({mlm})" if mlm else " (Megatron-LM's per-document logic, NOT its own script)"))
    print(f"{'workers':>7} {'side':>13} {'docs/s/worker':>14} {'tokens/s/worker':>16} {'MB/s/worker':>12}"
          f" {'proc s':>8} {'wall s':>8} {'ratio':>7}")
    ratios = []
    for w, res in rows:
        for side in (base, "ours-no-cache", "ours"):
            r = res[side]
            ds, ts = r["docs"] / r["seconds"] / w, r["tokens"] / r["seconds"] / w
            ratio = (res[base]["seconds"] / r["seconds"]) if side != base else None
            if side == "ours":
                ratios.append(ratio)
            print(f"{w:>7} {side:>13} {ds:>14,.0f} {ts:>16,.0f} {mb / r['seconds'] / w:>12.2f}"
                  f" {r['seconds']:>8.2f} {r['wall']:>8.2f} {'' if ratio is None else f'{ratio:.2f}x':>7}")
    print(f"docs/s ratio (ours / {base}): {', '.join(f'{x:.2f}x' for x in ratios)}; "
          f"target >= 3x -> {'met' if min(ratios) >= 3 else 'NOT met'}   (cpu count {os.cpu_count()})")
    if tmp_ctx is not None:
        tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
