"""Tokenizers for MPT training, through the Hugging Face ``tokenizers`` library (Rust, no torch).

Two ways to get one, both giving the same :class:`Tokenizer` wrapper:

* :func:`load_tokenizer` reads a ``tokenizer.json`` from a local path, e.g. GPT-NeoX-20B's (the
  tokenizer MPT was trained with; 50277 tokens, ``<|endoftext|>`` = 0). No hub access is assumed.
* :func:`train_bpe_tokenizer` trains a byte-level BPE with NeoX's settings (NFC normalisation,
  ByteLevel pre-tokenizer without a prefix space, ByteLevel decoder, ``<|endoftext|>`` as token 0)
  on local text, for runs that have no tokenizer file (the tiny preset uses a few thousand tokens).

The model's embedding table is padded to a multiple of 128 (:func:`padded_vocab_size`), which keeps
the output projection's GEMM on tensor-core-friendly sizes. Note that MPT-7B's 50432 for NeoX's 50277
tokens is a multiple of 128 but not the next one (that is 50304): it is the next multiple of 256, and
the MPT presets carry 50432 themselves so their checkpoints stay interchangeable with MosaicML's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (50277 -> 50304; with 256: 50432, MPT's)."""
    if n <= 0 or multiple <= 0:
        raise ValueError(f"padded_vocab_size: n and multiple must be positive, got n={n}, multiple={multiple}")
    return -(-n // multiple) * multiple


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that knows its end-of-text id and the padded
    vocabulary size the model should use."""

    def __init__(self, tok, eos_token: str = EOS_TOKEN, path: str | None = None):
        self._tok = tok
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"tokenizer has no end-of-text token {eos_token!r} (path={path})")
        self.eos_token = eos_token
        self.eos_id = int(eos)
        pad = tok.token_to_id(PAD_TOKEN)
        self.pad_token = PAD_TOKEN if pad is not None else eos_token
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.path = path

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can emit (including added/special tokens): its largest id
        plus one, the rows an embedding needs. That is the number of tokens unless the ids have gaps
        (e.g. special tokens placed after unused ids), where ``get_vocab_size`` would count too few."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        return max(n, max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return padded_vocab_size(self.vocab_size, multiple)

    def vocab_sha256(self) -> str:
        """What the model's ids mean: the sha256 of every token and its id (added tokens included).
        Unlike a hash of the tokenizer.json file it does not change when the same tokenizer is saved
        again (our Hugging Face export re-serialises it) or by another ``tokenizers`` release; shards
        and models with equal values read ids the same way. Not cached: ``add_special_tokens``
        (ChatML's markers) changes it."""
        vocab = sorted((i, t) for t, i in self._tok.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, special_tokens_as_text: bool = False) -> list[int]:
        """Token ids of ``text``. A special token's text in it (``"<|endoftext|>"``) is that token's id,
        as in ``tokenizers`` and transformers, unless ``special_tokens_as_text``: then it is encoded as
        the characters it is made of (what a document's own text needs, see :meth:`encode_batch`)."""
        with self._specials_as_text(special_tokens_as_text):
            return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, special_tokens_as_text: bool = False) -> list[list[int]]:
        """:meth:`encode` of each text, on the Rust thread pool (RAYON_NUM_THREADS / all cores). The
        converter passes ``special_tokens_as_text=True``: a document that spells "<|endoftext|>" (code
        that handles tokenizers, text about them) must not get an end-of-text in its middle."""
        with self._specials_as_text(special_tokens_as_text):
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    @contextlib.contextmanager
    def _specials_as_text(self, on: bool):
        if not on:
            yield
            return
        if not hasattr(self._tok, "encode_special_tokens"):  # tokenizers < 0.15.1
            raise RuntimeError("encoding special tokens' text as text needs tokenizers >= 0.15.1 "
                               f"(installed: {_tokenizers_version()}); pip install -U tokenizers")
        before = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = True
        try:
            yield
        finally:
            self._tok.encode_special_tokens = before

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self._tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: a reader never sees half a tokenizer.json
        self.path = str(path.resolve())  # absolute: indexes and manifests that record it work from any cwd

    def save_hf(self, folder: str | os.PathLike, *, chat_template: str | None = None) -> None:
        """``tokenizer.json`` plus the ``tokenizer_config.json`` with which transformers' ``AutoTokenizer``
        loads it as this tokenizer: the generic fast class (the file's own pipeline, whatever model it
        came from), our end-of-text as eos/bos/unk and our padding token (without the file an MPT
        folder loads as GPTNeoXTokenizer, which for a vocabulary without ``<|padding|>``, such as some
        NeoX files, adds one as a new token: another length and another pad id than training used), no
        added BOS/EOS, no clean-up of spaces in decoding (it would change the decoded text), and
        ``chat_template`` (Jinja, for ``apply_chat_template``) when given."""
        folder = Path(folder)
        self.save(folder / "tokenizer.json")
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token, "bos_token": self.eos_token,
               "unk_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": False,
               "add_eos_token": False, "clean_up_tokenization_spaces": False}
        if chat_template is not None:
            cfg["chat_template"] = chat_template
        # transformers >= 4.43 saves a template as chat_template.jinja and prefers it: one from an
        # earlier save would override (or resurrect) the template written here
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        tmp = folder / f"tokenizer_config.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "tokenizer_config.json")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, path={self.path!r})"


def _tokenizers_version() -> str:
    import tokenizers

    return getattr(tokenizers, "__version__", "unknown")


def load_tokenizer(path: str | os.PathLike, eos_token: str = EOS_TOKEN) -> Tokenizer:
    """Load a ``tokenizer.json`` (a file, or a folder holding one) from local disk. The returned
    tokenizer's ``path`` is absolute, so whatever records it (a shard index) works from any cwd."""
    from tokenizers import Tokenizer as _HFTokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"load_tokenizer: no tokenizer.json at {str(path)!r}")
    return Tokenizer(_HFTokenizer.from_file(str(p)), eos_token=eos_token, path=str(p.resolve()))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                        save_path: str | os.PathLike | None = None, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with GPT-NeoX-20B's pipeline on ``texts``.

    ``vocab_size`` counts the 256 byte tokens, the merges and the two special tokens
    (``<|endoftext|>`` = 0, ``<|padding|>`` = 1, as in NeoX). Training is deterministic for the same
    input order. Saved atomically to ``save_path`` when given.
    """
    from tokenizers import Tokenizer as _HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_as_iterator(texts), trainer=trainer)
    out = Tokenizer(tok)
    if save_path is not None:
        out.save(save_path)
    return out


def _as_iterator(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def get_tokenizer(path: str | os.PathLike | None, *, cache_path: str | os.PathLike | None = None,
                  texts: Iterable[str] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """The tokenizer a run uses: ``path`` when given; otherwise the BPE cached at ``cache_path``;
    otherwise one trained on ``texts`` and cached there."""
    if path:
        return load_tokenizer(path)
    if cache_path is not None and Path(cache_path).is_file():
        return load_tokenizer(cache_path)
    if texts is None:
        raise ValueError("get_tokenizer: no tokenizer path, no cached tokenizer and no texts to train one on")
    return train_bpe_tokenizer(texts, vocab_size, save_path=cache_path)
