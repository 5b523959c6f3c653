"""Tokenizer, shard converter, streaming dataset (order, mixing, sharding, resumption), finetune data
and the bundled corpus. Small inputs throughout: the whole file runs in seconds on 2 cores."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _subproc import NEUTRAL_CWD, subprocess_env
from mpt_kernels.data import (FinetuneDataset, SampleOrder, Stream, StreamingTokenDataset, TokenShards, load_tokenizer,
                              make_loader, padded_vocab_size, permute, train_bpe_tokenizer)
from mpt_kernels.data.convert import convert, iter_documents
from mpt_kernels.data.dataset import _round_keys
from mpt_kernels.data.finetune import IGNORE_INDEX, IM_END, IM_START, INSTRUCT_INTRO, format_mpt_instruct

NEOX = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"  # ../shared
NEOX = Path(os.environ.get("MPTK_NEOX_TOKENIZER", NEOX))

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
'''
PROSE = ("The quick brown fox jumps over the lazy dog. Grüße aus Köln — naïve café, 東京, emoji 🙂. "
         "A tokenizer must round-trip every byte of its input exactly.\n")


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    texts = [CODE * 3, PROSE * 3] + [f"line {i}: value = {i * i}\n" * 5 for i in range(200)]
    return train_bpe_tokenizer(texts, 600, save_path=tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _write_inputs(root: Path) -> list[Path]:
    """A .txt, a .jsonl and a folder of code files, with varied document lengths."""
    rng = np.random.default_rng(0)
    (root / "code").mkdir()
    for i in range(7):
        (root / "code" / f"m{i}.py").write_text(CODE.replace("fibonacci", f"fib{i}") * int(rng.integers(1, 4)))
    (root / "code" / "ignored.bin").write_bytes(b"\x00\xff" * 50)
    (root / "notes.txt").write_text(PROSE * 4)
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"Document {i}. " + PROSE[: 20 + 7 * i], "id": i}) + "\n")
    return [root / "notes.txt", root / "docs.jsonl", root / "code"]


# ------------------------------------------------------------------------------------- tokenizer

def test_padded_vocab_size():
    # 50277 is NeoX-20B's; MPT-7B's 50432 is a multiple of 128 but the *next* one is 50304: MPT's
    # table is the next multiple of 256 (the presets carry 50432 themselves).
    assert padded_vocab_size(50277) == 50304
    assert padded_vocab_size(50277, 256) == 50432
    assert padded_vocab_size(8192) == 8192
    assert padded_vocab_size(1) == 128
    assert padded_vocab_size(129, 64) == 192
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_vocab_size_covers_ids_after_a_gap(tmp_path, small_tok):
    # A tokenizer.json whose end-of-text token sits after unused ids (as in tokenizers that put their
    # specials at a round number): the model needs max id + 1 rows, not the number of tokens.
    spec = json.loads(small_tok.backend.to_str())
    spec["model"]["vocab"]["<|endoftext|>"] = 5000
    for t in spec["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["id"] = 5000
    (tmp_path / "gap.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path / "gap.json")
    assert tok.eos_id == 5000 and tok.backend.get_vocab_size(with_added_tokens=True) == small_tok.vocab_size
    assert tok.vocab_size == 5001 and tok.padded_vocab_size() == 5120
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    idx = convert([tmp_path / "d.jsonl"], tmp_path / "o", tokenizer=tok, seq_len=8, show_progress=False)
    assert idx["train"]["vocab_size"] == 5001
    ds = StreamingTokenDataset(str(tmp_path / "o" / "train"), shuffle=False)
    assert tok.eos_id in torch.cat([ds.sample(g)["input_ids"] for g in range(len(ds.sources[0]))]).tolist()


def test_bpe_roundtrip_and_specials(small_tok):
    assert small_tok.eos_id == 0 and small_tok.token_to_id("<|padding|>") == 1
    assert small_tok.vocab_size == 600
    for text in (CODE, PROSE, "  leading spaces\tand tabs\n\n", "x"):
        assert small_tok.decode(small_tok.encode(text)) == text
    # Merges learned: the code sample needs far fewer tokens than bytes.
    assert len(small_tok.encode(CODE)) < 0.6 * len(CODE.encode())
    # The saved file loads back to the same tokenizer.
    again = load_tokenizer(small_tok.path)
    assert again.encode(CODE) == small_tok.encode(CODE)


def test_train_bpe_is_deterministic():
    texts = [CODE, PROSE] * 5
    a = train_bpe_tokenizer(texts, 320)
    b = train_bpe_tokenizer(texts, 320)
    assert a.encode(CODE + PROSE) == b.encode(CODE + PROSE)


@pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer.json not present (set MPTK_NEOX_TOKENIZER)")
def test_neox_tokenizer():
    tok = load_tokenizer(NEOX)
    assert tok.vocab_size == 50277 and tok.padded_vocab_size(256) == 50432
    assert tok.eos_id == 0
    assert tok.encode("hello world") == [25521, 1533]
    assert tok.decode(tok.encode(CODE)) == CODE


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------- converter

def test_convert_packs_documents_exactly(tmp_path, small_tok):
    inputs = _write_inputs(tmp_path)
    seq_len = 32
    idx = convert(inputs, tmp_path / "out", tokenizer=small_tok, seq_len=seq_len, samples_per_shard=5,
                  show_progress=False)["train"]
    docs = list(iter_documents(inputs))
    assert len(docs) == 1 + 40 + 7  # the .bin file in the folder is not a code extension
    stream = np.concatenate([np.array(small_tok.encode(d.text) + [small_tok.eos_id]) for d in docs])
    n = len(stream) // seq_len
    assert idx["num_samples"] == n and idx["dropped_tail_tokens"] == len(stream) - n * seq_len
    assert idx["dtype"] == "uint16" and idx["eos_id"] == 0
    assert [s["num_samples"] for s in idx["shards"]] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    shards = TokenShards(tmp_path / "out" / "train")
    shards.verify()
    got = np.stack([shards[i] for i in range(len(shards))]).astype(np.int64)
    np.testing.assert_array_equal(got.reshape(-1), stream[: n * seq_len])
    assert isinstance(shards._maps[0], np.memmap)
    with pytest.raises(IndexError):
        shards[len(shards)]


def test_convert_keeps_special_token_text_in_documents_as_text(tmp_path, small_tok):
    """A document spelling "<|endoftext|>" (or "<|padding|>") keeps it as text: the shards hold one
    end-of-text per document, at its end, never one from inside a document (it became id 0 there,
    cutting the document in two for data.sequence_id and teaching the model a fake boundary)."""
    docs = ['EOS = "<|endoftext|>"\nPAD = "<|padding|>"\n', "plain document", "x <|endoftext|><|endoftext|> y"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 6))
    convert([tmp_path / "d.jsonl"], tmp_path / "o", tokenizer=small_tok, seq_len=8, show_progress=False)
    shards = TokenShards(tmp_path / "o" / "train")
    flat = np.concatenate([shards[i] for i in range(len(shards))]).astype(np.int64).tolist()
    stream = []
    for d in docs * 6:
        stream += small_tok.encode(d, special_tokens_as_text=True) + [small_tok.eos_id]
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 8
    assert stream.count(small_tok.eos_id) == 18 and small_tok.token_to_id("<|padding|>") not in stream
    assert small_tok.decode(stream) == "".join(docs * 6)
    assert small_tok.encode("<|endoftext|>") == [small_tok.eos_id]  # the default is unchanged


def test_convert_checksum_detects_corruption(tmp_path, small_tok):
    convert(_write_inputs(tmp_path), tmp_path / "out", tokenizer=small_tok, seq_len=16, show_progress=False)
    shard = tmp_path / "out" / "train" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        TokenShards(tmp_path / "out" / "train").verify()
    shard.write_bytes(bytes(raw[:-2]))  # truncated: caught without hashing
    with pytest.raises(ValueError, match="wrong size"):
        TokenShards(tmp_path / "out" / "train")


def test_damaged_index_or_shard_is_a_clear_error_not_garbage(tmp_path, small_tok):
    convert(_write_inputs(tmp_path), tmp_path / "out", tokenizer=small_tok, seq_len=16, show_progress=False)
    d = tmp_path / "out" / "train"
    index = json.loads((d / "index.json").read_text())
    # An index whose seq_len (or dtype, or sample count) disagrees with its shards' byte counts: the files
    # have the recorded sizes, so only the consistency of the index itself tells that the shape is wrong.
    for key, value in (("seq_len", 8), ("dtype", "uint32")):
        (d / "index.json").write_text(json.dumps(dict(index, **{key: value})))
        with pytest.raises(ValueError, match="inconsistent"):
            TokenShards(d)
    for text in ("", json.dumps(index)[:50]):
        (d / "index.json").write_text(text)
        with pytest.raises(ValueError, match="not valid JSON"):
            TokenShards(d)
    (d / "index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "shards"}))
    with pytest.raises(ValueError, match="damaged"):
        TokenShards(d)
    (d / "index.json").write_text(json.dumps(index))
    # Overwritten contents of the right size: ids no tokenizer of this vocabulary makes are refused on read.
    shard = d / "shard_00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    with pytest.raises(ValueError, match="damaged"):
        StreamingTokenDataset(str(d), shuffle=False).sample(0)


def test_convert_val_split_and_trained_tokenizer(tmp_path):
    inputs = _write_inputs(tmp_path)
    idx = convert(inputs, tmp_path / "out", vocab_size=300, seq_len=16, val_fraction=0.25, show_progress=False)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert idx["train"]["num_documents"] + idx["val"]["num_documents"] == 48
    assert 0 < idx["val"]["num_documents"] < 24
    # Stable: the same split again.
    idx2 = convert(inputs, tmp_path / "out2", tokenizer=tmp_path / "out" / "tokenizer.json", seq_len=16,
                   val_fraction=0.25, show_progress=False)
    assert idx2["val"]["num_documents"] == idx["val"]["num_documents"]
    assert idx2["val"]["shards"][0]["sha256"] == idx["val"]["shards"][0]["sha256"]


def test_convert_rejects_bad_jsonl(tmp_path, small_tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        convert([p], tmp_path / "out", tokenizer=small_tok, seq_len=8, show_progress=False)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="JSON"):
        convert([p], tmp_path / "out", tokenizer=small_tok, seq_len=8, show_progress=False)
    with pytest.raises(FileNotFoundError):
        convert([tmp_path / "missing.txt"], tmp_path / "out", tokenizer=small_tok, seq_len=8, show_progress=False)


def test_json_lines_by_extension_in_any_case(tmp_path, small_tok):
    # data.JSONL / data.ndjson were read as one .txt-like document: the raw JSON, keys and all, trained.
    texts = [f"record number {i}" for i in range(30)]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    want = []
    for t in texts:
        want += small_tok.encode(t) + [small_tok.eos_id]
    for name in ("data.JSONL", "data.ndjson"):
        (tmp_path / name).write_text(lines)
        idx = convert([tmp_path / name], tmp_path / "o", tokenizer=small_tok, seq_len=8, show_progress=False)
        assert idx["train"]["num_documents"] == 30
        shards = TokenShards(tmp_path / "o" / "train")
        assert np.concatenate([shards[i] for i in range(len(shards))]).tolist() == want[:len(shards) * 8]
    (tmp_path / "data.json").write_text(json.dumps([{"text": t} for t in texts]))
    with pytest.raises(ValueError, match=r"\.json input"):
        convert([tmp_path / "data.json"], tmp_path / "o2", tokenizer=small_tok, seq_len=8, show_progress=False)


def test_convert_command_line(tmp_path, small_tok):
    inputs = _write_inputs(tmp_path)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "mpt_kernels.data.convert", *map(str, inputs), "--out",
                        str(tmp_path / "cli"), "--tokenizer", small_tok.path, "--seq-len", "24", "--no-progress"],
                       capture_output=True, text=True, cwd=NEUTRAL_CWD, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "samples x 24 tokens" in r.stderr
    assert TokenShards(tmp_path / "cli" / "train").num_samples > 0
    assert f"-> {tmp_path / 'cli' / 'train'}" in r.stderr


# ------------------------------------------------------------------------------------- order

@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_permute_is_a_bijection(n):
    out = permute(np.arange(n), n, _round_keys(7, n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 16:  # and actually shuffles, differently per key
        assert (out != np.arange(n)).mean() > 0.5
        assert not np.array_equal(out, permute(np.arange(n), n, _round_keys(8, n)))


def test_sample_order_mixing():
    order = SampleOrder([100, 7, 40], [0.5, 0.3, 0.2], epoch_size=200, seed=3)
    assert order.counts == [100, 60, 40]
    for epoch in range(3):
        s, i = order.lookup(np.arange(epoch * 200, (epoch + 1) * 200))
        assert np.bincount(s, minlength=3).tolist() == [100, 60, 40]
        # Global interleaving: the first quarter of an epoch already mixes every stream.
        assert len(np.unique(s[:50])) == 3
    # Upsampled stream 1 (7 samples, 60 per epoch): each run of 7 consecutive draws is a permutation.
    s, i = order.lookup(np.arange(0, 600))
    seq1 = i[s == 1]
    order_within = np.empty(0, dtype=np.int64)
    for e in range(3):  # reconstruct stream 1's own sequence in q-order, per epoch
        g = np.arange(e * 200, (e + 1) * 200)
        ss, ii = order.lookup(g)
        slot = permute(g - e * 200, 200, _round_keys(3, 0xE90C, e))
        mine = np.argsort(slot[ss == 1])
        order_within = np.concatenate([order_within, ii[ss == 1][mine]])
    for p in range(len(order_within) // 7):
        assert sorted(order_within[p * 7:(p + 1) * 7].tolist()) == list(range(7))
    assert sorted(seq1.tolist()) == sorted(order_within.tolist())


def test_downsampled_stream_covers_everything_over_epochs():
    order = SampleOrder([1000, 50], [0.5, 0.5], epoch_size=100, seed=1)
    s, i = order.lookup(np.arange(2000))
    assert len(np.unique(i[s == 0])) == 1000  # 20 epochs x 50 = every sample of stream 0 once
    assert np.bincount(i[s == 0]).max() == 1


def test_sample_order_validation():
    with pytest.raises(ValueError):
        SampleOrder([10, 0])
    with pytest.raises(ValueError):
        SampleOrder([10, 5], [0.5, None])
    with pytest.raises(ValueError):
        SampleOrder([10], [-1.0])


# ------------------------------------------------------------------------------------- dataset

@pytest.fixture(scope="module")
def two_streams(tmp_path_factory, small_tok):
    root = tmp_path_factory.mktemp("streams")
    inputs = _write_inputs(root)
    a = convert(inputs[:2], root / "a", tokenizer=small_tok, seq_len=8, samples_per_shard=16, show_progress=False)
    b = convert(inputs[2:], root / "b", tokenizer=small_tok, seq_len=8, samples_per_shard=16, show_progress=False)
    assert a["train"]["num_samples"] > 20 and b["train"]["num_samples"] > 20
    return [Stream(str(root / "a" / "train"), 0.6), Stream(str(root / "b" / "train"), 0.4)]


def _samples(ds, count):
    out = []
    for x in ds:
        out.append(x["input_ids"])
        if len(out) == count:
            break
    return torch.stack(out)


def test_global_order_independent_of_ranks_and_workers(two_streams):
    b, steps = 3, 6
    ref = StreamingTokenDataset(two_streams, seed=5, batch_size=b * 2, rank=0, world_size=1)
    want = _samples(ref, b * 2 * steps)  # one process, global batch 6
    assert torch.equal(want[0], ref.sample(0)["input_ids"])
    for workers in (0, 2):
        per_rank = []
        for rank in range(2):
            ds = StreamingTokenDataset(two_streams, seed=5, batch_size=b, rank=rank, world_size=2)
            batches = []
            for batch in make_loader(ds, num_workers=workers):
                batches.append(batch["input_ids"])
                if len(batches) == steps:
                    break
            per_rank.append(batches)
        for step in range(steps):
            # At each step, rank r holds global positions step*6 + r + 2k: together, one contiguous block.
            block = want[step * 6:(step + 1) * 6]
            assert torch.equal(per_rank[0][step], block[0::2]), (workers, step)
            assert torch.equal(per_rank[1][step], block[1::2]), (workers, step)


def test_seed_changes_order(two_streams):
    a = _samples(StreamingTokenDataset(two_streams, seed=1), 20)
    b = _samples(StreamingTokenDataset(two_streams, seed=2), 20)
    assert not torch.equal(a, b)
    assert torch.equal(a, _samples(StreamingTokenDataset(two_streams, seed=1), 20))


def test_resume_exactly_without_reading_skipped(two_streams, monkeypatch):
    full = _samples(StreamingTokenDataset(two_streams, seed=9, batch_size=2), 40)
    ds = StreamingTokenDataset(two_streams, seed=9, batch_size=2)
    state = ds.state_dict(num_samples=25)
    json.dumps(state)  # checkpointable as plain JSON
    reads = []
    orig = TokenShards.__getitem__
    monkeypatch.setattr(TokenShards, "__getitem__", lambda self, i: reads.append(i) or orig(self, i))
    resumed = StreamingTokenDataset(two_streams, seed=9, batch_size=2)
    resumed.load_state_dict(state)
    got = _samples(resumed, 15)
    assert torch.equal(got, full[25:40])
    assert len(reads) == 15  # only the samples served were read
    other = StreamingTokenDataset(two_streams, seed=10, batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_resume_refuses_other_data_of_the_same_sizes(two_streams, tmp_path):
    """The state compared only the streams' sample counts: two streams of equal size swapped in the
    config, or a stream reconverted to other data of the same size, resumed silently at the old
    positions of other samples. Each stream's shards' checksums now go into the state; the same data
    moved elsewhere still resumes."""
    a = Path(two_streams[0].path)
    copy_a, other = tmp_path / "a_copy", tmp_path / "a_other"
    shutil.copytree(a, copy_a)
    shutil.copytree(a, other)
    index = json.loads((other / "index.json").read_text())
    first = other / index["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[:2], data[2:4] = data[2:4], data[:2]  # two token ids swapped: same size, other data
    first.write_bytes(bytes(data))
    index["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (other / "index.json").write_text(json.dumps(index))

    ds = StreamingTokenDataset([Stream(str(a), 0.5), Stream(str(copy_a), 0.5)], seed=3)
    state = json.loads(json.dumps(ds.state_dict(num_samples=7)))  # as a checkpoint stores it
    moved = StreamingTokenDataset([Stream(str(copy_a), 0.5), Stream(str(a), 0.5)], seed=3)
    moved.load_state_dict(state)  # the same data in other places (here: the two copies swapped)
    assert torch.equal(_samples(moved, 5), _samples(_resumed(ds, state), 5))
    changed = StreamingTokenDataset([Stream(str(a), 0.5), Stream(str(other), 0.5)], seed=3)
    with pytest.raises(ValueError, match=r"stream 1 .*a_other.* holds other data"):
        changed.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "fingerprints"}  # a checkpoint from before: not compared
    changed.load_state_dict(legacy)


def _resumed(ds, state):
    ds.load_state_dict(state)
    return ds


def test_bad_rank_world_size_or_position_is_refused(two_streams):
    # rank 2 of 2 silently served rank 0's samples one row on, rank -1 the last sample of the previous
    # "epoch", world_size=0 one sample forever: the DataLoader never ended.
    for rank, world in ((2, 2), (-1, 2), (0, 0), (1, None)):
        ds = StreamingTokenDataset(two_streams, rank=rank, world_size=world, num_samples=8)
        with pytest.raises(ValueError, match="rank"):
            next(iter(ds))
    ds = StreamingTokenDataset(two_streams)
    with pytest.raises(ValueError, match=">= 0"):
        ds.load_state_dict(ds.state_dict(-3))


def test_finite_dataset_and_epochs(two_streams):
    ds = StreamingTokenDataset(two_streams, seed=0, shuffle=False, num_samples=11, batch_size=4)
    batches = [b["input_ids"].shape[0] for b in make_loader(ds)]
    assert batches == [4, 4, 3]
    endless = StreamingTokenDataset(two_streams, seed=0)
    n = endless.order.epoch_size
    assert len(_samples(endless, n + 5)) == n + 5  # runs into the second epoch


def test_sequence_id(tmp_path, small_tok):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab", "cde fgh", "ij"] * 20))
    convert([tmp_path / "d.jsonl"], tmp_path / "o", tokenizer=small_tok, seq_len=12, show_progress=False)
    ds = StreamingTokenDataset(str(tmp_path / "o" / "train"), shuffle=False, sequence_id=True)
    x = next(iter(ds))
    ids, seq = x["input_ids"].tolist(), x["sequence_id"].tolist()
    doc = 0
    for t, s in zip(ids, seq):
        assert s == doc
        if t == small_tok.eos_id:
            doc += 1


def test_dataset_errors(tmp_path, two_streams, small_tok):
    with pytest.raises(FileNotFoundError):
        StreamingTokenDataset(str(tmp_path))
    convert([_write_inputs(tmp_path)[1]], tmp_path / "long", tokenizer=small_tok, seq_len=16, show_progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        StreamingTokenDataset(two_streams + [Stream(str(tmp_path / "long" / "train"), 0.1)])


# ------------------------------------------------------------------------------------- finetune

def test_mpt_instruct_format_exact():
    segs = format_mpt_instruct({"prompt": "Add 2 and 3.", "response": "5"})
    assert segs == [(f"{INSTRUCT_INTRO}\n### Instruction:\nAdd 2 and 3.\n### Response:\n", False), ("5<|endoftext|>", True)]


@pytest.mark.parametrize("fmt", ["mpt-instruct", "chatml"])
def test_finetune_labels_only_on_response(tmp_path, small_tok, fmt):
    from mpt_kernels.data.tokenizer import load_tokenizer as _load

    tok = _load(small_tok.path)  # chatml adds tokens: keep the shared fixture untouched
    recs = [{"prompt": f"What is {i} squared?", "response": f"It is {i * i}."} for i in range(12)]
    recs.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    if fmt == "chatml":  # (mpt-instruct refuses a system prompt: test_mpt_instruct_refuses_a_system_prompt)
        recs.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."}]})
        recs.append({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    recs.append({"prompt": "long " * 400, "response": "dropped: nothing of it fits"})
    p = tmp_path / "ft.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = FinetuneDataset(p, tok, max_seq_len=192, fmt=fmt, shuffle=False, batch_size=4)
    assert ds.dropped == 1 and len(ds) == len(recs) - 1
    ids, labels = ds.examples[0]
    resp = tok.encode("It is 0." + ("<|endoftext|>" if fmt == "mpt-instruct" else IM_END))
    trained = labels[labels != IGNORE_INDEX].tolist()
    assert trained == resp
    assert labels[: len(ids) - len(resp) - (1 if fmt == "chatml" else 0)].tolist() == [IGNORE_INDEX] * (
        len(ids) - len(resp) - (1 if fmt == "chatml" else 0))
    assert tok.decode(ids.tolist(), skip_special_tokens=False).count("What is 0 squared?") == 1
    if fmt == "chatml":
        assert tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None
        multi_ids, multi_labels = ds.examples[-1]
        assert tok.decode(multi_labels[multi_labels != IGNORE_INDEX].tolist(), skip_special_tokens=False) == \
            f"b{IM_END}d{IM_END}"
    batch = next(iter(make_loader(ds, collate_fn=ds.collate)))
    lens = [len(ds.examples[i][0]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lens))
    for row, n in enumerate(lens):
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tok.pad_id).all()


def test_finetune_rejects_bad_records(tmp_path, small_tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        FinetuneDataset(p, small_tok, max_seq_len=32)
    p.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    with pytest.raises(ValueError, match="fmt"):
        FinetuneDataset(p, small_tok, max_seq_len=32, fmt="alpaca")


def test_finetune_end_markers_are_single_ids_even_when_not_registered_as_special(tmp_path, small_tok):
    # A tokenizer.json with <|endoftext|> (and the ChatML markers) in its vocabulary but not among its
    # added tokens: encoding the marker's text gave byte-level pieces, so the response never ended in
    # the end-of-text id and the model was trained to spell "<|endoftext|>" out.
    spec = json.loads(small_tok.backend.to_str())
    n = small_tok.vocab_size
    spec["model"]["vocab"].update({IM_START: n, IM_END: n + 1})
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    (tmp_path / "ft.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    for fmt, end in (("mpt-instruct", "<|endoftext|>"), ("chatml", IM_END)):
        tok = load_tokenizer(tmp_path / "tok.json")
        end_id, vocab = tok.token_to_id(end), tok.vocab_sha256()
        assert len(tok.encode(end)) > 1  # the trap
        ids, labels = FinetuneDataset(tmp_path / "ft.jsonl", tok, max_seq_len=512, fmt=fmt).examples[0]
        trained = ids[labels != IGNORE_INDEX].tolist()
        assert trained == tok.encode("b") + [end_id], fmt
        assert tok.vocab_sha256() == vocab and tok.token_to_id(end) == end_id  # same ids, same vocabulary


def test_finetune_names_the_line_of_a_record_it_cannot_use(tmp_path, small_tok):
    good = json.dumps({"prompt": "a", "response": "b"}) + "\n"
    p = tmp_path / "ft.jsonl"
    p.write_bytes(good.encode() + b'{"prompt": "caf\xe9", "response": "b"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"ft\.jsonl:2: not UTF-8"):  # was a bare UnicodeDecodeError
        FinetuneDataset(p, small_tok, max_seq_len=32)
    # A chat with no assistant turn has nothing to train on: it was dropped and counted "as too long".
    for msgs in ([{"role": "user", "content": "hi"}], []):
        p.write_text(good + json.dumps({"messages": msgs}) + "\n")
        with pytest.raises(ValueError, match=r"ft\.jsonl:2: .*no assistant turn"):
            FinetuneDataset(p, load_tokenizer(small_tok.path), max_seq_len=32, fmt="chatml")  # chatml adds tokens


# ------------------------------------------------------------------------------------- corpus

def test_bundled_corpus(tmp_path):
    import time

    from mpt_kernels.data.corpus import build_default_corpus

    paths = build_default_corpus(tmp_path / "c", seq_len=64, vocab_size=512, max_code_bytes=300_000,
                                 val_fraction=0.1, show_progress=False)
    tok = load_tokenizer(paths["tokenizer"])
    assert tok.vocab_size == 512
    for src in ("code", "text"):
        for split in ("train", "val"):
            assert TokenShards(paths[src][split]).num_samples > 0
    ds = StreamingTokenDataset([Stream(paths["code"]["train"], 0.7), Stream(paths["text"]["train"], 0.3)])
    text = tok.decode(ds.sample(0)["input_ids"].tolist())
    assert len(text) > 64
    t0 = time.perf_counter()
    again = build_default_corpus(tmp_path / "c", seq_len=64, vocab_size=512, max_code_bytes=300_000,
                                 val_fraction=0.1, show_progress=False)
    assert again == paths and time.perf_counter() - t0 < 1.0  # cached, not rebuilt


def test_bundled_corpus_failed_rebuild_is_not_reused(tmp_path, monkeypatch):
    # A rebuild with other settings retrains the tokenizer and rewrites the code stream, then fails on
    # the text stream. Asking for the first settings again found their manifest and four indexes and
    # reused them: code shards of the new tokenizer, text shards of the old one, and the new tokenizer.
    from mpt_kernels.data import corpus

    kw = dict(seq_len=64, max_code_bytes=100_000, val_fraction=0.1, show_progress=False)
    corpus.build_default_corpus(tmp_path / "c", vocab_size=512, **kw)
    real = corpus.convert_documents

    def failing(docs, tokenizer, out_dirs, **k):
        if "text" in str(out_dirs["train"]):
            raise KeyboardInterrupt
        return real(docs, tokenizer, out_dirs, **k)

    monkeypatch.setattr(corpus, "convert_documents", failing)
    with pytest.raises(KeyboardInterrupt):
        corpus.build_default_corpus(tmp_path / "c", vocab_size=400, **kw)
    monkeypatch.setattr(corpus, "convert_documents", real)
    paths = corpus.build_default_corpus(tmp_path / "c", vocab_size=512, **kw)
    tok = load_tokenizer(paths["tokenizer"])
    assert tok.vocab_size == 512
    for src in ("code", "text"):
        assert TokenShards(paths[src]["train"]).index["tokenizer_vocab_sha256"] == tok.vocab_sha256()


# ------------------------------------------------------------------------------------- converter: walkthrough fixes

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mpt_kernels.data.convert", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=NEUTRAL_CWD, env=subprocess_env())


def test_index_tokenizer_path_works_from_any_directory(tmp_path, small_tok, monkeypatch):
    import shutil


    (tmp_path / "tok").mkdir()
    shutil.copy(small_tok.path, tmp_path / "tok" / "tokenizer.json")
    inputs = _write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The user's repro: --tokenizer relative to the converter's cwd, training from elsewhere.
    idx = convert(inputs, "out", tokenizer="tok/tokenizer.json", seq_len=16, show_progress=False, log=lambda m: None)
    want = str((tmp_path / "tok" / "tokenizer.json").resolve())
    assert idx["train"]["tokenizer"] == want
    assert json.loads((tmp_path / "out" / "train" / "index.json").read_text())["tokenizer"] == want
    bpe = convert(inputs, "bpe", vocab_size=300, seq_len=16, show_progress=False, log=lambda m: None)
    assert bpe["train"]["tokenizer"] == str((tmp_path / "bpe" / "tokenizer.json").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shards = TokenShards(tmp_path / "out" / "train")
    assert shards.resolve_tokenizer() == want
    assert load_tokenizer(shards.resolve_tokenizer()).vocab_size == small_tok.vocab_size

    # Old indexes stored the path as given: relative to the index's folder first, then the cwd.
    index_file = tmp_path / "out" / "train" / "index.json"
    index = json.loads(index_file.read_text())
    del index["tokenizer_relative"]

    def old(tok):
        index_file.write_text(json.dumps(dict(index, tokenizer=tok)))
        return TokenShards(index_file.parent).resolve_tokenizer()

    assert old("../../tok/tokenizer.json") == want  # relative to the index's folder
    monkeypatch.chdir(tmp_path)
    assert old("tok/tokenizer.json") == want  # relative to the cwd (the converter's, here)
    assert old("tok") == str((tmp_path / "tok").resolve())  # a folder holding tokenizer.json, as load_tokenizer takes
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match=r"index\.json.*data\.tokenizer="):
        old("tok/tokenizer.json")
    index_file.write_text(json.dumps({k: v for k, v in index.items() if k != "tokenizer"}))
    assert TokenShards(index_file.parent).resolve_tokenizer() is None

    # Data moved together with its trained tokenizer: the index's relative path still finds it.
    shutil.move(str(tmp_path / "bpe"), str(tmp_path / "moved"))
    moved = TokenShards(tmp_path / "moved" / "train")
    assert moved.resolve_tokenizer() == str((tmp_path / "moved" / "tokenizer.json").resolve())


def test_convert_refuses_empty_train_and_no_documents(tmp_path, small_tok):
    from mpt_kernels.data.convert import ConvertError

    logs = []
    (tmp_path / "blob.bin").write_bytes(b"\x00\xff\xfe" * 30)
    with pytest.raises(ConvertError, match=r"no documents.*blob\.bin.*not UTF-8"):
        convert([tmp_path / "blob.bin"], tmp_path / "o1", tokenizer=small_tok, seq_len=8, show_progress=False,
                log=logs.append)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "data.bin").write_bytes(b"\x00")
    (tmp_path / "src" / "image.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConvertError, match=r"no documents.*src': no non-empty UTF-8 file ending in .*; .*image\.py': skipped"):
        convert([tmp_path / "src"], tmp_path / "o1", vocab_size=300, seq_len=8, show_progress=False,
                log=logs.append)  # the BPE pass finds nothing either
    assert not (tmp_path / "o1" / "train" / "index.json").exists()
    r = _cli(tmp_path / "blob.bin", "--out", tmp_path / "o2", "--tokenizer", small_tok.path, "--seq-len", "8")
    assert r.returncode != 0 and "no documents" in r.stderr and "blob.bin" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    inputs = _write_inputs(tmp_path)
    with pytest.raises(ConvertError, match=r"train split has no complete sample.*--seq-len 100000"):
        convert(inputs, tmp_path / "o3", tokenizer=small_tok, seq_len=100_000, show_progress=False, log=logs.append)
    assert not (tmp_path / "o3" / "train" / "index.json").exists()  # no "complete" empty dataset left behind

    # A binary file among the inputs is reported, not silently dropped.
    (tmp_path / "code" / "garbage.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    logs.clear()
    convert(inputs, tmp_path / "o4", tokenizer=small_tok, seq_len=16, show_progress=False, log=logs.append)
    assert any("skipped 1 file" in m and "garbage.py (not UTF-8 text)" in m for m in logs), logs


def test_convert_warns_on_empty_val_and_dataset_names_empty_stream(tmp_path, small_tok):
    inputs = _write_inputs(tmp_path)
    logs = []
    # Enough text for a few 256-token training samples; the 2 held-out documents make 239 tokens.
    idx = convert(inputs, tmp_path / "out", tokenizer=small_tok, seq_len=256, val_fraction=0.05,
                  show_progress=False, log=logs.append)
    assert idx["train"]["num_samples"] > 0 and idx["val"]["num_samples"] == 0
    warning = [m for m in logs if "val split is EMPTY" in m]
    assert warning and "--val-fraction" in warning[0] and "--seq-len" in warning[0], logs
    val = str(tmp_path / "out" / "val")
    with pytest.raises(ValueError, match=r"stream\(s\) '" + val.replace("\\", "\\\\") + "' hold no samples"):
        StreamingTokenDataset([str(tmp_path / "out" / "train"), val])


def test_convert_layout_and_reconversion_removes_stale_outputs(tmp_path, small_tok):
    inputs = _write_inputs(tmp_path)
    out = tmp_path / "out"
    # An earlier conversion in the old split-less layout, a val split, and the user's own files.
    convert(inputs, tmp_path / "old", tokenizer=small_tok, seq_len=8, samples_per_shard=2, show_progress=False,
            log=lambda m: None)
    out.mkdir()
    for f in (tmp_path / "old" / "train").iterdir():  # older versions wrote <out>/index.json + shards
        os.replace(f, out / f.name)
    (out / "val").mkdir()
    (out / "val" / "index.json").write_text(json.dumps({"format": "mpt_kernels.tokens",
                                                       "shards": [{"file": "shard_00000.bin"}]}))
    (out / "val" / "shard_00000.bin").write_bytes(b"\0" * 8)
    (out / "notes.md").write_text("mine")
    (out / "shard_plan.txt").write_text("mine too")
    (out / "train").mkdir()
    (out / "train" / "README").write_text("keep")
    stale_top = sorted(p.name for p in out.glob("shard_*.bin"))
    assert len(stale_top) > 3 and (out / "index.json").is_file()

    logs = []
    idx = convert(inputs[:1], out, tokenizer=small_tok, seq_len=8, samples_per_shard=2, show_progress=False,
                  log=logs.append)
    assert any("removed" in m and "earlier conversion" in m for m in logs), logs
    assert not (out / "index.json").exists() and not list(out.glob("shard_*.bin"))
    assert not (out / "val").exists()  # no val asked for: the stale one goes
    assert (out / "notes.md").is_file() and (out / "shard_plan.txt").is_file() and (out / "train" / "README").is_file()
    files = sorted(p.name for p in (out / "train").glob("shard_*.bin"))
    assert files == [s["file"] for s in idx["train"]["shards"]]
    assert TokenShards(out / "train").num_samples == idx["train"]["num_samples"]
    with pytest.raises(FileNotFoundError, match="subfolder.*train"):
        TokenShards(out)  # the old layout's path: the error points at the split folder

    # With a val split: <out>/train and <out>/val, and reconverting without one removes the val.
    idx = convert(inputs, out, tokenizer=small_tok, seq_len=8, val_fraction=0.3, show_progress=False,
                  log=lambda m: None)
    assert set(idx) == {"train", "val"} and TokenShards(out / "val").num_samples == idx["val"]["num_samples"]
    convert(inputs, out, tokenizer=small_tok, seq_len=8, show_progress=False, log=lambda m: None)
    assert not (out / "val").exists()


def test_reconversion_never_deletes_files_it_did_not_write(tmp_path, small_tok):
    """Only shards listed by an index of the converter's own format go: look-alike shard files
    without such an index stay, and a foreign index.json in a split folder stops the conversion."""
    inputs = _write_inputs(tmp_path)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "shard_00000.bin").write_bytes(b"mine")
    (out / "train" / "shard_00007.bin").write_bytes(b"mine too")
    idx = convert(inputs[:1], out, tokenizer=small_tok, seq_len=8, samples_per_shard=2, show_progress=False,
                  log=lambda m: None)
    assert (out / "shard_00000.bin").read_bytes() == b"mine"
    if "shard_00007.bin" not in [s["file"] for s in idx["train"]["shards"]]:
        assert (out / "train" / "shard_00007.bin").read_bytes() == b"mine too"
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    (other / "train" / "index.json").write_text(json.dumps({"format": "someone-else"}))
    with pytest.raises(ValueError, match="did not write"):
        convert(inputs[:1], other, tokenizer=small_tok, seq_len=8, show_progress=False, log=lambda m: None)
    assert json.loads((other / "train" / "index.json").read_text()) == {"format": "someone-else"}


def test_trained_bpe_sees_no_validation_document(tmp_path):
    from mpt_kernels.data.convert import is_validation

    inputs = _write_inputs(tmp_path)
    convert(inputs, tmp_path / "out", vocab_size=400, seq_len=16, val_fraction=0.3, show_progress=False,
            log=lambda m: None)
    got = load_tokenizer(tmp_path / "out" / "tokenizer.json").backend.get_vocab()
    docs = list(iter_documents(inputs))
    assert any(is_validation(d, 0.3) for d in docs)
    train_only = train_bpe_tokenizer([d.text for d in docs if not is_validation(d, 0.3)], 400)
    everything = train_bpe_tokenizer([d.text for d in docs], 400)
    assert got == train_only.backend.get_vocab()
    assert got != everything.backend.get_vocab()  # the check can tell the two apart


def test_jsonl_split_does_not_depend_on_line_numbers(tmp_path):
    from mpt_kernels.data.convert import is_validation

    recs = [{"text": f"record {i}: " + PROSE[: 10 + i], "id": f"r{i}"} for i in range(60)]

    def val_texts(records, **kw):
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
        return {d.text for d in iter_documents([p], **kw) if is_validation(d, 0.3)}

    before = val_texts(recs)
    assert 5 < len(before) < 40
    inserted = [{"text": "a new first record", "id": "new"}] + recs
    assert val_texts(inserted) - {"a new first record"} == before
    assert val_texts(list(reversed(recs))) == before
    # Keyed by an id field when asked: editing a record's text keeps it in its split.
    by_id = val_texts(recs, id_field="id")
    edited = [dict(r, text=r["text"] + " (edited)") for r in recs]
    assert {t.removesuffix(" (edited)") for t in val_texts(edited, id_field="id")} == by_id
    with pytest.raises(ValueError, match="'uid' field"):
        val_texts(recs, id_field="uid")


def test_missing_input_message_and_progress_reaches_total(tmp_path, small_tok, monkeypatch):
    r = _cli(tmp_path / "missing.jsonl", "--out", tmp_path / "o", "--tokenizer", small_tok.path)
    assert r.returncode != 0 and "missing.jsonl' does not exist" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert([tmp_path / "missing.jsonl"], tmp_path / "o", tokenizer=small_tok, seq_len=8, show_progress=False)

    import tqdm.auto

    bars = []

    class FakeBar:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    inputs = _write_inputs(tmp_path)  # non-ASCII prose: characters < bytes
    with open(tmp_path / "docs.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "Grüße, last"}) + "\n")
    convert(inputs, tmp_path / "out", tokenizer=small_tok, seq_len=16, log=lambda m: None)
    assert bars[0].total == sum(f.stat().st_size for f in [inputs[0], inputs[1]] + list(inputs[2].glob("*.py")))
    assert bars[0].n == bars[0].total
    # Bytes are counted per document as they are tokenized, not topped up at the end.
    seen = []
    from mpt_kernels.data.convert import convert_documents

    convert_documents(iter_documents(inputs), small_tok, {"train": tmp_path / "cd"}, seq_len=16, progress=seen.append)
    assert sum(seen) == bars[0].total


def test_a_copied_dataset_reads_its_own_tokenizer(tmp_path):
    """Copy a converted folder (with the BPE the converter trained) elsewhere: the copy's index names
    the copy's tokenizer first (relative path), not the original's absolute one, which may since have
    been retrained by a reconversion."""
    import shutil

    inputs = _write_inputs(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    convert(inputs, a, vocab_size=400, seq_len=16, show_progress=False, log=lambda m: None)
    shutil.copytree(a, b)
    assert TokenShards(b / "train").resolve_tokenizer() == str((b / "tokenizer.json").resolve())
    (b / "tokenizer.json").unlink()  # moved without its tokenizer: the recorded absolute path still serves
    assert TokenShards(b / "train").resolve_tokenizer() == str((a / "tokenizer.json").resolve())


# ------------------------------------------------------------------------------------- converter: transactional reconversion

def _random_docs(rng, n: int) -> list[str]:
    """Varied documents of random words (lengths from a few tokens to a few hundred)."""
    words = ["alpha", "beta", "value", "line", "café", "Köln", "def", "return", "x", "y", "= 1", "{", "}", "東京", "fox"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 120)))) + "\n" for _ in range(n)]


def _write_jsonl(path: Path, texts: list[str], bad_line_after: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            if i == bad_line_after:
                fh.write('{"text": "truncated record\n')  # malformed: the conversion fails here, part-way
            fh.write(json.dumps({"text": t}) + "\n")
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder under root."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _staging_folders(out: Path) -> list[Path]:
    return sorted(out.glob(".tmp-convert-*"))


def _count_flushes(monkeypatch, fail_after: int | None = None, exc: BaseException | None = None) -> list[int]:
    """Count the shards ShardWriter writes; with ``fail_after``, raise ``exc`` instead of the next one."""
    from mpt_kernels.data.convert import ShardWriter

    written = [0]
    flush = ShardWriter._flush_shard

    def counting(self):
        if self._samples:
            if fail_after is not None and written[0] >= fail_after:
                raise exc
            written[0] += 1
        flush(self)

    monkeypatch.setattr(ShardWriter, "_flush_shard", counting)
    return written


def test_failed_reconversion_leaves_the_earlier_dataset_intact(tmp_path, small_tok, monkeypatch):
    rng = np.random.default_rng(1234)
    out = tmp_path / "out"
    first = _write_jsonl(tmp_path / "first.jsonl", _random_docs(rng, 120))
    idx = convert([first, *_write_inputs(tmp_path)], out, tokenizer=small_tok, seq_len=16, samples_per_shard=8,
                  val_fraction=0.2, show_progress=False, log=lambda m: None)
    assert len(idx["train"]["shards"]) > 3 and idx["val"]["num_samples"] > 0
    before = _snapshot(out)
    ref = _samples(StreamingTokenDataset(str(out / "train"), shuffle=False), 10)

    # 1. A malformed record after several hundred good ones: shards of the new dataset are already
    #    written (in the staging folder) when the error comes.
    written = _count_flushes(monkeypatch)
    bad = _write_jsonl(tmp_path / "bad.jsonl", _random_docs(rng, 700), bad_line_after=600)
    with pytest.raises(ValueError, match=r"bad\.jsonl:601: not valid JSON"):
        convert([bad], out, tokenizer=small_tok, seq_len=16, samples_per_shard=4, show_progress=False,
                log=lambda m: None)
    assert written[0] > 5  # the failure came part-way, not before anything was written
    assert _snapshot(out) == before and not _staging_folders(out)

    # 2. Interrupted (Ctrl-C) part-way, with a BPE being trained: the earlier tokenizer.json stays too.
    monkeypatch.undo()
    bpe_out = tmp_path / "bpe"
    convert([first], bpe_out, vocab_size=300, seq_len=16, samples_per_shard=8, show_progress=False, log=lambda m: None)
    bpe_before = _snapshot(bpe_out)
    _count_flushes(monkeypatch, fail_after=3, exc=KeyboardInterrupt())
    second = _write_jsonl(tmp_path / "second.jsonl", _random_docs(rng, 300))
    with pytest.raises(KeyboardInterrupt):
        convert([second], bpe_out, vocab_size=350, seq_len=8, samples_per_shard=2, val_fraction=0.1,
                show_progress=False, log=lambda m: None)
    assert _snapshot(bpe_out) == bpe_before and not _staging_folders(bpe_out)
    monkeypatch.undo()

    # 3. No training sample: refused, the earlier dataset kept (it used to be removed first).
    with pytest.raises(ValueError, match="no complete sample"):
        convert([second], out, tokenizer=small_tok, seq_len=100_000, show_progress=False, log=lambda m: None)
    assert _snapshot(out) == before and not _staging_folders(out)

    # The command line reports the error as before, and leaves the data alone too.
    r = _cli(bad, "--out", out, "--tokenizer", small_tok.path, "--seq-len", "16", "--samples-per-shard", "4")
    assert r.returncode == 1 and "bad.jsonl:601: not valid JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(out) == before and not _staging_folders(out)

    # Still a working dataset, read exactly as before.
    TokenShards(out / "train").verify()
    TokenShards(out / "val").verify()
    assert torch.equal(_samples(StreamingTokenDataset(str(out / "train"), shuffle=False), 10), ref)
    assert TokenShards(bpe_out / "train").resolve_tokenizer() == str((bpe_out / "tokenizer.json").resolve())

    # A failed first conversion into a new folder leaves no folder behind.
    with pytest.raises(ValueError, match="not valid JSON"):
        convert([bad], tmp_path / "fresh", tokenizer=small_tok, seq_len=16, samples_per_shard=4,
                show_progress=False, log=lambda m: None)
    assert not (tmp_path / "fresh").exists()


def test_successful_reconversion_replaces_the_dataset_and_keeps_other_files(tmp_path, small_tok, monkeypatch):
    rng = np.random.default_rng(98765)
    out = tmp_path / "out"
    big = _write_jsonl(tmp_path / "big.jsonl", _random_docs(rng, 200))
    old = convert([big], out, vocab_size=400, seq_len=16, samples_per_shard=4, val_fraction=0.2,
                  show_progress=False, log=lambda m: None)
    old_tok = (out / "tokenizer.json").read_bytes()
    (out / "train" / "notes.txt").write_text("my notes")
    (out / "train" / "shard_99999.bin").write_bytes(b"looks like a shard, but no index lists it")
    (out / "README.md").write_text("mine")

    small = _write_jsonl(tmp_path / "small.jsonl", _random_docs(rng, 30))
    logs = []
    new = convert([small], out, vocab_size=300, seq_len=16, samples_per_shard=4, val_fraction=0.2,
                  show_progress=False, log=logs.append)
    assert any("removed" in m and "earlier conversion" in m for m in logs), logs
    for split in ("train", "val"):
        assert len(new[split]["shards"]) < len(old[split]["shards"])
        on_disk = sorted(p.name for p in (out / split).glob("shard_0*.bin"))
        assert on_disk == [s["file"] for s in new[split]["shards"]]  # the stale extra shards are gone
        assert json.loads((out / split / "index.json").read_text()) == new[split]
        shards = TokenShards(out / split)
        shards.verify()
        assert shards.num_samples == new[split]["num_samples"]
        # The tokenizer recorded for the final location, not the staging folder it was written in.
        assert new[split]["tokenizer"] == str((out / "tokenizer.json").resolve())
        assert new[split]["tokenizer_relative"] == "../tokenizer.json"
        assert shards.resolve_tokenizer() == str((out / "tokenizer.json").resolve())
    assert (out / "train" / "notes.txt").read_text() == "my notes" and (out / "README.md").read_text() == "mine"
    assert (out / "train" / "shard_99999.bin").is_file()
    assert not _staging_folders(out) and not list(out.rglob("*.tmp"))
    # The new BPE replaced the old one, and it is the one the shards were made with.
    assert (out / "tokenizer.json").read_bytes() != old_tok
    tok = load_tokenizer(TokenShards(out / "train").resolve_tokenizer())
    assert tok.vocab_size == new["train"]["vocab_size"]
    text = json.loads(small.read_text().splitlines()[0])["text"]
    ids = tok.encode(text) + [tok.eos_id]
    first = np.fromfile(out / "train" / "shard_00000.bin", dtype=np.uint16).reshape(-1, 16)
    got = _samples(StreamingTokenDataset(str(out / "train"), shuffle=False), len(first))
    assert np.array_equal(got.numpy(), first.astype(np.int64))
    stream = np.concatenate([np.fromfile(out / s, dtype=np.uint16) for split in ("train", "val")
                             for s in (f"{split}/{x['file']}" for x in new[split]["shards"])])
    assert any(np.array_equal(stream[i:i + 8], ids[:8]) for i in range(0, len(stream) - 8))

    # Moving the whole folder keeps the tokenizer found (relative path first).
    import shutil

    shutil.move(str(out), str(tmp_path / "moved"))
    assert TokenShards(tmp_path / "moved" / "val").resolve_tokenizer() == str((tmp_path / "moved" / "tokenizer.json").resolve())


def test_leftover_staging_of_a_killed_conversion_is_removed(tmp_path, small_tok):
    from mpt_kernels.data.convert import _Staging

    rng = np.random.default_rng(555)
    out = tmp_path / "out"
    data = _write_jsonl(tmp_path / "d.jsonl", _random_docs(rng, 300))
    convert([data], out, tokenizer=small_tok, seq_len=16, samples_per_shard=8, show_progress=False, log=lambda m: None)
    before = _snapshot(out)
    # A conversion killed outright (SIGKILL: no cleanup runs) after writing a few shards.
    script = f"""
