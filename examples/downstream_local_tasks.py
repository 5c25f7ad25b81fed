#!/usr/bin/env python
"""Local lm-evaluation-harness tasks from a JSONL corpus's held-out documents, for machines that cannot
download benchmarks (the CPU quickstart): no network, no model.

    python examples/downstream_local_tasks.py runs/quickstart/corpus.jsonl runs/quickstart/tasks
    python tools/evaluate_downstream.py runs/quickstart/adam runs/quickstart/osp \\
        --tasks local_cloze,local_complete --include-path runs/quickstart/tasks --output-dir ...

From the last ``--held-out`` fraction of the documents (the quickstart runs' validation split is their
last 5%, data.split 95,5,0), each question is a ``--context``-character passage:

- ``local_cloze`` (multiple choice): the passage's true next ``--span`` characters against three spans
  cut from other held-out documents; chance is 25%.
- ``local_complete`` (generative): greedy continuation, exact match of the next word.
"""

import argparse
import json
import random
from pathlib import Path

CLOZE = """task: local_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
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
output_type: generate_until
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [" ", "\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="JSONL with a text field per document")
    p.add_argument("output_dir")
    p.add_argument("--held-out", type=float, default=0.05, help="last fraction of the documents (default 0.05)")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--context", type=int, default=160, help="characters of passage (default 160)")
    p.add_argument("--span", type=int, default=24, help="characters per choice (default 24)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.held_out <= 1:
        p.error(f"--held-out must be a fraction in (0, 1], got {args.held_out}")
    for option, value in (("--questions", args.questions), ("--context", args.context), ("--span", args.span)):
        if value < 1:
            p.error(f"{option} must be >= 1, got {value}")
    docs = read_texts(args.corpus)
    held = [d for d in docs[int(len(docs) * (1 - args.held_out)):] if len(d) > args.context + args.span + 1]
    if len(held) < 4:
        raise SystemExit(f"error: {args.corpus}: fewer than 4 held-out documents longer than context + span")
    rng = random.Random(args.seed)
    cloze, complete = [], []
    for _ in range(args.questions):
        i = rng.randrange(len(held))
        doc = held[i]
        start = rng.randrange(len(doc) - args.context - args.span)
        context = doc[start:start + args.context]
        spans = [doc[start + args.context:start + args.context + args.span]]
        for _ in range(10_000):  # a corpus of near-identical documents may hold fewer than 4 distinct spans
            if len(spans) == 4:
                break
            other = held[rng.randrange(len(held))]
            s = rng.randrange(len(other) - args.span)
            if other[s:s + args.span] not in spans:
                spans.append(other[s:s + args.span])
        else:
            raise SystemExit(f"error: {args.corpus}: its held-out documents hold fewer than 4 different "
                             f"{args.span}-character spans to offer as choices (repetitive text?)")
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": context, "choices": [spans[k] for k in order], "label": order.index(0)})
        rest = doc[start + args.context:]
        word = rest.split()[0] if rest.strip() else ""
        if word and not rest[0].isspace():
            complete.append({"context": context, "answer": word})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (("local_cloze", cloze, CLOZE), ("local_complete", complete, COMPLETE)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
        # quoted: a directory name with ' #' or ': ' would cut the path short in plain YAML
        (out / f"{name}.yaml").write_text(yaml.format(data=json.dumps(str((out / f"{name}.jsonl").resolve()))),
                                          encoding="utf-8")
    print(f"wrote {len(cloze)} local_cloze and {len(complete)} local_complete questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
