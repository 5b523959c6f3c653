"""Tokenize text into shards of fixed-length samples for :class:`StreamingTokenDataset`.

    python -m mpt_kernels.data.convert corpus.jsonl notes.txt src/ --out data/my_corpus \\
        --tokenizer /path/to/gpt-neox-20b/tokenizer.json --seq-len 2048 --val-fraction 0.01

Inputs: ``.txt`` files (each file is one document), ``.jsonl`` files (also ``.ndjson``, in any case;
one document per line, taken from ``--text-field``, which must be a JSON string; a ``.json`` file is
refused rather than read as one text), and folders (every file under them whose
extension is in ``--extensions``, each one document, in sorted path order so the output is
reproducible; hidden files and folders, whose names start with ".", are left out: ``.git``,
``.venv``). Files that are not UTF-8 text (binaries) or cannot be read are skipped and listed; a
UTF-8 byte-order mark at the start of a file is dropped. Without ``--tokenizer`` a byte-level BPE
is trained on the training documents (the held-out ones left out) and saved as
``<out>/tokenizer.json``.

Documents are joined end to end with the end-of-text token after each one (text in a document that
spells a special token, such as "<|endoftext|>" in code that handles tokenizers, is encoded as the
characters it is made of: the only end-of-text ids are these), and the token stream is
cut into samples of exactly ``--seq-len`` tokens (the tail shorter than one sample is dropped and
counted in the index). That is llm-foundry's "concat tokens" layout: no padding, every token trains.

Output layout (the training configs' ``data.streams`` name ``<out>/train``, ``data.val_streams``
``<out>/val``)::

    <out>/train/index.json        format, seq_len, dtype, counts, tokenizer, one entry per shard
    <out>/train/shard_00000.bin   raw little-endian uint16 (vocab <= 65536) or uint32, shape (n, seq_len)
    <out>/val/...                 the same, only with --val-fraction
    <out>/tokenizer.json          the trained BPE, only without --tokenizer

``index.json`` is written last and atomically, so a folder with an index is complete; each shard's
sha256 is in the index and :meth:`TokenShards.verify` checks them. The index records the tokenizer
as an absolute path (``tokenizer``) and relative to its own folder (``tokenizer_relative``, used when
the data moved together with its tokenizer).

Converting again into the same ``--out`` replaces what an earlier conversion wrote there, and only
once the new conversion is complete: it is written into a staging folder ``<out>/.tmp-convert-*``
(so for a while the disk holds both), then the earlier ``index.json`` and the shards it lists are
removed at the top level (older versions wrote a split-less conversion there) and in ``train/`` and
``val/``, and the new shards, tokenizer and indexes are renamed into place, the indexes last.
Nothing else is touched: files of other names stay, and a split folder holding an ``index.json`` of
another format stops the conversion before anything is written. When the conversion fails (a
malformed record, a tokenizer error, no training sample, Ctrl-C, a full disk) the staging folder is
removed and the earlier dataset is left exactly as it was; the error is reported as usual. The
staging folder of a conversion that was killed outright is removed by the next conversion into
the same ``--out`` (a running conversion holds a lock on it) and is never read as data.

With ``--val-fraction`` each document goes to ``val`` when a stable hash of its key falls below the
fraction. The key of a file is its path below its input, the folder's own name included
(``src/pkg/mod.py``), or its file name (``notes.txt``), so moving the data keeps the split; the key of a ``.jsonl`` record is its text (or its
``--id-field`` value when that is given), so inserting, removing or reordering records moves no
other record between the splits, and duplicated records land in the same split.

The converter exits non-zero when there is no document or the train split holds no complete
sample, and warns when the validation split is empty (raise ``--val-fraction`` or lower
``--seq-len``).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

try:  # POSIX: a conversion holds a lock on its staging folder's marker while it runs
    import fcntl
except ImportError:  # Windows: leftover staging folders are left alone (and ignored)
    fcntl = None

INDEX_FORMAT = "mpt_kernels.tokens"
INDEX_VERSION = 1
DEFAULT_CODE_EXTENSIONS = (".py", ".c", ".h", ".cc", ".cpp", ".cu", ".js", ".ts", ".java", ".go", ".rs", ".md", ".rst", ".txt")
SPLITS = ("train", "val")


class ConvertError(ValueError):
    """The inputs cannot make a usable dataset (no documents, no training sample)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds NeoX's 50277 ids in half the bytes of uint32; bigger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- inputs