import os, signal
from mpt_kernels.data import convert as c
n = [0]
flush = c.ShardWriter._flush_shard
def killing(self):
    flush(self)
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
c.ShardWriter._flush_shard = killing
c.convert([{str(data)!r}], {str(out)!r}, tokenizer={small_tok.path!r}, seq_len=8, samples_per_shard=2,
          show_progress=False)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                       env=subprocess_env())
    assert r.returncode != 0, r.stderr
    (left,) = _staging_folders(out)
    assert len(list((left / "train").glob("shard_*.bin"))) == 3
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(".tmp-convert-")} == before
    TokenShards(out / "train").verify()  # the leftover is no part of the dataset

    # One a running conversion holds is left alone; the killed one's goes with the next conversion.
    live = _Staging(out)
    try:
        logs = []
        idx = convert([data], out, tokenizer=small_tok, seq_len=8, samples_per_shard=16, show_progress=False,
                      log=logs.append)
        assert not left.exists() and _staging_folders(out) == [live.path]
        assert any("interrupted conversion" in m and left.name in m for m in logs), logs
        assert any("left" in m and live.path.name in m for m in logs), logs
        assert TokenShards(out / "train").num_samples == idx["train"]["num_samples"]
    finally:
        live.remove()
    assert not _staging_folders(out)


