"""Tokenize text into shards of fixed-length samples for :class:`StreamingTokenDataset`.

    python -m mpt_kernels.data.convert corpus.jsonl notes.txt src/ --out data/my_corpus \\
        --tokenizer /path/to/gpt-neox-20b/tokenizer.json --seq-len 2048 --val-fraction 0.01

Inputs: ``.txt`` files (each file is one document), ``.jsonl`` files (one document per line, taken
from ``--text-field``), and folders (every file under them whose extension is in ``--extensions``,
each one document, in sorted path order so the output is reproducible). Without ``--tokenizer`` a
byte-level BPE is trained on the inputs first and saved as ``<out>/tokenizer.json``.

Documents are joined end to end with the end-of-text token after each one, and the token stream is
cut into samples of exactly ``--seq-len`` tokens (the tail shorter than one sample is dropped and
counted in the index). That is llm-foundry's "concat tokens" layout: no padding, every token trains.

Output folder layout (one per split)::

    <out>/index.json              format, seq_len, dtype, counts, tokenizer, one entry per shard
    <out>/shard_00000.bin         raw little-endian uint16 (vocab <= 65536) or uint32, shape (n, seq_len)

``index.json`` is written last and atomically, so a folder with an index is complete; each shard's
sha256 is in the index and :meth:`TokenShards.verify` checks them. With ``--val-fraction`` the
documents are split by a stable hash of (input name, document position) into ``<out>/train`` and
``<out>/val``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

INDEX_FORMAT = "mpt_kernels.tokens"
INDEX_VERSION = 1
DEFAULT_CODE_EXTENSIONS = (".py", ".c", ".h", ".cc", ".cpp", ".cu", ".js", ".ts", ".java", ".go", ".rs", ".md", ".rst", ".txt")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds NeoX's 50277 ids in half the bytes of uint32; bigger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------- inputs

@dataclass
class Document:
    text: str
    key: str      # stable identity used for the train/validation split (name, not absolute path)


def _read_text_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary or undecodable files in a code folder are skipped, not fatal


def iter_documents(inputs: Sequence[str | os.PathLike], *, text_field: str = "text",
                   extensions: Sequence[str] = DEFAULT_CODE_EXTENSIONS) -> Iterator[Document]:
    """Documents from ``.txt`` / ``.jsonl`` files and folders, in a reproducible order."""
    exts = {e if e.startswith(".") else "." + e for e in extensions}
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts)
            for f in files:
                text = _read_text_file(f)
                if text:
                    yield Document(text, f"{p.name}/{f.relative_to(p).as_posix()}")
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{p}:{n + 1}: not valid JSON ({exc})") from None
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise ValueError(f"{p}:{n + 1}: record has no {text_field!r} field (set --text-field)")
                    if rec[text_field]:
                        yield Document(str(rec[text_field]), f"{p.name}:{n}")
        elif p.is_file():
            text = _read_text_file(p)
            if text:
                yield Document(text, p.name)
        else:
            raise FileNotFoundError(f"convert: input {str(inp)!r} does not exist")


def _input_bytes(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> int:
    exts = {e if e.startswith(".") else "." + e for e in extensions}
    total = 0
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in exts)
        elif p.is_file():
            total += p.stat().st_size
    return total


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Stable split: the same document lands in the same split on every machine and every run.
    The key names the document relative to its input, so moving the data keeps the split."""
    if val_fraction <= 0:
        return False
    return (zlib.crc32(doc.key.encode()) % 1_000_000) < val_fraction * 1_000_000


# ----------------------------------------------------------------------------------------- writer

@dataclass
class ShardWriter:
    """Packs a token stream into fixed-length samples and shards. ``add(ids)`` appends one document
    (its end-of-text token included by the caller); ``close()`` writes ``index.json``."""

    out_dir: Path
    seq_len: int
    dtype: np.dtype
    samples_per_shard: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        old_index = self.out_dir / "index.json"
        if old_index.exists():
            old_index.unlink()  # the folder is incomplete until the new index is written
        self._pending: list[np.ndarray] = []  # token chunks not yet cut into samples
        self._pending_len = 0
        self._samples: list[np.ndarray] = []  # complete samples of the open shard
        self.shards: list[dict] = []
        self.num_documents = 0

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= np.iinfo(self.dtype).max + 1):
            raise ValueError(f"token id out of range for {self.dtype}")
        self._pending.append(arr.astype(self.dtype))
        self._pending_len += arr.size
        self.num_documents += 1
        if self._pending_len >= self.seq_len:
            flat = np.concatenate(self._pending)
            n = flat.size // self.seq_len
            for s in flat[: n * self.seq_len].reshape(n, self.seq_len):
                self._samples.append(s)
                if len(self._samples) == self.samples_per_shard:
                    self._flush_shard()
            rest = flat[n * self.seq_len:]
            self._pending = [rest] if rest.size else []
            self._pending_len = rest.size

    def _flush_shard(self) -> None:
        if not self._samples:
            return
        data = np.ascontiguousarray(np.stack(self._samples)).astype(self.dtype.newbyteorder("<"), copy=False)
        name = f"shard_{len(self.shards):05d}.bin"
        path = self.out_dir / name
        tmp = path.with_name(name + ".tmp")
        raw = data.tobytes()
        with open(tmp, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
        self.shards.append({"file": name, "num_samples": int(data.shape[0]), "bytes": len(raw),
                            "sha256": hashlib.sha256(raw).hexdigest()})
        self._samples = []

    def close(self) -> dict:
        self._flush_shard()
        num_samples = sum(s["num_samples"] for s in self.shards)
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "seq_len": self.seq_len,
            "dtype": self.dtype.name,
            "num_samples": num_samples,
            "num_tokens": num_samples * self.seq_len,
            "num_documents": self.num_documents,
            "dropped_tail_tokens": int(self._pending_len),
            "shards": self.shards,
            **self.meta,
        }
        tmp = self.out_dir / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out_dir / "index.json")
        return index


