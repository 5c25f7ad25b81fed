#!/usr/bin/env python
"""Local lm-evaluation-harness tasks from a JSONL corpus's held-out documents, for machines that cannot
download benchmarks (the CPU quickstart): no network, no model.

    python examples/downstream_local_tasks.py runs/quickstart/corpus.jsonl runs/quickstart/tasks
    python tools/evaluate_downstream.py runs/quickstart/adam runs/quickstart/osp \\
        --tasks local_cloze,local_complete --include-path runs/quickstart/tasks --output-dir ...

From the last ``--held-out`` fraction of the documents (the quickstart runs' validation split is their
last 5%, data.split 95,5,0), each question is a ``--context``-character passage:

- ``local_cloze`` (multiple choice): the passage's true next ``--span`` characters against three spans
  cut from other held-out documents; chance is 25%. The passage ends before a space (at most
  ``--context`` characters) and every choice starts with one: the harness scores a choice as the tokens
  of passage + choice after the passage's own, and a passage cut inside a word would share a token with
  the choice, leaving some of the choice's characters unscored.
- ``local_complete`` (generative): greedy continuation, exact match of the next word.

Every question fits the window of the model it is for (``--seq-length``, default 128: the quickstart
model's; ``--model`` reads it from a checkpoint's or HF directory's config) without the harness cutting
its passage short: counted as at most one token per UTF-8 byte (plus the first piece and BOS), which
holds for the quickstart's character-level tokenizer and for byte-level ones; sizes that cannot fit are
refused, and a passage whose multi-byte characters would not fit is drawn again.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's megatron_osp

CLOZE = """task: local_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
COMPLETE = """task: local_complete
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [" ", "\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
"""


MAX_GEN_TOKS = 24  # local_complete's generation_kwargs.max_gen_toks
SPECIAL = 2  # BOS, and the leading piece a SentencePiece tokenizer may add