# ------------------------------------------------------------------------------------- user walkthrough

@pytest.mark.parametrize("value, says", [(["a", "b"], "a list"), (12345, "a number"), ({"a": 1}, "an object"),
                                         (True, "a boolean"), (None, "null")])
def test_jsonl_text_field_must_be_a_string(tmp_path, small_tok, value, says):
    """A non-string text field was turned into Python's text of it (str(["a", "b"]) == "['a', 'b']") and
    trained on; it is refused with the file, the line and the field's type."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: the 'text' field is {says}.*not a string"):
        convert([p], tmp_path / "out", tokenizer=small_tok, seq_len=2, show_progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("rec, says", [({"prompt": "x", "response": None}, "'response' is null"),
                                       ({"prompt": 3, "response": "y"}, "'prompt' is a number"),
                                       ({"prompt": "x", "response": "y", "system": ["be", "brief"]}, "'system' is a list"),
                                       ({"messages": [{"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": {"t": 1}}]},
                                        r"messages\[1\].content is an object")])
@pytest.mark.parametrize("fmt", ["mpt-instruct", "chatml"])
def test_finetune_texts_must_be_strings(tmp_path, small_tok, rec, says, fmt):
    from mpt_kernels.data.tokenizer import load_tokenizer as _load

    p = tmp_path / "ft.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=rf"ft\.jsonl:2: {says}.*, not a string"):
        FinetuneDataset(p, _load(small_tok.path), max_seq_len=64, fmt=fmt)


def test_mpt_instruct_refuses_a_system_prompt(tmp_path, small_tok):
    """MPT-Instruct's format has no system prompt: a record's "system" was dropped without a word."""
    from mpt_kernels.data.finetune import format_chatml

    rec = {"prompt": "Add 2 and 3.", "response": "5", "system": "Answer in French."}
    with pytest.raises(ValueError, match="system prompt.*data.finetune_format=chatml"):
        format_mpt_instruct(rec, where="f.jsonl:1")
    msgs = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(ValueError, match="f.jsonl:3: the record has a system prompt"):
        format_mpt_instruct(msgs, where="f.jsonl:3")
    # an empty or null system says nothing: accepted; chatml keeps a system prompt
    assert format_mpt_instruct({**rec, "system": ""}) == format_mpt_instruct({**rec, "system": None}) == \
        format_mpt_instruct({"prompt": "Add 2 and 3.", "response": "5"})
    assert format_chatml(rec)[:2] == [(f"{IM_START}system\n", False), (f"Answer in French.{IM_END}\n", False)]
    p = tmp_path / "ft.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"ft\.jsonl:2: the record has a system prompt"):
        FinetuneDataset(p, small_tok, max_seq_len=64)


def test_byte_order_mark_is_dropped_from_text_files(tmp_path, small_tok):
    """A UTF-8 BOM was kept at the start of a .txt (and a folder's files) but dropped from .jsonl."""
    (tmp_path / "src").mkdir()
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello world")
    (tmp_path / "src" / "m.py").write_bytes(b"\xef\xbb\xbfx = 1\n")
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello world"}).encode() + b"\n")
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "src", tmp_path / "d.jsonl"]))
    assert [d.text for d in docs] == ["hello world", "x = 1\n", "hello world"]
    assert docs[0].nbytes == 14  # progress still counts the file's bytes
    (tmp_path / "ft.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n")
    assert len(FinetuneDataset(tmp_path / "ft.jsonl", small_tok, max_seq_len=512)) == 1