@dataclass
class Document:
    text: str
    key: str      # stable identity used for the train/validation split (see is_validation)
    nbytes: int | None = None  # input bytes this document accounts for (progress); None: its UTF-8 size


@dataclass
class InputReport:
    """What :func:`iter_documents` made of each input: documents per input and skipped files."""

    documents: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file, why)


def _read_text_file(path: Path) -> tuple[str | None, int, str]:
    """(text, bytes read, why it was skipped); text is None for binary or unreadable files, which
    are skipped (a code folder often holds a few), not fatal."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, 0, f"unreadable: {exc.strerror or exc}"
    try:
        # utf-8-sig: a byte-order mark is no part of the text (the .jsonl reader drops it too)
        return raw.decode("utf-8-sig"), len(raw), ""
    except UnicodeDecodeError:
        return None, len(raw), "not UTF-8 text"


def _exts(extensions: Sequence[str]) -> set[str]:
    return {e if e.startswith(".") else "." + e for e in extensions}


def folder_files(folder: Path, exts: set[str]) -> list[Path]:
    """The files of a folder input, in sorted path order: those with an extension in ``exts``, below
    the folder, leaving out hidden ones: names starting with "." (.git, .venv, .env, .hidden/...),
    which are not the code a folder is given for (the bundled corpus skips them too) and may hold
    secrets. Symbolic links to folders are not followed (as ``Path.rglob``)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.suffix in exts and f.is_file():
                files.append(f)
    return sorted(files)


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _is_jsonl(path: Path) -> bool:
    """A JSON-lines input, by its extension in any case (``.JSONL`` is no text document)."""
    return path.suffix.lower() in JSONL_SUFFIXES


def iter_documents(inputs: Sequence[str | os.PathLike], *, text_field: str = "text", id_field: str | None = None,
                   extensions: Sequence[str] = DEFAULT_CODE_EXTENSIONS,
                   report: InputReport | None = None) -> Iterator[Document]:
    """Documents from ``.txt`` / ``.jsonl`` files and folders, in a reproducible order. ``report``,
    when given, is filled with the number of documents of each input and the files skipped."""
    exts = _exts(extensions)
    report = report if report is not None else InputReport()
    for inp in inputs:
        p = Path(inp)
        count = 0
        report.documents[str(inp)] = 0
        if p.is_dir():
            for f in folder_files(p, exts):
                text, nbytes, why = _read_text_file(f)
                if text is None:
                    report.skipped.append((str(f), why))
                elif text:
                    count += 1
                    report.documents[str(inp)] = count
                    yield Document(text, f"{p.name}/{f.relative_to(p).as_posix()}", nbytes)
        elif p.suffix.lower() == ".json" and p.is_file():
            # Read as text it would train on the raw JSON (brackets, keys, escapes) as one document.
            raise ValueError(f"{p}: a .json input is not read as records: write one JSON object per line as .jsonl "
                             f"(the text in --text-field), or, to train on the file's raw text, give a folder "
                             f"holding it with --extensions .json")
        elif _is_jsonl(p) and p.is_file():
            pending = 0  # bytes of blank lines and empty records, counted with the next document
            with open(p, "rb") as fh:  # bytes, so progress counts exactly what the file holds
                for n, raw in enumerate(fh):
                    pending += len(raw)
                    try:
                        line = raw.decode("utf-8-sig" if n == 0 else "utf-8").strip()
                    except UnicodeDecodeError:
                        raise ValueError(f"{p}:{n + 1}: not UTF-8 text") from None
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{p}:{n + 1}: not valid JSON ({exc})") from None
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise ValueError(f"{p}:{n + 1}: record has no {text_field!r} field (set --text-field)")
                    if id_field is not None and id_field not in rec:
                        raise ValueError(f"{p}:{n + 1}: record has no {id_field!r} field (--id-field)")
                    value = rec[text_field]
                    if not isinstance(value, str):  # str() would train on Python's text of a list or a number
                        raise ValueError(f"{p}:{n + 1}: the {text_field!r} field is {_json_type(value)}, not a string "
                                         f"(give each record its text as a JSON string, or choose --text-field)")
                    if value:
                        text = value
                        # Not the line number: inserting a record must not move the others between splits.
                        key = (f"id:{rec[id_field]}" if id_field is not None
                               else "text:" + hashlib.sha256(text.encode("utf-8")).hexdigest())
                        count += 1
                        report.documents[str(inp)] = count
                        yield Document(text, key, pending)
                        pending = 0
        elif p.is_file():
            text, nbytes, why = _read_text_file(p)
            if text is None:
                report.skipped.append((str(p), why))
            elif not text:
                report.skipped.append((str(p), "empty"))
            else:
                report.documents[str(inp)] = 1
                yield Document(text, p.name, nbytes)
        else:
            raise FileNotFoundError(f"input {str(inp)!r} does not exist")


