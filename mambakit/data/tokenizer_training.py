"""Train a byte-level BPE tokenizer on a corpus with the `tokenizers` library."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mambakit.data.corpus import read_pieces
from mambakit.tokenizer import HFTokenizer

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 256 + 2  # the 256 bytes, the end-of-document token and at least one merge


def train_bpe_tokenizer(files: Sequence[Path], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of `vocab_size` tokens (end-of-document token included) trained on `files`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: expected >= {MIN_VOCAB} (the 256 bytes, {EOS_TOKEN} and a merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((piece for f in files for piece in read_pieces(f)), trainer=trainer)
    return HFTokenizer.from_tokenizers(tok)