def test_folder_walk_skips_hidden_files_and_folders(tmp_path, small_tok):
    """A folder input was walked with rglob: .git/, .venv/, .hidden/secret.py and .env.py were read as
    documents (the bundled corpus already skipped dot-folders)."""
    from mpt_kernels.data.convert import DEFAULT_CODE_EXTENSIONS, _exts, _input_bytes

    src = tmp_path / "src"
    for rel, text in {"a.py": "a = 1\n", "pkg/b.py": "b = 2\n", ".hidden/secret.py": "KEY = 'x'\n",
                      ".git/hooks/pre-commit.py": "hook\n", "pkg/.venv/lib/site.py": "venv\n",
                      "pkg/.env.py": "TOKEN = 1\n"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    docs = list(iter_documents([src]))
    assert [d.key for d in docs] == ["src/a.py", "src/pkg/b.py"]
    assert _input_bytes([src], DEFAULT_CODE_EXTENSIONS) == 12  # the progress total matches
    hidden_input = tmp_path / ".data"  # a hidden folder given as the input itself is read
    hidden_input.mkdir()
    (hidden_input / "c.py").write_text("c = 3\n")
    assert [d.key for d in iter_documents([hidden_input], extensions=sorted(_exts([".py"])))] == [".data/c.py"]


def test_index_records_the_tokenizer_vocabulary_and_streams_must_agree(tmp_path, small_tok):
    """Shards converted with different tokenizers were mixed silently. The index records the sha256 of
    the tokenizer's vocabulary; StreamingTokenDataset refuses streams whose records differ (the trainer
    also checks older indexes, test_training.py). The same tokenizer saved again hashes the same."""
    from mpt_kernels.data.tokenizer import load_tokenizer as _load

    other = train_bpe_tokenizer([PROSE * 5, CODE * 2] + [f"item {i} costs {i * 3}\n" for i in range(300)], 500,
                                save_path=tmp_path / "other" / "tokenizer.json")
    resaved = _load(small_tok.path)
    resaved.save(tmp_path / "copy" / "tokenizer.json")
    assert resaved.vocab_sha256() == small_tok.vocab_sha256() != other.vocab_sha256()
    inputs = _write_inputs(tmp_path)
    for name, tok in (("a", small_tok), ("b", resaved), ("c", other)):
        convert(inputs, tmp_path / name, tokenizer=tok, seq_len=16, show_progress=False)
    a, b, c = (str(tmp_path / n / "train") for n in "abc")
    assert TokenShards(a).index["tokenizer_vocab_sha256"] == small_tok.vocab_sha256()
    StreamingTokenDataset([a, b])  # one vocabulary, two tokenizer files: fine
    with pytest.raises(ValueError, match=r"stream '.*a/train' and stream '.*c/train' were tokenized with different "
                                         r"tokenizers .*other/tokenizer.json"):
        StreamingTokenDataset([Stream(a, 0.5), Stream(c, 0.5)])
    StreamingTokenDataset([a, c], allow_tokenizer_mismatch=True)
    # an index written before the hash was recorded: computed from the tokenizer it names
    idx = json.loads((Path(c) / "index.json").read_text())
    del idx["tokenizer_vocab_sha256"]
    (Path(c) / "index.json").write_text(json.dumps(idx))
    assert TokenShards(c).tokenizer_vocab_sha256() == other.vocab_sha256()


def test_mix_counts_are_largest_remainder_rounding():
    """Each stream gets floor(share x epoch_size), and the samples left over go one each to the streams
    with the largest remainders (checked against exact rational arithmetic on random mixes)."""
    from fractions import Fraction

    # 0.5 / 0.3 / 0.2 of 7: 3.5, 2.1, 1.4 -> 3, 2, 1, and the one left to the 0.5 remainder
    assert SampleOrder([50, 50, 50], [0.5, 0.3, 0.2], epoch_size=7).counts == [4, 2, 1]
    # by size: 10, 20, 3 of 11: 3.33, 6.67, 1.0 -> 3, 6, 1, one left to the 0.67 remainder
    assert SampleOrder([10, 20, 3], epoch_size=11).counts == [3, 7, 1]
    rng = np.random.default_rng(5)
    for _ in range(200):
        k = int(rng.integers(2, 7))
        props = [float(x) for x in rng.integers(1, 1000, k)]  # integers: exact shares
        total = int(rng.integers(1, 500))
        exact = [Fraction(int(p)) / Fraction(int(sum(props))) * total for p in props]
        floors = [int(e) for e in exact]
        rem = [e - f for e, f in zip(exact, floors)]
        counts = SampleOrder([10] * k, props, epoch_size=total).counts
        assert sum(counts) == total
        up = [c - f for c, f in zip(counts, floors)]
        assert set(up) <= {0, 1}
        if 0 in up and 1 in up:  # every stream rounded up has a remainder >= every one rounded down
            assert min(r for r, u in zip(rem, up) if u) >= max(r for r, u in zip(rem, up) if not u)


def test_each_repeat_of_an_upsampled_stream_is_a_fresh_permutation():
    """A stream asked for 5x its size per epoch repeats under a fresh permutation each pass (not the same
    order five times over)."""
    order = SampleOrder([10], epoch_size=50, seed=2)
    g = np.arange(50)
    _, samples = order.lookup(g)
    slot = permute(g, 50, _round_keys(2, 0xE90C, 0))  # the epoch's interleaving: position -> slot
    in_slot_order = samples[np.argsort(slot)]  # stream 0's own sequence, pass after pass
    passes = [tuple(in_slot_order[p * 10:(p + 1) * 10].tolist()) for p in range(5)]
    for p in passes:
        assert sorted(p) == list(range(10))
    assert len(set(passes)) == 5
