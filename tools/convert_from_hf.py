#!/usr/bin/env python
"""Convert a Hugging Face Llama-architecture model into a megatron-osp checkpoint for continued pretraining.

    python tools/convert_from_hf.py hf/llama-tiny runs/cpt/init
    python -m megatron_osp.training.pretrain ... train.load=runs/cpt/init

Writes a weights-only checkpoint (iteration 0) whose run config describes the model: per-channel
RMSNorm, no EmbProj (``--embedding-projection`` adds identity EmbProj maps, which leave the function
unchanged). Training from it must use the same model settings (they are checked on load).
Runs in one CPU process. Exit status 2 with one error line for bad input.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="HF model directory (config.json + safetensors)")
    p.add_argument("output", help="checkpoint save directory to create")
    p.add_argument("--embedding-projection", action="store_true", help="add identity EmbProj maps")
    p.add_argument("--seq-length", type=int, help="training sequence length (default: max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padding multiple per TP rank (default 128)")
    p.add_argument("--tokenizer", help="SentencePiece .model to record as data.tokenizer_model "
                   "(default: the directory's tokenizer.model, if any)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*deprecated.*", ".*TypedStorage.*"):
        warnings.filterwarnings("ignore", message=pattern)
    import os

    os.environ.setdefault("MEGATRON_OSP_FORCE_CPU", "1")
    from megatron_osp.convert.hf_import import import_hf

    try:
        import_hf(args.hf_dir, args.output, embedding_projection=args.embedding_projection,
                  seq_length=args.seq_length, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                  tokenizer_model=args.tokenizer, seed=args.seed)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
