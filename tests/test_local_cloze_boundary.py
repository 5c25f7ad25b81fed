"""examples/downstream_local_tasks.py's local_cloze against a subword tokenizer: the harness scores a
choice as the tokens of context + choice after the context's own tokens, so a context cut in the
middle of a word (whose end the tokenizer merges with the choice's first characters) left some of the
choice's characters unscored."""

from __future__ import annotations

import importlib.util
import json

from hf_run_fixtures import REPO, write_corpus


def _example():
    spec = importlib.util.spec_from_file_location("local_tasks", REPO / "examples" / "downstream_local_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_choice_is_scored_as_its_own_tokens_after_the_context(tmp_path):
    """With a byte-level BPE trained on the corpus, each cloze question's context + choice tokenizes as
    the context's tokens followed by exactly the choice's tokens, for all four choices (the distractors
    start at a word boundary too, so the true one is not told apart by its first character)."""
    from megatron_osp.testing.tokenizers import byte_level_bpe

    texts = write_corpus(tmp_path / "corpus.jsonl", 120, seed=1)
    tok = byte_level_bpe(texts, vocab_size=600)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    assert _example().main([str(tmp_path / "corpus.jsonl"), str(tmp_path / "tasks"), "--held-out", "0.2",
                            "--questions", "30", "--context", "40", "--span", "8"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "tasks" / "local_cloze.jsonl", encoding="utf-8")]
    assert len(rows) == 30
    for r in rows:
        context = enc(r["context"])
        for choice in r["choices"]:
            whole = enc(r["context"] + choice)
            assert whole[:len(context)] == context and whole[len(context):] == enc(choice), (r["context"], choice)
            assert choice[0] == " " and choice.strip(), choice