def _json_type(value) -> str:
    """A JSON value's type, as the file spells it, for messages."""
    if value is None:
        return "null"
    for tp, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (list, "a list"),
                     (dict, "an object"), (str, "a string")):
        if isinstance(value, tp):
            return f"{name} ({json.dumps(value)[:40]})" if tp is not str else name
    return type(value).__name__


def _input_bytes(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> int:
    """Bytes :func:`iter_documents` reads: the progress bar's total."""
    exts = _exts(extensions)
    total = 0
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            total += sum(f.stat().st_size for f in folder_files(p, exts))
        elif p.is_file():
            total += p.stat().st_size
    return total


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Stable split: the same document lands in the same split on every machine and every run.
    The key is a file's name relative to its input (moving the data keeps the split) or a .jsonl
    record's text or id (its position in the file does not matter)."""
    if val_fraction <= 0:
        return False
    return (zlib.crc32(doc.key.encode()) % 1_000_000) < val_fraction * 1_000_000


# ----------------------------------------------------------------------------------------- writer

_SHARD_FILE = re.compile(r"shard_\d{5,}\.bin(\.tmp)?")


def _is_our_index(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _foreign_index_error(idx: Path) -> ConvertError:
    return ConvertError(f"{idx}: an index.json this converter did not write is in the way; choose another "
                        "output folder")


def remove_shard_outputs(folder: str | os.PathLike) -> list[Path]:
    """Delete an earlier :class:`ShardWriter`'s output in ``folder`` and nothing else: its
    ``index.json`` (only one of this converter's format) and the shards that index lists (names of
    the ``shard_NNNNN.bin`` form only), with their temporaries. A folder without such an index is
    left alone: files that merely look like shards are not ours to delete."""
    folder = Path(folder)
    removed: list[Path] = []
    idx = folder / "index.json"
    if not idx.is_file() or not _is_our_index(idx):
        return removed
    try:
        listed = [str(s["file"]) for s in json.loads(idx.read_text()).get("shards", [])]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        listed = []
    idx.unlink()  # first: the folder reads as incomplete from here on
    removed.append(idx)
    for name in [n for n in listed if _SHARD_FILE.fullmatch(n)] + ["index.json"]:
        for f in (folder / name, folder / (name + ".tmp")):
            if f.is_file():
                f.unlink()
                removed.append(f)
    return removed


@dataclass
class ShardWriter:
    """Packs a token stream into fixed-length samples and shards. ``add(ids)`` appends one document
    (its end-of-text token included by the caller); ``close()`` writes ``index.json``. Opening one
    removes an earlier index and shards in the folder, so no stale shard outlives a rewrite."""

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
        idx = self.out_dir / "index.json"
        if idx.exists() and not _is_our_index(idx):
            raise _foreign_index_error(idx)
        # The old index goes first: the folder is incomplete until the new one is written.
        remove_shard_outputs(self.out_dir)
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

def _tokenizer_meta(tokenizer: Tokenizer, split_dir: Path) -> dict:
    """Where the index finds its tokenizer: absolute (works from any cwd) and relative to the split
    folder (works after moving the data together with the tokenizer, e.g. a trained <out>/tokenizer.json)."""
    if not tokenizer.path:
        return {"tokenizer": None}
    tok = Path(tokenizer.path).resolve()
    meta = {"tokenizer": str(tok)}
    try:
        meta["tokenizer_relative"] = Path(os.path.relpath(tok, split_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        pass
    return meta


def convert_documents(docs: Iterable[Document], tokenizer: Tokenizer, out_dirs: dict[str, Path], *,
                      seq_len: int, samples_per_shard: int = 4096, val_fraction: float = 0.0,
                      batch_docs: int = 256, progress: Callable[[int], None] | None = None,
                      meta: dict | None = None, final_dirs: dict[str, Path] | None = None) -> dict[str, dict]:
    """Tokenize ``docs`` into the split folders of ``out_dirs`` ({"train": dir} or {"train", "val"}).
    Returns each split's index. ``progress(n_bytes)`` is called after each batch with the input
    bytes it covered (``Document.nbytes``, else the text's UTF-8 size). ``final_dirs``, when
    ``out_dirs`` is a staging area, names the folders the splits will be moved to: the index's
    relative tokenizer path is computed from there."""
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
            "tokenizer_vocab_sha256": tokenizer.vocab_sha256(), **(meta or {})}
    index_dirs = final_dirs or out_dirs
    writers = {split: ShardWriter(Path(d), seq_len, dtype, samples_per_shard,
                                  meta=dict(meta, **_tokenizer_meta(tokenizer, Path(index_dirs[split])), split=split))
               for split, d in out_dirs.items()}
    if val_fraction > 0 and "val" not in writers:
        raise ValueError("val_fraction > 0 needs a 'val' output folder")

    batch: list[Document] = []

    def flush():
        # A document's text is data: "<|endoftext|>" spelled in it stays text, so the only end-of-text
        # ids are the ones appended here, one per document (data.sequence_id's boundaries).
        ids = tokenizer.encode_batch([d.text for d in batch], special_tokens_as_text=True)
        for d, doc_ids in zip(batch, ids):
            split = "val" if is_validation(d, val_fraction) else "train"
            doc_ids.append(tokenizer.eos_id)
            writers[split].add(doc_ids)
        if progress is not None:
            progress(sum(d.nbytes if d.nbytes is not None else len(d.text.encode("utf-8")) for d in batch))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    return {split: w.close() for split, w in writers.items()}


def _remove_outputs(out: Path, keep: Sequence[str] = ()) -> list[Path]:
    """Remove an earlier conversion's outputs in ``out``: the old split-less layout at the top level
    and the split folders (emptied folders are removed unless named in ``keep``)."""
    removed = remove_shard_outputs(out)
    for split in SPLITS:
        d = out / split
        removed += remove_shard_outputs(d)
        if split not in keep and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed


# Reconversion is transactional: the new dataset is written into a staging folder inside <out> (same
# file system, so moving it into place is a rename) and replaces the earlier one only once complete.
_STAGING_PREFIX = ".tmp-convert-"
_STAGING_MARKER = "convert-in-progress.json"


def _check_out_dirs(dirs: dict[str, Path]) -> None:
    """Refuse, before anything is written or removed, split folders the result cannot be moved into."""
    for d in dirs.values():
        if d.exists() and not d.is_dir():
            raise ConvertError(f"{d}: not a folder, but the {d.name} split goes there; choose another output folder")
        idx = d / "index.json"
        if idx.exists() and not _is_our_index(idx):
            raise _foreign_index_error(idx)


class _Staging:
    """``<out>/.tmp-convert-XXXX``: where a conversion writes until it has succeeded. Its marker file
    is locked while the conversion runs, so a later one tells a live staging folder from the leftover
    of a killed run (:func:`_remove_leftover_staging`)."""

    def __init__(self, out: Path):
        self.path = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
        try:
            self._marker = open(self.path / _STAGING_MARKER, "w")
            if fcntl is not None:
                fcntl.flock(self._marker, fcntl.LOCK_EX)  # released by the OS when the process dies, even killed
            self._marker.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            self._marker.flush()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def remove(self) -> None:
        self._marker.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _staging_in_use(d: Path) -> bool:
    """Whether a running conversion holds ``d``. True when that cannot be told (no marker, no flock)."""
    if fcntl is None:
        return True
    try:
        with open(d / _STAGING_MARKER, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # the lock goes with the file's closing
    except OSError:  # no marker: killed between creating the folder and its marker, or not ours
        return True


def _remove_leftover_staging(out: Path, log: Callable[[str], None]) -> None:
    """Remove the staging folders of conversions into ``out`` that were killed (their marker is not
    locked any more); any other is left alone, and is no part of the dataset either way."""
    for d in sorted(out.glob(_STAGING_PREFIX + "*")):
        if not d.is_dir() or d.is_symlink():
            continue
        if _staging_in_use(d):
            log(f"convert: note: left {str(d)!r} alone: another conversion may be writing there (delete it if "
                "none is running)")
            continue
        shutil.rmtree(d, ignore_errors=True)
        log(f"convert: removed {str(d)!r}, left by an interrupted conversion")


def _commit(staging: Path, out: Path, dirs: dict[str, Path], idx: dict[str, dict], tokenizer_trained: bool) -> list[Path]:
    """Replace the earlier conversion in ``out`` by the complete one in ``staging``: the old indexes
    go first, then its shards, then the new tokenizer and shards are renamed into place and the new
    indexes last, so a split folder with an index is complete at every moment. Returns what was removed."""
    _check_out_dirs(dirs)
    removed = _remove_outputs(out, keep=tuple(dirs))
    if tokenizer_trained:
        os.replace(staging / "tokenizer.json", out / "tokenizer.json")
    for split, final in dirs.items():
        final.mkdir(exist_ok=True)
        for s in idx[split]["shards"]:
            os.replace(staging / split / s["file"], final / s["file"])
    for split, final in dirs.items():
        os.replace(staging / split / "index.json", final / "index.json")
    return removed


def _list(items: Sequence[str], limit: int = 10, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _no_documents_error(report: InputReport, exts: set[str], text_field: str) -> ConvertError:
    why = []
    for inp, n in report.documents.items():
        if n:
            continue
        p = Path(inp)
        if p.is_dir():
            why.append(f"folder {inp!r}: no non-empty UTF-8 file ending in {', '.join(sorted(exts))} (--extensions)")
        elif _is_jsonl(p):
            why.append(f"{inp!r}: no record with a non-empty {text_field!r} field")
    why += [f"{f!r}: skipped ({reason})" for f, reason in report.skipped]
    return ConvertError("no documents in the inputs, nothing to convert" + (": " + _list(why, sep="; ") if why else ""))


def convert(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, tokenizer: Tokenizer | str | None = None,
            vocab_size: int = 8192, seq_len: int = 2048, samples_per_shard: int = 4096, val_fraction: float = 0.0,
            text_field: str = "text", id_field: str | None = None,
            extensions: Sequence[str] = DEFAULT_CODE_EXTENSIONS, show_progress: bool = True,
            log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Library form of the command line: writes ``<out>/train`` (and ``<out>/val`` with
    ``val_fraction``) and returns {"train": index} (and "val"). ``log`` receives the notes and
    warnings (skipped files, an empty validation split; default: stderr). Raises
    ``FileNotFoundError`` for a missing input and :class:`ConvertError` when there is no document or
    no training sample. The result is written aside and moved into ``out_dir`` only once complete: on
    any error (KeyboardInterrupt included) an earlier conversion there is left as it was and no new
    index is left behind."""
    log = log or _stderr
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not inputs:
        raise ConvertError("no inputs given")
    missing = [str(i) for i in inputs if not Path(i).exists()]
    if missing:
        raise FileNotFoundError(f"input {missing[0]!r} does not exist" if len(missing) == 1
                                else f"inputs {_list([repr(m) for m in missing])} do not exist")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    dirs = {split: out / split for split in (SPLITS if val_fraction > 0 else ("train",))}
    _check_out_dirs(dirs)  # before anything is written: a foreign index.json stops the conversion
    _remove_leftover_staging(out, log)
    # Written aside and moved into place only when complete: a failure (bad record, interrupt, full
    # disk) leaves an earlier dataset in <out> as it was.
    staging = _Staging(out)
    try:
        idx = _convert_staged(inputs, out, dirs, staging.path, tokenizer=tokenizer, vocab_size=vocab_size,
                              seq_len=seq_len, samples_per_shard=samples_per_shard, val_fraction=val_fraction,
                              text_field=text_field, id_field=id_field, extensions=extensions,
                              show_progress=show_progress, log=log)
    except BaseException:
        staging.remove()
        if created:
            try:
                out.rmdir()  # made by this call and still empty
            except OSError:
                pass
        raise
    try:
        stale = _commit(staging.path, out, dirs, idx, tokenizer_trained=tokenizer is None)
    finally:
        staging.remove()
    if stale:
        log(f"convert: removed {len(stale)} file(s) of an earlier conversion in {str(out)!r}")
    if "val" in idx and idx["val"]["num_samples"] == 0:
        v = idx["val"]
        log(f"convert: warning: the val split is EMPTY ({v['num_documents']} document(s), {v['dropped_tail_tokens']} "
            f"tokens, fewer than --seq-len {seq_len}): {str(dirs['val'])!r} has an index with 0 samples and cannot "
            f"serve as a validation stream; raise --val-fraction ({val_fraction}) or lower --seq-len")
    return idx


def _convert_staged(inputs: Sequence[str | os.PathLike], out: Path, dirs: dict[str, Path], staging: Path, *,
                    tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, samples_per_shard: int,
                    val_fraction: float, text_field: str, id_field: str | None, extensions: Sequence[str],
                    show_progress: bool, log: Callable[[str], None]) -> dict[str, dict]:
    """:func:`convert`'s work, written into ``staging`` (``<staging>/train``, ``<staging>/val``,
    ``<staging>/tokenizer.json``) with indexes that name the tokenizer as it will be found once the
    splits are moved to ``dirs`` and a trained tokenizer to ``<out>/tokenizer.json``."""
    exts = _exts(extensions)
    doc_args = dict(text_field=text_field, id_field=id_field, extensions=extensions)

    if tokenizer is None:
        # Trained on the training documents only, so the held-out perplexity is honest.
        seen = InputReport()
        n_docs, n_train = 0, 0

        def train_texts():
            nonlocal n_docs, n_train
            for d in iter_documents(inputs, report=seen, **doc_args):
                n_docs += 1
                if not is_validation(d, val_fraction):
                    n_train += 1
                    yield d.text

        texts = train_texts()
        first = next(texts, None)
        if first is None:
            if n_docs == 0:
                raise _no_documents_error(seen, exts, text_field)
            raise ConvertError(f"all {n_docs} document(s) fell into the val split, none is left to train the "
                               f"tokenizer and the model on: lower --val-fraction ({val_fraction}) or add data")
        tokenizer = train_bpe_tokenizer(itertools.chain([first], texts), vocab_size, show_progress=show_progress)
        tokenizer.save(staging / "tokenizer.json")
        tokenizer.path = str(out.resolve() / "tokenizer.json")  # where the indexes will find it once in place

    report = InputReport()
    docs = iter_documents(inputs, report=report, **doc_args)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_input_bytes(inputs, extensions), unit="B", unit_scale=True, desc="tokenizing",
                   dynamic_ncols=True)
    try:
        idx = convert_documents(docs, tokenizer, {split: staging / split for split in dirs}, seq_len=seq_len,
                                samples_per_shard=samples_per_shard, val_fraction=val_fraction,
                                progress=bar.update if bar is not None else None,
                                meta={"inputs": [str(i) for i in inputs]}, final_dirs=dirs)
        if bar is not None and bar.n < bar.total:
            bar.update(bar.total - bar.n)  # skipped files and blank lines: every input byte has been read
    finally:
        if bar is not None:
            bar.close()

    n_docs = sum(i["num_documents"] for i in idx.values())
    if n_docs == 0:
        raise _no_documents_error(report, exts, text_field)
    if report.skipped:
        log(f"convert: skipped {len(report.skipped)} file(s): "
            + _list([f"{f} ({why})" for f, why in report.skipped]))
    for inp, n in report.documents.items():
        if n == 0:
            log(f"convert: warning: input {inp!r} gave no documents")
    train = idx["train"]
    if train["num_samples"] == 0:
        held = (f", or lower --val-fraction ({val_fraction}: {idx['val']['num_documents']} document(s) held out)"
                if "val" in idx else "")
        raise ConvertError(f"the train split has no complete sample: its {train['num_documents']} document(s) "
                           f"make {train['dropped_tail_tokens']} tokens, fewer than --seq-len {seq_len}; lower "
                           f"--seq-len or add data{held}")
    return idx


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpt_kernels.data.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help=".txt / .jsonl files and folders of code or text")
    ap.add_argument("--out", required=True,
                    help="output folder: the splits go to <out>/train (and <out>/val with --val-fraction)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (e.g. GPT-NeoX-20B's); default: train a BPE, saved as <out>/tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (no --tokenizer)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--samples-per-shard", type=int, default=4096)
    ap.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of documents as <out>/val")
    ap.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    ap.add_argument("--id-field", default=None,
                    help="field of .jsonl records that identifies them for the train/val split (default: the text)")
    ap.add_argument("--extensions", default=",".join(DEFAULT_CODE_EXTENSIONS),
                    help="comma-separated file extensions read from folders")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not 0.0 <= a.val_fraction < 1.0:
        ap.error("--val-fraction must be in [0, 1)")
    try:
        idx = convert(a.inputs, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size, seq_len=a.seq_len,
                      samples_per_shard=a.samples_per_shard, val_fraction=a.val_fraction, text_field=a.text_field,
                      id_field=a.id_field, extensions=[e.strip() for e in a.extensions.split(",") if e.strip()],
                      show_progress=not a.no_progress)
    except (ValueError, OSError) as exc:  # missing inputs, bad records, nothing to train on: no traceback
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    for split, index in idx.items():
        print(f"{split}: {index['num_samples']} samples x {index['seq_len']} tokens in {len(index['shards'])} shard(s), "
              f"{index['num_documents']} documents, {index['dropped_tail_tokens']} tail tokens dropped "
              f"-> {Path(a.out) / split}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
