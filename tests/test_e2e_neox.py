"""End to end with the real GPT-NeoX-20B tokenizer, the path a user takes: convert text, a .jsonl and a
code folder into shards -> pretrain a tiny model mixing two streams by proportion (killed and
resumed) -> instruct and ChatML finetunes from it -> the saved Hugging Face folder in transformers
(AutoModelForCausalLM, AutoTokenizer, greedy generate) and in our generate CLI.

Skipped without the tokenizer (../shared/tokenizers/gpt-neox-20b/tokenizer.json, or
MPTK_NEOX_TOKENIZER). Tiny models (d_model 64, 2 layers), a few steps, one thread: about a minute
on 2 cores."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _subproc import NEUTRAL_CWD, subprocess_env

NEOX = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
NEOX = Path(os.environ.get("MPTK_NEOX_TOKENIZER", NEOX))
pytestmark = [pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer.json not present "
                                                          "(set MPTK_NEOX_TOKENIZER)"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
SEQ = 64

# Documents a real corpus has: unicode in several scripts, emoji with modifiers and joiners, CRLF line
# endings, runs of spaces (NeoX has added tokens for them), an empty record, a document longer than a
# whole shard, and text that spells the tokenizer's own end-of-text marker.
TEXT_RECORDS = [
    "Grüße aus Köln — naïve café, 東京, Ελληνικά, emoji 🙂👋🏽👨‍👩‍👧.",
    "",
    "Windows line endings\r\nsecond line\r\n\r\nthird paragraph\r\n",
    "    indented     by      spaces\tand\ttabs\n",
    " ".join(f"word{i}" for i in range(4000)),              # ~8000 tokens: longer than one shard
    "A tokenizer's end-of-text marker <|endoftext|> written in a document is text, not a boundary.",
] + [f"Record {i}: " + " ".join(["alpha", "βήτα", "🙂", "\n", "  "][j % 5] for j in range(i * 7 % 90 + 5))
     for i in range(60)]
CODE_FILES = {
    "pkg/mod.py": "def f(x):\n    return x + 1\n\n\nclass A:\n        pass\n",
    "ext/tokens.py": 'EOS = "<|endoftext|>"  # in code that handles tokenizers\n',
    "pkg/main.c": "int main(void) {\r\n\treturn 0;\r\n}\r\n",
    **{f"gen/m{i:02d}.py": "".join(f"def f{i}_{j}(x, y={j}):\n    return [x * y + {i} for _ in range({j})]\n\n"
                                   for j in range(i % 7 + 3)) for i in range(40)},
}
FT_RECORDS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Translate 'chat' to English.", "response": " cat, with a leading space"},
    {"prompt": "Say hi in emoji 😀", "response": "👋🏽 hi!\nSecond line."},
    {"prompt": "Code:\n    def f():\n        pass", "response": "    return 1\n"},
    {"prompt": "Explain.", "response": "word " * 120},       # prompt + response longer than seq_len
    {"prompt": "long " * 200, "response": "never seen"},     # the prompt alone is longer than seq_len
]


def _tok():
    from mpt_kernels.data import load_tokenizer

    return load_tokenizer(NEOX)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two converted streams, "text" (a .txt and a .jsonl) and "code" (a folder), through the converter's
    command line."""
    from mpt_kernels.data.convert import main as convert_main

    root = tmp_path_factory.mktemp("neox_data")
    src = root / "src"
    (src / "code").mkdir(parents=True)
    txt = src / "notes.txt"
    txt.write_bytes(("Plain text file, CRLF endings.\r\n" * 40 + "Ünïcödé 😀\r\n").encode("utf-8"))
    jsonl = src / "records.jsonl"
    with open(jsonl, "w", encoding="utf-8", newline="") as fh:  # CRLF between the records too
        for t in TEXT_RECORDS:
            fh.write(json.dumps({"text": t}, ensure_ascii=False) + "\r\n")
    for name, text in CODE_FILES.items():
        p = src / "code" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
    (src / "code" / "blob.py").write_bytes(b"\xff\xfe\x00 not utf-8")  # skipped
    out = {}
    for name, inputs in (("text", [txt, jsonl]), ("code", [src / "code"])):
        rc = convert_main([*map(str, inputs), "--out", str(root / name), "--tokenizer", str(NEOX), "--seq-len",
                           str(SEQ), "--samples-per-shard", "50", "--no-progress"])
        assert rc == 0
        out[name] = root / name / "train"
    docs = {"text": [txt.read_bytes().decode("utf-8")] + [t for t in TEXT_RECORDS if t],
            "code": [CODE_FILES[k] for k in sorted(CODE_FILES)]}
    return {"dirs": out, "docs": docs, "root": root}


