#!/usr/bin/env python
"""Export a megatron-osp checkpoint (any TP/PP layout) as a Hugging Face LlamaForCausalLM directory.

    python tools/convert_to_hf.py runs/osp/checkpoints hf/osp-tiny --dtype bfloat16

CHECKPOINT is a save directory (follows ``latest``) or one ``iter_N`` directory. SSNorm gains and
EmbProj maps are folded into plain Llama weights, so the output loads in stock transformers, vLLM
and llama.cpp. Writes config.json, generation_config.json, model.safetensors (sharded with an index
above --max-shard-size) and, when the run had one (or --tokenizer is given), the tokenizer: its
data.tokenizer_model, else the tokenizer file its data's preprocessing manifest records (a run trained
with data.eod_id on a tokenizer.json's output); a tokenizer the run recorded that is not here is an
error (--tokenizer PATH, or --no-tokenizer to export without).
Runs in one CPU process. Exit status 2 with one error line for bad input.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint save directory or iter_N directory, or a run directory (its "
                                      "checkpoints/)")
    p.add_argument("output", help="HF model directory to create (written atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the exported weights (default float32)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="SentencePiece .model, tokenizer.json or HF tokenizer directory "
                   "(default: the run's data.tokenizer_model, else the one its data's manifest records)")
    tok.add_argument("--no-tokenizer", action="store_true",
                   help="export without a tokenizer (when the run's is not available here)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for pattern in (".*Apex.*", ".*Transformer Engine.*", ".*deprecated.*", ".*TypedStorage.*"):
        warnings.filterwarnings("ignore", message=pattern)
    import os

    os.environ.setdefault("MEGATRON_OSP_FORCE_CPU", "1")  # conversion needs no GPU
    from megatron_osp.convert.hf_export import export_checkpoint
    from megatron_osp.training.checkpoint import CheckpointError, checkpoints_of

    try:
        export_checkpoint(str(checkpoints_of(args.checkpoint)), args.output, dtype=args.dtype,
                          max_shard_size=args.max_shard_size,
                          tokenizer_model=args.tokenizer, overwrite=args.overwrite,
                          write_tokenizer=not args.no_tokenizer)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