def read_texts(path) -> list[str]:
    """Each record's ``text``; SystemExit naming the file and line of a record that has none."""
    texts = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{n}: not valid JSON ({e})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise SystemExit(f"error: {path}:{n}: no string under key 'text'"
                                     + ("" if not isinstance(record, dict) or "text" not in record
                                        else f" (it holds {type(text).__name__})"))
                texts.append(text)
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}") from None
    return texts


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _window(p, args) -> int:
    """The model's window in tokens; p.error when the passage and a choice, or the passage and the
    generated tokens, cannot fit in it."""
    seq, where = args.seq_length, f"--seq-length {args.seq_length}"
    if args.model is not None:
        from megatron_osp.analysis.loading import config_facts

        if not Path(args.model).exists():
            p.error(f"--model {args.model} does not exist")
        try:
            seq = config_facts(args.model)[0]
        except Exception as e:  # noqa: BLE001 - a checkpoint without a readable config: its own message
            p.error(f"--model {args.model}: its sequence length cannot be read ({e})")
        where = f"the {seq}-token window of --model {args.model}"
    elif seq is None:
        seq, where = 128, "the quickstart model's 128-token window (--seq-length 128)"
    if seq < 1:
        p.error(f"--seq-length must be >= 1, got {seq}")
    for what, tokens in ((f"--context {args.context} + --span {args.span}", args.context + args.span),
                         (f"--context {args.context} + {MAX_GEN_TOKS} generated tokens", args.context + MAX_GEN_TOKS)):
        if tokens + SPECIAL > seq:
            p.error(f"{what} (+ {SPECIAL} for BOS and the first piece) does not fit {where}: at one token per "
                    "character the harness would cut the passage short")
    return seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="JSONL with a text field per document")
    p.add_argument("output_dir")
    p.add_argument("--held-out", type=float, default=0.05, help="last fraction of the documents (default 0.05)")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--context", type=int, default=96, help="characters of passage, at most (default 96)")
    p.add_argument("--span", type=int, default=16, help="characters per choice (default 16)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--seq-length", type=int, help="tokens the model reads at once (default 128: the quickstart "
                                                       "model's)")
    window.add_argument("--model", help="checkpoint, run or HF directory whose config gives --seq-length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace tasks of other questions already in output_dir")
    args = p.parse_args(argv)
    args.seq_length = _window(p, args)
    if not 0 < args.held_out <= 1:
        p.error(f"--held-out must be a fraction in (0, 1], got {args.held_out}")
    for option, value in (("--questions", args.questions), ("--context", args.context), ("--span", args.span)):
        if value < 1:
            p.error(f"{option} must be >= 1, got {value}")
    docs = read_texts(args.corpus)
    held = [d for d in docs[int(len(docs) * (1 - args.held_out)):] if len(d) > args.context + args.span + 1]
    fits = lambda text, more=0: len(text.encode("utf-8")) + SPECIAL + more <= args.seq_length  # noqa: E731
    if len(held) < 4:
        raise SystemExit(f"error: {args.corpus}: fewer than 4 held-out documents longer than context + span")
    # Choices start at a word boundary: a space after a non-space, with a non-blank span after it.
    starts = [[s for s in range(1, len(d) - args.span + 1)
               if d[s] == " " and not d[s - 1].isspace() and d[s:s + args.span].strip()] for d in held]
    if len({d[s:s + args.span] for d, ss in zip(held, starts) for s in ss}) < 4:
        raise SystemExit(f"error: {args.corpus}: its held-out documents hold fewer than 4 different "
                         f"{args.span}-character spans starting at a word to offer as choices (repetitive text?)")
    rng = random.Random(args.seed)
    cloze, complete = [], []
    for _ in range(args.questions):
        for _ in range(10_000):  # a passage that is one long word has no boundary to cut at: draw another
            i = rng.randrange(len(held))
            doc = held[i]
            start = rng.randrange(len(doc) - args.context - args.span)
            cut = next((s for s in reversed(starts[i]) if start + args.context // 2 < s <= start + args.context), None)
            if cut is not None and fits(doc[start:cut + args.span]):
                break
        else:
            raise SystemExit(f"error: {args.corpus}: its held-out passages of {args.context} characters have no "
                             "space to end at (a word boundary, so that the choice's characters are all scored) "
                             f"or do not fit the model's {args.seq_length} tokens")
        spans = [doc[cut:cut + args.span]]
        for _ in range(10_000):  # a corpus of near-identical documents may hold fewer than 4 distinct spans
            if len(spans) == 4:
                break
            j = rng.randrange(len(held))
            if (starts[j] and (span := held[j][(s := rng.choice(starts[j])):s + args.span]) not in spans
                    and fits(doc[start:cut] + span)):
                spans.append(span)
        else:
            raise SystemExit(f"error: {args.corpus}: its held-out documents hold fewer than 4 different "
                             f"{args.span}-character spans to offer as choices (repetitive text?)")
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": doc[start:cut], "choices": [spans[k] for k in order], "label": order.index(0)})
        context = doc[start:start + args.context]  # local_complete: the rest of a word cut short
        rest = doc[start + args.context:]
        word = rest.split()[0] if rest.strip() else ""
        if word and not rest[0].isspace() and fits(context, MAX_GEN_TOKS):
            complete.append({"context": context, "answer": word})
    from megatron_osp.fileio import atomic_write_text, unwritable_reason

    out = Path(args.output_dir)
    if (reason := unwritable_reason(out)) is not None:
        raise SystemExit(f"error: output directory {out}: {reason}")
    files = {}
    for name, rows, yaml in (("local_cloze", cloze, CLOZE), ("local_complete", complete, COMPLETE)):
        files[out / f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        # quoted: a directory name with ' #' or ': ' would cut the path short in plain YAML
        files[out / f"{name}.yaml"] = yaml.format(data=json.dumps(str((out / f"{name}.jsonl").resolve())),
                                                  max_gen=MAX_GEN_TOKS)
    other = [str(f) for f, text in files.items() if f.exists() and _read(f) != text]
    if other and not args.overwrite:  # the tasks an earlier downstream report was scored on
        raise SystemExit(f"error: {', '.join(other)} already hold other questions (another corpus, seed or "
                         "size): --overwrite replaces them, or choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        atomic_write_text(f, text)
    print(f"wrote {len(cloze)} local_cloze and {len(complete)} local_complete questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
