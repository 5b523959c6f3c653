"""Tokenizers, the shard converter and streaming datasets for MPT training.

    from mpt_kernels.data import load_tokenizer, StreamingTokenDataset, Stream
    tok = load_tokenizer("gpt-neox-20b/tokenizer.json")
    ds = StreamingTokenDataset([Stream("data/code/train", 0.7), Stream("data/text/train", 0.3)], seed=17, batch_size=8)

``python -m mpt_kernels.data.convert --help`` turns .txt / .jsonl / code folders into shards.
"""
from .dataset import SampleOrder, Stream, StreamingTokenDataset, TokenShards, collate, make_loader, permute
from .finetune import FinetuneDataset, format_chatml, format_mpt_instruct
from .tokenizer import Tokenizer, get_tokenizer, load_tokenizer, padded_vocab_size, train_bpe_tokenizer

__all__ = [
    "FinetuneDataset", "SampleOrder", "Stream", "StreamingTokenDataset", "TokenShards", "Tokenizer", "collate",
    "format_chatml", "format_mpt_instruct", "get_tokenizer", "load_tokenizer", "make_loader", "padded_vocab_size",
    "permute", "train_bpe_tokenizer",
]
