"""The bundled default corpus: text every Python installation already has, so training needs no
download.

* ``code``: the standard library's own sources (``sysconfig.get_paths()["stdlib"]``, ``*.py``; the
  test suites, site-packages, vendored third-party code and codec tables left out), about 9 MB on
  CPython 3.11.
* ``text``: the language reference shipped for ``help()`` (``pydoc_data/topics.py``), one document
  per topic, about 0.5 MB of English prose with code examples.

Each source is split into train and validation by a stable hash of the document's name, tokenized
(with a given tokenizer, or a byte-level BPE trained on the *training* documents only, so the
held-out perplexity is honest) and written as token shards. The result is cached: a folder that
already holds a complete build for the same settings is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from .convert import Document, convert_documents, is_validation
from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

# Left out: test suites, installed and vendored third-party code, codec tables (encodings/ is a third
# of the library by size and is mostly "LATIN SMALL LETTER ..." maps) and pydoc_data (the "text"
# stream; keeping it in "code" too would leak held-out text into training).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_vendor",
              "ensurepip", "lib2to3", "turtledemo", "encodings", "pydoc_data"}


def stdlib_code_documents(max_bytes: int | None = None) -> Iterator[Document]:
    """Standard-library ``.py`` files in sorted order, each one document named by its relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    total = 0
    for f in sorted(files):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield Document(text, "stdlib/" + f.relative_to(root).as_posix())
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def reference_text_documents() -> Iterator[Document]:
    """``pydoc_data.topics``: the language reference text behind ``help('topic')``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it
        raise RuntimeError("the bundled corpus needs pydoc_data (part of the standard library); "
                           "point data.streams at your own converted data instead") from exc
    for name in sorted(topics):
        # Topics run from 200 characters to 40 kB; cutting them at blank lines into ~4 kB parts makes
        # enough documents for a held-out split that samples the whole reference, not two topics.
        part, size, n = [], 0, 0
        for para in topics[name].strip().split("\n\n"):
            part.append(para)
            size += len(para)
            if size >= 4000:
                yield Document("\n\n".join(part) + "\n", f"pydoc_topics/{name}/{n}")
                part, size, n = [], 0, n + 1
        if part and "".join(part).strip():
            yield Document("\n\n".join(part) + "\n", f"pydoc_topics/{name}/{n}")


SOURCES = {"code": stdlib_code_documents, "text": reference_text_documents}


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_default_corpus(out_dir: str | os.PathLike, *, seq_len: int, tokenizer: Tokenizer | str | None = None,
                         vocab_size: int = 8192, val_fraction: float = 0.05, max_code_bytes: int | None = None,
                         samples_per_shard: int = 2048, show_progress: bool = True) -> dict:
    """Build (or reuse) the bundled corpus under ``out_dir``.

    Returns ``{"tokenizer": path, "code": {"train": dir, "val": dir}, "text": {...}}``. The
    tokenizer is ``tokenizer`` when given, else a BPE of ``vocab_size`` trained here and saved as
    ``out_dir/tokenizer.json``.
    """
    out = Path(out_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    settings = {"python": sys.version.split()[0], "seq_len": seq_len, "val_fraction": val_fraction,
                "max_code_bytes": max_code_bytes, "vocab_size": None if tokenizer else vocab_size,
                "tokenizer": _file_sha(tokenizer.path) if tokenizer is not None and tokenizer.path else None,
                "layout": 3}  # 3: special tokens' text in a document is encoded as text
    manifest_path = out / "corpus.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == _settings_key(settings) and all(
                (out / src / split / "index.json").is_file() for src in SOURCES for split in ("train", "val")):
            return _paths(out, manifest)
        # The old build is about to be replaced piece by piece (tokenizer first, then each source): a
        # build that fails or is stopped half way must not leave a manifest that vouches for the mix.
        manifest_path.unlink()

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        train_texts = (d.text for name, fn in SOURCES.items()
                       for d in (fn(max_code_bytes) if name == "code" else fn()) if not is_validation(d, val_fraction))
        if show_progress:
            print(f"[corpus] training a byte-level BPE tokenizer ({vocab_size} tokens) on the bundled corpus",
                  file=sys.stderr, flush=True)
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size, save_path=out / "tokenizer.json")
    indexes = {}
    for name, fn in SOURCES.items():
        docs = fn(max_code_bytes) if name == "code" else fn()
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, dynamic_ncols=True)
        try:
            indexes[name] = convert_documents(
                docs, tokenizer, {"train": out / name / "train", "val": out / name / "val"}, seq_len=seq_len,
                samples_per_shard=samples_per_shard, val_fraction=val_fraction,
                progress=bar.update if bar is not None else None, meta={"source": name})
        finally:
            if bar is not None:
                bar.close()
        for split in ("train", "val"):
            if indexes[name][split]["num_samples"] == 0:
                raise ValueError(f"bundled corpus: the {name}/{split} split has no complete sample of {seq_len} "
                                 f"tokens; lower seq_len or raise val_fraction")
    manifest = {"key": _settings_key(settings), "settings": settings,
                "tokenizer": str(Path(tokenizer.path).resolve()) if tokenizer.path else None,
                "samples": {n: {s: idx[s]["num_samples"] for s in idx} for n, idx in indexes.items()}}
    tmp = manifest_path.with_name("corpus.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return _paths(out, manifest)


def _paths(out: Path, manifest: dict) -> dict:
    res = {"tokenizer": manifest["tokenizer"], "samples": manifest["samples"]}
    for src in SOURCES:
        res[src] = {split: str(out / src / split) for split in ("train", "val")}
    return res


def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
