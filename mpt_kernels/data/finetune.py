"""Instruction / chat finetuning data: prompt-response JSONL, loss on the response only.

Records (one JSON object per line) are either ``{"prompt": ..., "response": ...}`` (optionally with
``"system"``, chatml only) or ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``;
every text is a JSON string (a null, number or list is refused with its file and line).

Formats:

* ``mpt-instruct`` (MPT-7B-Instruct's dolly/HH-RLHF format)::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.
      ### Instruction:
      {prompt}
      ### Response:
      {response}<|endoftext|>

* ``chatml`` (MPT-7B-Chat): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; the special
  tokens are added to the tokenizer when it lacks them (usually into the padded vocabulary's spare
  rows; when it has none, the trainer grows the model's vocabulary to the next multiple of 128).

Each piece is tokenized separately and labelled ``-100`` unless it is a response (assistant turn),
so the loss never teaches the model to write prompts. Examples longer than ``max_seq_len`` are cut
at ``max_seq_len``; one left with no response token is dropped (and counted).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .dataset import SampleOrder, _OrderedDataset
from .tokenizer import Tokenizer

IGNORE_INDEX = -100
INSTRUCT_INTRO = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FORMATS = ("mpt-instruct", "chatml")


def _json_type(value) -> str:
    if value is None:
        return "null"
    for tp, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (list, "a list"), (dict, "an object")):
        if isinstance(value, tp):
            return f"{name} ({json.dumps(value)[:40]})"
    return type(value).__name__


def _text(value, field: str, where: str) -> str:
    """A record's text field: a JSON string, never Python's text of another value (None, a list ...)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field} is {_json_type(value)}, not a string")
    return value