# ----------------------------------------------------------------------------------------- convert

def convert_documents(docs: Iterable[Document], tokenizer: Tokenizer, out_dirs: dict[str, Path], *,
                      seq_len: int, samples_per_shard: int = 4096, val_fraction: float = 0.0,
                      batch_docs: int = 256, progress: Callable[[int], None] | None = None,
                      meta: dict | None = None) -> dict[str, dict]:
    """Tokenize ``docs`` into the split folders of ``out_dirs`` ({"train": dir} or {"train", "val"}).
    Returns each split's index. ``progress(n_chars)`` is called after each batch."""
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.path, **(meta or {})}
    writers = {split: ShardWriter(Path(d), seq_len, dtype, samples_per_shard, meta=dict(meta, split=split))
               for split, d in out_dirs.items()}
    if val_fraction > 0 and "val" not in writers:
        raise ValueError("val_fraction > 0 needs a 'val' output folder")

    batch: list[Document] = []

    def flush():
        ids = tokenizer.encode_batch([d.text for d in batch])
        for d, doc_ids in zip(batch, ids):
            split = "val" if is_validation(d, val_fraction) else "train"
            doc_ids.append(tokenizer.eos_id)
            writers[split].add(doc_ids)
        if progress is not None:
            progress(sum(len(d.text) for d in batch))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    return {split: w.close() for split, w in writers.items()}


def convert(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, tokenizer: Tokenizer | str | None = None,
            vocab_size: int = 8192, seq_len: int = 2048, samples_per_shard: int = 4096, val_fraction: float = 0.0,
            text_field: str = "text", extensions: Sequence[str] = DEFAULT_CODE_EXTENSIONS,
            show_progress: bool = True) -> dict[str, dict]:
    """Library form of the command line; returns {"train": index} (and "val" with val_fraction)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        texts = (d.text for d in iter_documents(inputs, text_field=text_field, extensions=extensions))
        tokenizer = train_bpe_tokenizer(texts, vocab_size, save_path=out / "tokenizer.json", show_progress=show_progress)
    if val_fraction > 0:
        dirs = {"train": out / "train", "val": out / "val"}
    else:
        dirs = {"train": out}
    docs = iter_documents(inputs, text_field=text_field, extensions=extensions)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_input_bytes(inputs, extensions), unit="B", unit_scale=True, desc="tokenizing",
                   dynamic_ncols=True)
    try:
        # Progress counts characters, the total counts bytes: close enough for ASCII-heavy text.
        return convert_documents(docs, tokenizer, dirs, seq_len=seq_len, samples_per_shard=samples_per_shard,
                                 val_fraction=val_fraction, progress=bar.update if bar is not None else None,
                                 meta={"inputs": [str(i) for i in inputs]})
    finally:
        if bar is not None:
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpt_kernels.data.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help=".txt / .jsonl files and folders of code or text")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (e.g. GPT-NeoX-20B's); default: train a BPE")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (no --tokenizer)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--samples-per-shard", type=int, default=4096)
    ap.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of documents as <out>/val")
    ap.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    ap.add_argument("--extensions", default=",".join(DEFAULT_CODE_EXTENSIONS),
                    help="comma-separated file extensions read from folders")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not 0.0 <= a.val_fraction < 1.0:
        ap.error("--val-fraction must be in [0, 1)")
    idx = convert(a.inputs, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size, seq_len=a.seq_len,
                  samples_per_shard=a.samples_per_shard, val_fraction=a.val_fraction, text_field=a.text_field,
                  extensions=[e.strip() for e in a.extensions.split(",") if e.strip()], show_progress=not a.no_progress)
    for split, index in idx.items():
        print(f"{split}: {index['num_samples']} samples x {index['seq_len']} tokens in {len(index['shards'])} shard(s), "
              f"{index['num_documents']} documents, {index['dropped_tail_tokens']} tail tokens dropped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
