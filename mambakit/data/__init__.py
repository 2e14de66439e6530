"""Data: text corpora, token files memory-mapped from disk, packed fixed-length sequences."""
from mambakit.data.corpus import Corpus, corpus_files, default_corpus_files, read_pieces, select_corpus
from mambakit.data.packed import Batch, PackedDataset, rank_sample_offset
from mambakit.data.tokenizer_training import train_bpe_tokenizer
from mambakit.data.tokens import TokenFile, build_token_file, cache_root

__all__ = [
    "Batch", "Corpus", "PackedDataset", "TokenFile", "build_token_file", "cache_root", "corpus_files",
    "default_corpus_files", "rank_sample_offset", "read_pieces", "select_corpus", "train_bpe_tokenizer",
]