def _messages(rec: dict, where: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {_json_type(rec)}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            _text(m["role"], f"messages[{i}].role", where)
            _text(m["content"], f"messages[{i}].content", where)
        return msgs
    if "prompt" in rec and "response" in rec:
        system = rec.get("system")  # absent, null or "": no system turn
        msgs = [{"role": "system", "content": _text(system, "'system'", where)}] if system is not None and system != "" else []
        return msgs + [{"role": "user", "content": _text(rec["prompt"], "'prompt'", where)},
                       {"role": "assistant", "content": _text(rec["response"], "'response'", where)}]
    raise ValueError(f"{where}: a record needs 'prompt' and 'response', or 'messages'")


def format_mpt_instruct(rec: dict, eos_token: str = "<|endoftext|>", where: str = "record") -> list[tuple[str, bool]]:
    """Segments ``(text, is_response)`` in MPT-Instruct's format (single turn). The format has no
    system prompt (its fixed first line plays that part): a record's non-empty "system" (or a
    system message) is refused rather than silently dropped."""
    msgs = _messages(rec, where)
    if any(m["role"] == "system" and m["content"] for m in msgs):
        raise ValueError(f"{where}: the record has a system prompt, which the mpt-instruct format has no place for "
                         f"(it always starts with {INSTRUCT_INTRO!r}); remove the 'system' field (or system message), "
                         "or use data.finetune_format=chatml, which keeps it")
    other = [m["role"] for m in msgs if m["role"] not in ("system", "user", "assistant")]
    if other:
        raise ValueError(f"{where}: unknown role {other[0]!r}")
    users = [m for m in msgs if m["role"] == "user"]
    bots = [m for m in msgs if m["role"] == "assistant"]
    if len(users) != 1 or len(bots) != 1:
        raise ValueError(f"{where}: the mpt-instruct format is single-turn (one prompt, one response); use chatml")
    prompt = f"{INSTRUCT_INTRO}\n### Instruction:\n{users[0]['content']}\n### Response:\n"
    return [(prompt, False), (bots[0]["content"] + eos_token, True)]


def format_chatml(rec: dict, where: str = "record") -> list[tuple[str, bool]]:
    """Segments ``(text, is_response)`` in ChatML; every assistant turn (with its end marker) trains."""
    segs: list[tuple[str, bool]] = []
    msgs = _messages(rec, where)
    if not any(m["role"] == "assistant" for m in msgs):
        # nothing would train: it was dropped and counted as "too long", which sent users looking at seq_len
        raise ValueError(f"{where}: the record has no assistant turn, so nothing in it would train "
                         "(the loss covers assistant turns only)")
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: unknown role {m['role']!r}")
        segs.append((f"{IM_START}{m['role']}\n", False))
        if m["role"] == "assistant":
            segs.append((f"{m['content']}{IM_END}", True))
            segs.append(("\n", False))
        else:
            segs.append((f"{m['content']}{IM_END}\n", False))
    return segs


def chat_template(fmt: str) -> str:
    """A Jinja chat template (transformers' ``apply_chat_template``) that renders a conversation as the
    finetune format ``fmt`` formats it for training, character for character; saved with a finetuned
    model's tokenizer. ``add_generation_prompt`` opens the assistant's turn (mpt-instruct's prompt
    always ends with it); a conversation ending with the assistant's message renders its end marker."""
    if fmt == "chatml":
        return ("{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
                + IM_END + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START
                + "assistant\\n' }}{% endif %}")
    if fmt == "mpt-instruct":
        return ("{% if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' or "
                "(messages | length == 2 and messages[1]['role'] != 'assistant') %}{{ raise_exception('the "
                "mpt-instruct format is single-turn: one user message, optionally followed by the assistant\\'s "
                "response (no system message)') }}{% endif %}{{ '" + INSTRUCT_INTRO + "\\n### Instruction:\\n' + "
                "messages[0]['content'] + '\\n### Response:\\n' }}{% if messages | length == 2 %}"
                "{{ messages[1]['content'] + eos_token }}{% endif %}")
    raise ValueError(f"chat_template: fmt must be one of {FORMATS}, got {fmt!r}")


def ensure_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> None:
    """Make each marker in ``tokens`` encode to its one id: added when missing, and registered as a special
    token when the vocabulary has it only as an ordinary entry (then the text "<|endoftext|>" would be
    cut into byte-level pieces, and the model would learn to spell the marker instead of emitting it).
    Registering an existing token keeps its id, so the vocabulary (and its hash) stays the same."""
    fix = [t for t in tokens if tokenizer.token_to_id(t) is None or tokenizer.encode(t) != [tokenizer.token_to_id(t)]]
    if fix:
        tokenizer.backend.add_special_tokens(fix)


def ensure_chat_tokens(tokenizer: Tokenizer) -> None:
    ensure_special_tokens(tokenizer, (IM_START, IM_END))


def tokenize_example(segments: Sequence[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = [], []
    for text, train in segments:
        t = tokenizer.encode(text)
        ids += t
        labels += t if train else [IGNORE_INDEX] * len(t)
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


class FinetuneDataset(_OrderedDataset):
    """Tokenized prompt/response examples held in memory, served in the same deterministic,
    rank-sharded, resumable order as :class:`StreamingTokenDataset`. Items are variable-length
    ``{"input_ids", "labels"}``; :meth:`collate` pads a batch."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, *, max_seq_len: int, fmt: str = "mpt-instruct",
                 seed: int = 0, shuffle: bool = True, batch_size: int = 1, rank: int | None = None,
                 world_size: int | None = None, num_samples: int | None = None, pad_to: int | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"FinetuneDataset: fmt must be one of {FORMATS}, got {fmt!r}")
        if fmt == "chatml":
            ensure_chat_tokens(tokenizer)
        else:  # the response ends with the end-of-text marker's text
            ensure_special_tokens(tokenizer, (tokenizer.eos_token,))
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.pad_to = pad_to
        self.pad_id = tokenizer.pad_id
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.dropped = 0
        p = Path(path)
        with open(p, "rb") as fh:  # bytes, so a line that is not UTF-8 is reported with its number
            for n, raw in enumerate(fh):
                where = f"{p}:{n + 1}"
                try:  # a byte-order mark is no part of the first record
                    line = raw.decode("utf-8-sig" if n == 0 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc})") from None
                segs = format_chatml(rec, where) if fmt == "chatml" else format_mpt_instruct(rec, tokenizer.eos_token, where)
                ids, labels = tokenize_example(segs, tokenizer)
                ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
                # The model predicts token t+1 from position t: a label at position 0 never trains.
                if (labels[1:] != IGNORE_INDEX).sum() == 0:
                    self.dropped += 1
                    continue
                self.examples.append((ids, labels))
        if not self.examples:
            raise ValueError(f"FinetuneDataset: no usable example in {p} ({self.dropped} dropped as too long)")
        order = SampleOrder([len(self.examples)], seed=seed, shuffle=shuffle)
        super().__init__(order, batch_size=batch_size, rank=rank, world_size=world_size, num_samples=num_samples)

    def __len__(self) -> int:
        return len(self.examples)

    def _read(self, stream: int, sample: int) -> dict:
        ids, labels = self.examples[sample]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    def collate(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example (or ``pad_to``). Causal attention means pad tokens at the
        end cannot influence real ones, and their labels are -100, so no attention mask is needed.
        ``lengths`` (B,) holds each row's real (unpadded) length: the trainer's tokens/s and MFU
        count those, not the padding."""
        n = max(len(b["input_ids"]) for b in batch)
        if self.pad_to:
            n = max(n, self.pad_to)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.int64)
        for row, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[row, :k] = b["input_ids"]
            labels[row, :k] = b["labels"]
        lengths = torch.tensor([len(b["input_ids"]) for b in batch], dtype=torch.int64)
        return {"input_ids": ids, "labels": labels, "lengths": lengths}