def _read_shards(folder: Path) -> tuple[dict, np.ndarray]:
    idx = json.loads((folder / "index.json").read_text())
    rows = []
    for s in idx["shards"]:
        raw = (folder / s["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == s["sha256"] and len(raw) == s["bytes"]
        rows.append(np.frombuffer(raw, dtype="<" + np.dtype(idx["dtype"]).str[1:]).reshape(-1, idx["seq_len"]))
    return idx, np.concatenate(rows)


def _encode_as_text(tok, text: str) -> list[int]:
    """What a document's text encodes to when nothing in it is read as a special token."""
    backend = tok.backend
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


def test_shards_hold_each_document_encoded_plus_one_eos(sources):
    """Every split holds exactly tokenizer.encode(document) + [EOS] per document, end to end, cut into
    seq_len samples (the tail dropped and counted); shard checksums and the index's counts match; a
    document longer than a shard spans shards unchanged."""
    from mpt_kernels.data import TokenShards

    tok = _tok()
    for name, folder in sources["dirs"].items():
        idx, arr = _read_shards(folder)
        stream = []
        for d in sources["docs"][name]:
            stream += _encode_as_text(tok, d) + [tok.eos_id]
        n = len(stream) // SEQ
        assert idx["dtype"] == "uint16" and idx["seq_len"] == SEQ and idx["eos_id"] == 0
        assert idx["vocab_size"] == 50277 and idx["tokenizer_vocab_sha256"] == tok.vocab_sha256()
        assert idx["num_documents"] == len(sources["docs"][name])
        assert idx["num_samples"] == n == arr.shape[0] and idx["dropped_tail_tokens"] == len(stream) - n * SEQ
        assert np.array_equal(arr, np.array(stream[: n * SEQ]).reshape(n, SEQ)), name
        TokenShards(folder).verify()
        # one end-of-text per document, none from the documents' own text
        assert stream.count(tok.eos_id) == len(sources["docs"][name])
    assert len(json.loads((sources["dirs"]["text"] / "index.json").read_text())["shards"]) > 3


def test_marker_text_in_a_document_is_not_an_end_of_text(sources):
    """A document that spells "<|endoftext|>" (code handling tokenizers, text about them) keeps it as
    text: the only end-of-text ids in the shards are the converter's, one after each document, so
    document boundaries (and data.sequence_id's attention) are where the documents end."""
    tok = _tok()
    _, arr = _read_shards(sources["dirs"]["code"])
    flat = arr.reshape(-1).tolist()
    ends, pos = [], -1
    for name in sorted(CODE_FILES):  # where each document's end-of-text must be
        pos += len(_encode_as_text(tok, CODE_FILES[name])) + 1
        ends.append(pos)
    assert [i for i, t in enumerate(flat) if t == tok.eos_id] == [e for e in ends if e < len(flat)]
    assert CODE_FILES["ext/tokens.py"] in tok.decode(flat, skip_special_tokens=True)


def test_mixed_streams_serve_their_proportions(sources):
    """Two streams mixed 0.7 / 0.3 through the trainer's data loader: the samples actually served, over
    several epochs of the mix, come from each stream in those proportions."""
    from mpt_kernels.data import Stream, StreamingTokenDataset, TokenShards, make_loader

    dirs = sources["dirs"]
    owner = {}
    for k, name in enumerate(("text", "code")):
        sh = TokenShards(dirs[name])
        for i in range(len(sh)):
            owner.setdefault(sh[i].tobytes(), set()).add(k)
    ds = StreamingTokenDataset([Stream(str(dirs["text"]), 0.3), Stream(str(dirs["code"]), 0.7)], seed=5,
                               batch_size=8, epoch_size=200, num_samples=2000)
    counts = [0, 0]
    for batch in make_loader(ds):
        for row in batch["input_ids"].numpy().astype("<u2"):
            k = owner[row.tobytes()]
            assert len(k) == 1
            counts[next(iter(k))] += 1
    assert sum(counts) == 2000
    assert counts == [600, 1400]  # exact per epoch of 200 (largest remainder), 10 epochs
    # and within one epoch the two streams are interleaved, not served one after the other
    first = [ds.order.lookup(np.arange(40))[0]]
    assert 0 < int(first[0].sum()) < 40


def _pretrain_args(sources, run_root: Path, run_name: str, **kw) -> list[str]:
    args = {"run_root": str(run_root), "run_name": run_name, "seed": 5, "threads": 1, "device": "cpu",
            "precision": "fp32", "progress": False, "plot": False, "max_steps": 12, "global_batch_size": 8,
            "micro_batch_size": 4, "log_every": 4, "model.preset": "tiny",
            "model.overrides": "{d_model: 64, n_heads: 2, n_layers: 2}", "model.vocab_size": 50432,
            "data.kind": "shards", "data.seq_len": SEQ,
            "data.streams": f"[{{path: {sources['dirs']['text']}, proportion: 0.3}}, "
                            f"{{path: {sources['dirs']['code']}, proportion: 0.7}}]",
            "data.val_streams": f"[{sources['dirs']['text']}]", "optim.lr": 3e-3, "scheduler.warmup_steps": 2,
            "checkpoint.save_every": 5, "checkpoint.keep_last": 3, "eval.every": 0, "eval.batches": 1,
            "eval.sample_tokens": 0}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def pretrained(sources):
    """The straight pretraining run (in process); returns its Hugging Face folder and summary."""
    from mpt_kernels.train import Trainer, load_config

    runs = sources["root"] / "runs"
    # train.py without --config reads training/configs/tiny.yaml: the same base here
    summary = Trainer(load_config(ROOT / "training" / "configs" / "tiny.yaml",
                                  _pretrain_args(sources, runs, "straight"))).fit()
    return {"hf": Path(summary["hf_dir"]), "summary": summary, "runs": runs}


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"}


def test_pretrain_killed_and_resumed_equals_the_straight_run(sources, pretrained):
    """train.py on the NeoX shards, SIGKILLed after step 7 (the last checkpoint is step 5) and restarted
    with checkpoint.autoresume=true: every step's loss and the final weights equal the straight run's."""
    from safetensors.torch import load_file

    runs = pretrained["runs"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    args = _pretrain_args(sources, runs, "killed", **{"checkpoint.autoresume": "true"})
    first = subprocess.run([sys.executable, str(TRAIN), *args, "fault.kill_at_step=7"], capture_output=True,
                           text=True, env=env, cwd=NEUTRAL_CWD, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    second = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, env=env,
                            cwd=NEUTRAL_CWD, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr and "step 5" in second.stderr
    straight, killed = _train_losses(runs / "straight"), _train_losses(runs / "killed")
    assert sorted(straight) == sorted(killed) == list(range(1, 13))
    assert straight == killed
    a, b = load_file(pretrained["hf"] / "model.safetensors"), load_file(runs / "killed" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["transformer.wte.weight"].shape[0] == 50432


# ----------------------------------------------------------------------------------------- finetuning

@pytest.fixture(scope="module")
def ft_data(sources):
    path = sources["root"] / "ft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in FT_RECORDS), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["mpt-instruct", "chatml"])
def test_finetune_labels_mask_exactly_the_prompt(ft_data, fmt):
    """With the NeoX tokenizer: the tokens labelled -100 decode to the prompt text of the format, the
    trained ones to the response and its end marker (<|endoftext|> / <|im_end|>, one id each); an
    over-long example keeps its prompt and the response's start (no end marker); one whose prompt
    alone fills seq_len is dropped and counted."""
    from mpt_kernels.data import FinetuneDataset
    from mpt_kernels.data.finetune import IGNORE_INDEX, IM_END, IM_START, INSTRUCT_INTRO

    tok = _tok()
    ds = FinetuneDataset(ft_data, tok, max_seq_len=128, fmt=fmt, shuffle=False)
    end = "<|endoftext|>" if fmt == "mpt-instruct" else IM_END
    end_id = tok.token_to_id(end)
    if fmt == "chatml":  # NeoX has no ChatML markers: added after its 50277 tokens, as special tokens
        assert (tok.token_to_id(IM_START), end_id) == (50277, 50278) and tok.vocab_size == 50279
    assert ds.dropped == 1 and len(ds) == len(FT_RECORDS) - 1
    for (ids, labels), rec in zip(ds.examples, FT_RECORDS):
        if fmt == "mpt-instruct":
            prompt = f"{INSTRUCT_INTRO}\n### Instruction:\n{rec['prompt']}\n### Response:\n"
        else:
            prompt = f"{IM_START}user\n{rec['prompt']}{IM_END}\n{IM_START}assistant\n"
        trained = labels != IGNORE_INDEX
        k = int(np.argmax(trained))  # the prompt is one block at the start
        assert not trained[:k].any() and np.array_equal(labels[trained], ids[trained])
        assert tok.decode(ids[:k], skip_special_tokens=False) == prompt
        if len(ids) < 128:
            resp = ids[trained]
            assert resp[-1] == end_id and (resp == end_id).sum() == 1
            assert tok.decode(resp, skip_special_tokens=False) == rec["response"] + end
            if fmt == "chatml":  # the newline closing the turn is not trained
                assert ids[-1] == tok.encode("\n")[0] and labels[-1] == IGNORE_INDEX
            else:
                assert ids[-1] == end_id
        else:  # cut at seq_len: the response's start trains, no end marker
            assert rec["prompt"] == "Explain." and end_id not in ids[trained]
            assert rec["response"].startswith(tok.decode(ids[trained]))


@pytest.fixture(scope="module")
def finetuned(pretrained, ft_data):
    """Instruct and ChatML finetunes of the pretrained model (in process); their Hugging Face folders."""
    from mpt_kernels.train import Trainer, load_config

    out = {}
    for fmt in ("mpt-instruct", "chatml"):
        args = {"run_root": str(pretrained["runs"]), "run_name": f"ft-{fmt}", "seed": 5, "threads": 1,
                "device": "cpu", "precision": "fp32", "progress": False, "plot": False, "max_steps": 8,
                "global_batch_size": 4, "micro_batch_size": 4, "log_every": 4, "model.init_from": str(pretrained["hf"]),
                "data.kind": "finetune", "data.finetune_path": str(ft_data), "data.finetune_format": fmt,
                "data.seq_len": 128, "optim.lr": 3e-3, "scheduler.warmup_steps": 2, "checkpoint.save_every": 0,
                "eval.every": -1, "eval.sample_tokens": 0}
        summary = Trainer(load_config(ROOT / "training" / "configs" / "instruct-finetune.yaml",
                                      [f"{k}={v}" for k, v in args.items()])).fit()
        out[fmt] = Path(summary["hf_dir"])
    return out


# ----------------------------------------------------------------------------------------- the saved folder

def test_saved_folder_loads_in_transformers(finetuned, pretrained):
    """transformers' AutoModelForCausalLM (MptForCausalLM) and AutoTokenizer load each saved folder; the
    tokenizer is the one we trained with: same ids, same length, end-of-text and padding as ours (NeoX
    has no <|padding|>: without a tokenizer_config.json transformers added one as a new token); a
    finetuned folder's chat template renders the format the finetune trained on, and a ChatML model's
    generation_config stops at <|im_end|> (how its turns end) as well as at <|endoftext|>."""
    transformers = pytest.importorskip("transformers")
    from mpt_kernels.data import load_tokenizer
    from mpt_kernels.data.finetune import IM_END, format_chatml, format_mpt_instruct, tokenize_example

    text = "Grüße 😀\r\n    four spaces <|endoftext|> end"
    for name, hf in [("pretrained", pretrained["hf"]), *finetuned.items()]:
        ours = load_tokenizer(hf)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf)
        assert type(model).__name__ == "MptForCausalLM" and model.config.vocab_size == 50432
        theirs = transformers.AutoTokenizer.from_pretrained(hf)
        assert len(theirs) == ours.vocab_size, name
        assert theirs(text).input_ids == ours.encode(text)
        assert theirs.eos_token_id == ours.eos_id == 0 and theirs.pad_token_id == ours.pad_id == 0
        gen = json.loads((hf / "generation_config.json").read_text())
        if name == "pretrained":
            assert theirs.chat_template is None and gen["eos_token_id"] == 0
            continue
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        segs = (format_chatml if name == "chatml" else format_mpt_instruct)({"prompt": msgs[0]["content"], "response": "4"})
        prompt = "".join(t for t, resp in segs[:-2 if name == "chatml" else -1])
        assert theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt
        full = theirs.apply_chat_template(msgs + [{"role": "assistant", "content": "4"}], tokenize=False)
        assert full == "".join(t for t, _ in segs)
        assert theirs(full).input_ids == tokenize_example(segs, ours)[0].tolist()
        if name == "chatml":
            assert gen["eos_token_id"] == [ours.token_to_id(IM_END), 0] and gen["pad_token_id"] == 0
        else:
            assert gen["eos_token_id"] == 0


def _cli(args: list[str], stdin: str | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "mpt_kernels.generate", *args], input=stdin, capture_output=True,
                         text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=NEUTRAL_CWD, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_greedy_generation_transformers_equals_ours(finetuned):
    """Greedy decoding of the finetuned models: transformers' generate (with the folder's own tokenizer,
    chat template and generation_config) gives the same tokens as our model and the same text as
    ``python -m mpt_kernels.generate`` (--prompt, and --chat for the ChatML model, over two turns in
    one conversation)."""
    transformers = pytest.importorskip("transformers")
    from mpt_kernels.model import MPTForCausalLM

    n = 24
    hf = finetuned["mpt-instruct"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out_t = theirs.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    ours = MPTForCausalLM.from_pretrained(hf).eval()
    out_o = ours.generate(ids, n, temperature=0.0, eos_token_id=0)[0, ids.shape[1]:].tolist()
    assert out_t == out_o
    assert _cli(["--model", str(hf), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)]) \
        == prompt + tok.decode(out_t, skip_special_tokens=True) + "\n"

    hf = finetuned["chatml"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    messages, replies = [], []
    for user in ("What is 2+2?", "Say hi in emoji 😀"):
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        with torch.no_grad():
            new = theirs.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
        assert len(new) == n or new[-1] in (im_end, 0)  # generation_config: stops at the end of the turn
        reply = tok.decode(new, skip_special_tokens=True)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    assert _cli(["--model", str(hf), "--chat", "--temperature", "0", "--max-new-tokens", str(n)],
                stdin="What is 2+2?\nSay hi in emoji 😀\n") == "".join(r + "\n" for r in replies)
