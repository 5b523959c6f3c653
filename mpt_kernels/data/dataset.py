"""Streaming, resumable, deterministic datasets over token shards (see ``convert.py``).

The properties are those of MosaicML's ``mosaicml-streaming`` (the reference design; its current
release pins numpy<2.2, transformers<5 and torchvision, which conflict with this stack, so it is not
a dependency), realised with less machinery because our shards live on a local or shared filesystem:

* **One global sample order per seed**, independent of the number of ranks and of loader workers.
  Global position ``g`` maps to (stream, sample) by pure arithmetic: no list of the epoch's samples
  is ever built, so the order costs O(1) memory at any dataset size.
* **Mixing by proportion**: each epoch of ``epoch_size`` samples takes ``round(p_s * epoch_size)``
  samples from stream ``s`` (largest-remainder rounding), then one global permutation interleaves
  them. A stream asked for more than it has repeats under a fresh permutation; one asked for fewer
  carries on where it left off in the next epoch, so over epochs every sample is seen.
* **Rank sharding**: rank ``r`` of ``W`` takes global positions ``start + r, start + r + W, ...``;
  at each step the ranks together consume one contiguous block of the global order, so the loss of
  a global batch does not depend on how many processes share it.
* **Loader workers**: worker ``w`` of ``K`` produces the rank's micro-batches ``w, w + K, ...``, which
  is exactly the round-robin order in which ``torch.utils.data.DataLoader`` hands them out.
* **Exact resumption**: ``state_dict(num_samples)`` records the global position; after
  ``load_state_dict`` iteration starts at the next sample, computed, not replayed (skipped data is
  never read).
* **Memory-mapped reads**: shards are ``np.memmap``-ed lazily in each worker; a sample read touches
  only its own ``seq_len`` tokens.

The permutations are keyed Feistel networks over the next power of four above ``n`` with
cycle-walking back into ``[0, n)``: a bijection that can be evaluated at any index.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

INDEX_FORMAT = "mpt_kernels.tokens"


# --------------------------------------------------------------------------------- permutations

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing 64-bit hash (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _round_keys(*key: int) -> np.ndarray:
    """Feistel round keys from an integer key tuple (seed, stream, pass ...), platform-independent."""
    return np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key] + [len(key)]).generate_state(
        _FEISTEL_ROUNDS, dtype=np.uint64)


def permute(indices: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Image of ``indices`` (each in ``[0, n)``) under the keyed pseudo-random permutation of
    ``[0, n)``. Vectorised; O(1) memory beyond the arrays passed in."""
    idx = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return idx.astype(np.int64)
    half_bits = max(1, math.ceil(math.log2(n) / 2))
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)

    def feistel(x):
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << shift) | right

    out = feistel(idx)
    # The network permutes [0, 4**half_bits), at most 4n values; walking the cycle until the value
    # lands back in [0, n) restricts it to a permutation of [0, n) (expected < 4 extra passes).
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = feistel(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


# --------------------------------------------------------------------------------- shards

class TokenShards:
    """A converted folder (``index.json`` + ``shard_*.bin``), read through lazy memory maps."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            hint = "convert the data first"
            splits = [d for d in ("train", "val") if (self.path / d / "index.json").is_file()]
            if splits:  # a converter --out folder: the data is in its split subfolders
                hint = "the converter writes each split to a subfolder: use " + " or ".join(
                    repr(str(self.path / d)) for d in splits)
            raise FileNotFoundError(f"TokenShards: no index.json in {str(path)!r} ({hint})")
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError as exc:  # an interrupted copy, a damaged disk: name the file, not just a column
            raise ValueError(f"TokenShards: {index_path} is not valid JSON ({exc}); reconvert the data") from None
        if not isinstance(self.index, dict) or self.index.get("format") != INDEX_FORMAT:
            raise ValueError(f"TokenShards: {index_path} is not a {INDEX_FORMAT} index")
        try:
            self.seq_len = int(self.index["seq_len"])
            self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
            self.shards = self.index["shards"]
            counts = np.array([int(s["num_samples"]) for s in self.shards], dtype=np.int64)
            sizes = [(self.path / s["file"], int(s["bytes"])) for s in self.shards]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"TokenShards: {index_path} is damaged ({type(exc).__name__}: {exc}); reconvert the data") from None
        self.eos_id = self.index.get("eos_id")
        self.vocab_size = self.index.get("vocab_size")
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self._starts[-1])
        for (f, nbytes), n in zip(sizes, counts.tolist()):  # cheap integrity check up front; full hashes via verify()
            if nbytes != n * self.seq_len * self.dtype.itemsize:
                # a file of the recorded size would still be read with the wrong shape: every sample garbled
                raise ValueError(f"TokenShards: {index_path} is inconsistent: shard {f.name} is listed with {nbytes} "
                                 f"bytes, but {n} samples x {self.seq_len} tokens of {self.dtype.name} are "
                                 f"{n * self.seq_len * self.dtype.itemsize}; reconvert the data")
            if not f.is_file() or f.stat().st_size != nbytes:
                raise ValueError(f"TokenShards: shard {f} is missing or has the wrong size (expected {nbytes} bytes)")
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.num_samples

    def resolve_tokenizer(self) -> str | None:
        """The tokenizer this index names, as a path that exists, or None when it names none.

        The converter records an absolute path (and ``tokenizer_relative``, the same file relative
        to this folder, for data moved together with its tokenizer). A relative ``tokenizer`` (older
        indexes stored it as given on the converter's command line) is tried against this folder
        first, then the current directory. Raises ``FileNotFoundError`` naming this index.json when
        no candidate exists."""
        raw = self.index.get("tokenizer")
        if not raw:
            return None
        p = Path(raw).expanduser()
        candidates = [p] if p.is_absolute() else [self.path / p, p]
        rel = self.index.get("tokenizer_relative")
        if rel:  # first: a copy of the data with its tokenizer beside it must not read the original's
            candidates.insert(0, self.path / rel)
        for c in candidates:
            if c.is_file() or (c.is_dir() and (c / "tokenizer.json").is_file()):
                return str(c.resolve())
        tried = ", ".join(repr(str(c)) for c in dict.fromkeys(candidates))
        raise FileNotFoundError(
            f"the tokenizer named by {str(self.path / 'index.json')!r} ({raw!r}) does not exist (looked for {tried}; "
            "a relative path there is resolved against that index's folder, then the current directory). Name the "
            "tokenizer explicitly with the trainer's data.tokenizer=/path/to/tokenizer.json override")

    def tokenizer_vocab_sha256(self) -> str | None:
        """:meth:`Tokenizer.vocab_sha256` of the tokenizer these shards were made with: recorded in the
        index by the converter; for an older index computed from the tokenizer it names. None when
        that is not known (an older index whose tokenizer is not found)."""
        recorded = self.index.get("tokenizer_vocab_sha256")
        if recorded:
            return str(recorded)
        try:
            path = self.resolve_tokenizer()
        except FileNotFoundError:
            return None
        return _vocab_sha256_of_file(path) if path else None

    def tokenizer_name(self) -> str:
        """The tokenizer as the index names it, for messages."""
        return str(self.index.get("tokenizer") or "(not named in the index)")

    def verify(self) -> None:
        """Hash every shard against the index (reads all the data)."""
        for s in self.shards:
            h = hashlib.sha256()
            with open(self.path / s["file"], "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != s["sha256"]:
                raise ValueError(f"TokenShards: checksum mismatch in {self.path / s['file']}")

    def _map(self, shard: int) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            s = self.shards[shard]
            m = np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["num_samples"], self.seq_len))
            self._maps[shard] = m
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        out = np.asarray(self._map(shard)[i - self._starts[shard]])
        # Sizes are checked on open, contents only by verify(): a damaged shard of the right size shows as
        # ids the tokenizer cannot have made (most random uint16 values are), which would otherwise train.
        if self.vocab_size and out.size and int(out.max()) >= int(self.vocab_size):
            raise ValueError(f"TokenShards: sample {i} in {self.path / self.shards[shard]['file']} holds token id "
                             f"{int(out.max())}, outside the tokenizer's {self.vocab_size} ids: the shard is damaged "
                             f"(TokenShards({str(self.path)!r}).verify() checks every shard's sha256); reconvert the data")
        return out

    def __getstate__(self):  # memmaps are reopened in each worker process, not pickled
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


_VOCAB_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _vocab_sha256_of_file(path: str) -> str:
    """The vocabulary hash of a tokenizer.json (a file or a folder holding one), cached per file version."""
    from .tokenizer import load_tokenizer

    f = Path(path)
    if f.is_dir():
        f = f / "tokenizer.json"
    st = f.stat()
    key = (str(f.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _VOCAB_SHA_CACHE:
        _VOCAB_SHA_CACHE[key] = load_tokenizer(f).vocab_sha256()
    return _VOCAB_SHA_CACHE[key]


def tokenizer_mismatch_error(a: str, a_tok: str, b: str, b_tok: str) -> ValueError:
    return ValueError(
        f"{a} and {b} were tokenized with different tokenizers (their vocabularies differ: {a_tok} and {b_tok}); "
        "token ids would mean different things in one model. Convert every stream with the same --tokenizer "
        "(or, to train on them anyway, set data.allow_tokenizer_mismatch=true)")


# --------------------------------------------------------------------------------- global order

@dataclass
class Stream:
    """One data source: a converted folder and its share of the mixture (None: by size)."""

    path: str
    proportion: float | None = None


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts.tolist()


class SampleOrder:
    """The deterministic global order: position ``g`` -> (stream, sample) for streams of the given
    sizes. Depends only on (sizes, proportions, epoch_size, seed, shuffle)."""

    def __init__(self, sizes: Sequence[int], proportions: Sequence[float | None] | None = None, *,
                 epoch_size: int | None = None, seed: int = 0, shuffle: bool = True):
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or any(n <= 0 for n in self.sizes):
            raise ValueError(f"SampleOrder: every stream needs at least one sample, sizes={self.sizes}")
        props = list(proportions) if proportions is not None else [None] * len(self.sizes)
        if len(props) != len(self.sizes):
            raise ValueError("SampleOrder: one proportion per stream")
        if all(p is None for p in props):
            weights = [float(n) for n in self.sizes]
        elif any(p is None for p in props):
            raise ValueError("SampleOrder: give a proportion for every stream or for none")
        else:
            if any(p < 0 for p in props) or sum(props) <= 0:
                raise ValueError(f"SampleOrder: proportions must be >= 0 with a positive sum, got {props}")
            weights = [float(p) for p in props]
        self.epoch_size = int(epoch_size) if epoch_size is not None else sum(self.sizes)
        if self.epoch_size <= 0:
            raise ValueError(f"SampleOrder: epoch_size must be positive, got {self.epoch_size}")
        self.counts = _largest_remainder(weights, self.epoch_size)
        self._cum = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream index, sample index within the stream) for global positions (any epoch)."""
        g = np.asarray(positions, dtype=np.int64)
        epoch, i = np.divmod(g, self.epoch_size)
        slot = i.copy()
        if self.shuffle:
            for e in np.unique(epoch):
                sel = epoch == e
                slot[sel] = permute(i[sel], self.epoch_size, _round_keys(self.seed, 0xE90C, int(e)))
        stream = np.searchsorted(self._cum, slot, side="right") - 1
        sample = np.empty_like(g)
        for s in np.unique(stream):
            sel = stream == s
            n_s, size = self.counts[s], self.sizes[s]
            # q walks stream s's own sequence across epochs: pass q // size is one permutation of
            # all its samples, so down-sampled streams continue where the last epoch stopped.
            q = epoch[sel] * n_s + (slot[sel] - self._cum[s])
            passes, k = np.divmod(q, size)
            out = k.copy()
            if self.shuffle:
                for p in np.unique(passes):
                    m = passes == p
                    out[m] = permute(k[m], size, _round_keys(self.seed, int(s), int(p)))
            sample[sel] = out
        return stream, sample


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _OrderedDataset(torch.utils.data.IterableDataset):
    """Shared iteration logic: rank and worker sharding over a :class:`SampleOrder`, resumable."""

    def __init__(self, order: SampleOrder, *, batch_size: int, rank: int | None, world_size: int | None,
                 num_samples: int | None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.order = order
        self.batch_size = int(batch_size)
        self._rank, self._world = rank, world_size
        self.num_samples = num_samples  # global samples to serve in total; None: endless
        self._start = 0  # global position to resume from

    def rank_world(self) -> tuple[int, int]:
        r, w = dist_rank_world()
        rank, world = (self._rank if self._rank is not None else r), (self._world if self._world is not None else w)
        if world < 1 or not 0 <= rank < world:
            # world_size=0 would serve one sample forever; rank >= world_size another rank's samples
            raise ValueError(f"rank={rank}, world_size={world}: need world_size >= 1 and 0 <= rank < world_size")
        return rank, world

    # -- resumption ------------------------------------------------------------------------------
    def state_dict(self, num_samples: int) -> dict:
        """State after the caller has consumed ``num_samples`` samples globally (all ranks together,
        counted from the start of training, not from the last resume)."""
        return {"num_samples": int(num_samples), "seed": self.order.seed, "epoch_size": self.order.epoch_size,
                "sizes": list(self.order.sizes), "counts": list(self.order.counts), "shuffle": self.order.shuffle,
                "fingerprints": self.fingerprints()}

    def fingerprints(self) -> list[str | None]:
        """Per stream, an identity of its data that survives moving it (None: unknown)."""
        return [None] * len(self.order.sizes)

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "epoch_size", "sizes", "counts", "shuffle"):
            mine = getattr(self.order, key)
            if key in state and (list(state[key]) if isinstance(mine, list) else state[key]) != mine:
                raise ValueError(f"load_state_dict: {key} differs from the checkpoint ({state[key]} vs {mine}); "
                                 "resuming would not continue the same sample order")
        saved = state.get("fingerprints") or []  # (checkpoints written before they were kept: not compared)
        for i, (theirs, mine) in enumerate(zip(saved, self.fingerprints())):
            if theirs is not None and mine is not None and theirs != mine:
                raise ValueError(f"load_state_dict: stream {i} ({self._stream_name(i)}) holds other data than the "
                                 "checkpoint's stream at that place (its shards' checksums differ: streams "
                                 "reordered, or reconverted); resuming would not continue the same samples")
        self.set_position(state["num_samples"])

    def _stream_name(self, i: int) -> str:
        return f"stream {i}"

    def set_position(self, num_samples: int) -> None:
        if int(num_samples) < 0:
            raise ValueError(f"the position (samples consumed) must be >= 0, got {num_samples}")
        self._start = int(num_samples)

    # -- iteration --------------------------------------------------------------------------------
    def _positions(self):
        """This worker's global positions, in the order the DataLoader will emit them, in chunks."""
        rank, world = self.rank_world()
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.batch_size
        end = self.num_samples
        batch_no = wid  # this rank's micro-batch counter, striding by the number of workers
        while True:
            local = batch_no * b + np.arange(b, dtype=np.int64)  # rank-local sample numbers
            g = self._start + rank + local * world
            if end is not None:
                g = g[g < end]
                if g.size == 0:
                    return
            yield g
            batch_no += nworkers

    def _read(self, stream: int, sample: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        for g in self._positions():
            streams, samples = self.order.lookup(g)
            for s, i in zip(streams.tolist(), samples.tolist()):
                yield self._read(s, i)


class StreamingTokenDataset(_OrderedDataset):
    """Pretraining samples (``{"input_ids": LongTensor[seq_len]}``) mixed from converted folders.

    ``streams``: a path, a :class:`Stream`, or a list of them (with proportions). ``batch_size`` is
    the per-rank micro-batch of the DataLoader that will read it (workers split by micro-batch).
    ``rank`` / ``world_size`` default to torch.distributed's. ``num_samples``: stop after this many
    global samples (None: endless, epochs continue). ``sequence_id``: also return the document
    number of each token within its sample (for attention that stays inside documents). Streams
    whose indexes record different tokenizers (``tokenizer_vocab_sha256``) are refused unless
    ``allow_tokenizer_mismatch``.
    """

    def __init__(self, streams: str | Stream | Sequence[str | Stream], *, seed: int = 0, shuffle: bool = True,
                 epoch_size: int | None = None, batch_size: int = 1, rank: int | None = None,
                 world_size: int | None = None, num_samples: int | None = None, sequence_id: bool = False,
                 allow_tokenizer_mismatch: bool = False):
        if isinstance(streams, (str, os.PathLike, Stream)):
            streams = [streams]
        self.streams = [s if isinstance(s, Stream) else Stream(str(s)) for s in streams]
        self.sources = [TokenShards(s.path) for s in self.streams]
        empty = [s.path for s, src in zip(self.streams, self.sources) if len(src) == 0]
        if empty:
            raise ValueError(f"StreamingTokenDataset: stream(s) {', '.join(map(repr, empty))} hold no samples "
                             "(index.json lists 0: the converted text was shorter than one sample of seq_len "
                             "tokens); reconvert with a smaller --seq-len or more data, or leave the stream out")
        seq = {src.seq_len for src in self.sources}
        if len(seq) != 1:
            raise ValueError(f"StreamingTokenDataset: all streams must share one seq_len, got {sorted(seq)}")
        self.seq_len = seq.pop()
        eos = {src.eos_id for src in self.sources}
        if len(eos) != 1:
            raise ValueError(f"StreamingTokenDataset: streams were tokenized with different eos ids {sorted(map(str, eos))}")
        self.eos_id = eos.pop()
        # recorded hashes only (nothing is loaded here): the trainer also checks older indexes
        seen = None  # (stream number, hash) of the first stream that records one
        for i, src in enumerate([] if allow_tokenizer_mismatch else self.sources):
            sha = src.index.get("tokenizer_vocab_sha256")
            if not sha:
                continue
            if seen is None:
                seen = (i, sha)
            elif sha != seen[1]:
                j = seen[0]
                raise tokenizer_mismatch_error(f"stream {self.streams[j].path!r}", self.sources[j].tokenizer_name(),
                                               f"stream {self.streams[i].path!r}", src.tokenizer_name())
        self.vocab_size = max(int(src.vocab_size or 0) for src in self.sources)
        self.sequence_id = sequence_id
        order = SampleOrder([len(s) for s in self.sources], [s.proportion for s in self.streams],
                            epoch_size=epoch_size, seed=seed, shuffle=shuffle)
        super().__init__(order, batch_size=batch_size, rank=rank, world_size=world_size, num_samples=num_samples)

    def fingerprints(self) -> list[str | None]:
        """Per stream, a hash of its shards' sha256 checksums and sample counts (from index.json): the
        same for the same data wherever it lives, different for other or reordered streams."""
        out = []
        for src in self.sources:
            sums = [(sh.get("sha256"), int(sh["num_samples"])) for sh in src.shards]
            out.append(None if any(h is None for h, _ in sums)
                       else hashlib.sha256(json.dumps(sums).encode()).hexdigest()[:16])
        return out

    def _stream_name(self, i: int) -> str:
        return repr(self.streams[i].path)

    def sample(self, position: int) -> dict:
        """The sample at global position ``position`` (for inspection and tests)."""
        s, i = self.order.lookup(np.array([position]))
        return self._read(int(s[0]), int(i[0]))

    def _read(self, stream: int, sample: int) -> dict:
        ids = torch.from_numpy(self.sources[stream][sample].astype(np.int64))
        out = {"input_ids": ids}
        if self.sequence_id:
            # A document's end-of-text token belongs to that document; the next one starts after it.
            is_eos = (ids == self.eos_id).to(torch.int64)
            out["sequence_id"] = torch.cumsum(is_eos, 0) - is_eos
        return out


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def make_loader(dataset: _OrderedDataset, *, num_workers: int = 0, pin_memory: bool = False,
                collate_fn=collate) -> torch.utils.data.DataLoader:
    """A DataLoader whose batches follow ``dataset``'s global order for this rank."""
    return torch.utils.data.DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers,
                                       pin_memory=pin_memory, collate_fn=collate_fn,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)


def describe(dataset: StreamingTokenDataset) -> dict[str, Any]:
    return {"streams": [{"path": s.path, "proportion": s.proportion, "samples": len(src), "per_epoch": c}
                        for s, src, c in zip(dataset.streams, dataset.sources, dataset.order.counts)],
            "seq_len": dataset.seq_len, "epoch_size": dataset.order.epoch_size}
