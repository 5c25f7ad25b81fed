"""Small tokenizers trained in a test, for the encoding paths that need a Hugging Face one."""

from __future__ import annotations


def byte_level_bpe(texts, vocab_size: int, special_tokens=("<|endoftext|>",)):
    """A GPT-2-style ``tokenizers.Tokenizer`` trained on ``texts``: byte-level BPE (ByteLevel
    pre-tokenizer with its regex, no prefix space; ByteLevel decoder; the 256-byte initial alphabet)
    with ``special_tokens`` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok
