"""Sample from a local MPT checkpoint directory, streaming tokens as they are produced.

    python -m mpt_kernels.generate --model DIR --prompt "Once upon a time" --max-new-tokens 100
    python -m mpt_kernels.generate --model DIR --prompt "..." --temperature 0      # greedy
    python -m mpt_kernels.generate --model DIR --chat [--system "..."]             # multi-turn, ChatML

--chat reads one user message per line from standard input and answers each in ChatML (the format
of MPT-7B-Chat and of this project's chatml finetunes): the conversation's keys and values stay in
one KV cache, so each turn prefills only its own tokens.

DIR holds config.json, the weights (model.safetensors, shards or pytorch_model.bin) and tokenizer.json
(read with the ``tokenizers`` library). No network access. Errors a user can fix (a missing or
unreadable DIR, a --device this machine cannot run, a tokenizer that does not fit the model) print
``python -m mpt_kernels.generate: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


class TextStreamer:
    """transformers' streamer protocol (put / end), printing decoded text as it grows. Decoding the whole
    generated tail each time and printing only the new suffix keeps multi-byte / merged tokens right.
    The tail is decoded behind the prompt's last few tokens, and only what they add is printed: decoders
    that drop a leading space (SentencePiece's Metaspace, WordPiece) or join ``##`` pieces would
    otherwise glue the first generated word to the prompt ("sat on" + "the" -> "sat onthe").
    Once WINDOW tokens have printed cleanly, the window restarts behind the last CONTEXT of them, so a
    token costs O(WINDOW) decoding, not O(tokens so far) (80k generated tokens decoded ~3e9 ids)."""

    CONTEXT = 8  # tokens decoded in front of the window (the prompt's last ones at first)
    WINDOW = 64  # generated tokens decoded together before the window moves on

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.context: list[int] = []
        self.context_text = ""
        self.printed = 0
        self.prompt_seen = False
        self.n_tokens = 0

    def put(self, ids: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt, already shown
            self.prompt_seen = True
            prompt = ids[0] if ids.dim() == 2 else ids.reshape(-1)
            self.context = [int(i) for i in prompt[-self.CONTEXT:].tolist()] if self.CONTEXT else []
            self.context_text = self.tokenizer.decode(self.context) if self.context else ""
            return
        self.ids.append(int(ids.reshape(-1)[0]))
        self.n_tokens += 1
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)
        if self.CONTEXT and len(self.ids) >= self.WINDOW:  # everything so far is printed: move on
            self.context = (self.context + self.ids)[-self.CONTEXT:]
            self.context_text = self.tokenizer.decode(self.context)
            self.ids, self.printed = [], 0

    def _text(self) -> str:
        """The generated text so far, as it reads after the prompt."""
        if self.context:
            text = self.tokenizer.decode(self.context + self.ids)
            if text.startswith(self.context_text):
                return text[len(self.context_text):]
        return self.tokenizer.decode(self.ids)

    def end(self) -> None:
        text = self._text()
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def _check_device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """--device as a torch.device, or an argparse error saying why it cannot run here and what to use.
    None: cuda when torch and mpt_kernels can both use a device, else cpu."""
    import mpt_kernels as mk

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() and mk.cuda_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda":
        if torch.version.cuda is None:
            parser.error(f"--device {name}: this torch ({torch.__version__}) is built without CUDA; "
                         "use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if not mk.cuda_available():
            parser.error(f"--device {name}: mpt_kernels was built without CUDA kernels; use --device cpu, or "
                         "rebuild it with MPT_KERNELS_CUDA=1 (see the README's build options)")
    elif device.type != "cpu":
        parser.error(f"--device: expected cpu or cuda[:N], got {name!r}")
    return device


# generate() names its Python arguments in messages; the command line names its flags.
_FLAG_OF_ARGUMENT = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                     "max_new_tokens": "--max-new-tokens"}


def _flag_message(msg: str) -> str:
    name, sep, rest = msg.partition(": ")
    return f"{_FLAG_OF_ARGUMENT[name]}: {rest}" if sep and name in _FLAG_OF_ARGUMENT else msg


def _load_errors() -> tuple:
    """What loading a checkpoint a user can fix raises: missing or unreadable files (OSError), a config or
    weights we refuse (ValueError), a weights file cut short or corrupt (safetensors' SafetensorError;
    torch.load's RuntimeError or UnpicklingError; out of memory is a RuntimeError too)."""
    import pickle

    errors = [OSError, ValueError, RuntimeError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpt_kernels.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local MPT checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", default=None, help="the text to continue (with --chat: a first user message)")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn chat in ChatML: user messages from stdin, one per line (needs the "
                        "tokenizer's <|im_start|> and <|im_end|> tokens)")
    p.add_argument("--system", default=None, help="--chat: a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when usable, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn-impl", default="flash", choices=["flash", "torch"])
    p.add_argument("--no-eos", action="store_true", help="keep going past the end-of-text token")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    if not -2**63 <= args.seed < 2**64:  # what torch's generators take (torch raised a bare ValueError)
        p.error(f"--seed: expected an integer in [-2**63, 2**64), got {args.seed}")
    if args.prompt is None and not args.chat:
        p.error("--prompt is required (or --chat)")
    if args.system is not None and not args.chat:
        p.error("--system: only with --chat")
    from mpt_kernels.model.generation import check_sampling_args

    try:  # before loading anything or printing the prompt
        check_sampling_args(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        p.error(_flag_message(str(exc)))

    from tokenizers import Tokenizer

    from mpt_kernels.model import MPTForCausalLM

    if not os.path.isdir(args.model):
        p.error(f"--model: {args.model} {'is not a directory' if os.path.exists(args.model) else 'does not exist'} "
                "(expected a local MPT checkpoint directory: config.json, weights and tokenizer.json)")
    tok_path = os.path.join(args.model, "tokenizer.json")
    if not os.path.exists(tok_path):
        p.error(f"--model: {tok_path} not found")
    device = _check_device(p, args.device)
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        p.error(f"--model: cannot read {tok_path}: {exc}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = MPTForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, attn_impl=args.attn_impl)
    except _load_errors() as exc:  # no config/weights, an option we refuse, a mismatch, a file cut short
        p.error(f"--model: cannot load {args.model}: {exc}")
    vocab = model.config.vocab_size
    if args.chat:
        return _chat(p, args, model, tokenizer, device, vocab)
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        p.error("--prompt: encodes to no tokens")
    if max(ids) >= vocab:
        p.error(f"--model: {tok_path} gives token id {max(ids)} for this prompt, but the model's vocabulary has "
                f"{vocab} entries (vocab_size in config.json): the tokenizer does not belong to this checkpoint; "
                "put the tokenizer the model was trained with in its directory")
    if tokenizer.get_vocab_size() > vocab:
        print(f"warning: {tok_path} has {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size "
              f"{vocab}: is it the tokenizer the model was trained with?", file=sys.stderr)
    eos = None
    if not args.no_eos:
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            if tokenizer.token_to_id(name) is not None:
                eos = tokenizer.token_to_id(name)
                break
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token_id=eos, streamer=streamer, generator=gen)
    except (ValueError, MemoryError) as exc:  # what only a step can tell (e.g. a temperature so small the
        sys.stdout.write("\n")                # logits overflow); a KV cache for --max-new-tokens that does not fit
        p.error(_flag_message(str(exc)))
    dt = time.perf_counter() - t0
    print(f"[{streamer.n_tokens} tokens in {dt:.2f} s, {streamer.n_tokens / max(dt, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _chat(p: argparse.ArgumentParser, args, model, tokenizer, device, vocab: int) -> int:
    """The --chat loop: ChatML turns, one KV cache for the whole conversation."""
    from mpt_kernels.data.finetune import IM_END, IM_START

    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        p.error(f"--chat: the tokenizer has no {IM_START} / {IM_END} tokens (ChatML); a model finetuned with "
                "data.format=chatml has them, or continue text with --prompt instead")
    if max(start, end) >= vocab:
        p.error(f"--chat: the tokenizer's ChatML tokens ({start}, {end}) are outside the model's vocabulary "
                f"({vocab}): the tokenizer does not belong to this checkpoint")
    eot = tokenizer.token_to_id("<|endoftext|>")
    stops = [end] + [t for t in (eot,) if t is not None]

    def encode(text: str) -> list[int]:  # as training encodes: no post-processor tokens (a BOS mid-chat)
        return tokenizer.encode(text, add_special_tokens=False).ids

    gen = torch.Generator(device=device).manual_seed(args.seed)
    cache = model.new_cache(1)
    history: list[int] = []
    if args.system:
        history = encode(f"{IM_START}system\n{args.system}{IM_END}\n")
    interactive = sys.stdin.isatty()
    messages = [args.prompt] if args.prompt else []
    turn = 0
    while True:
        if messages:
            message = messages.pop(0)
        else:
            if interactive:
                sys.stdout.write("user> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:  # end of input
                break
            message = line.rstrip("\n")
            if not message.strip():
                continue
        turn += 1
        ids = history + encode(f"{IM_START}user\n{message}{IM_END}\n{IM_START}assistant\n")
        if max(ids) >= vocab:
            p.error(f"--chat: token id {max(ids)} is outside the model's vocabulary ({vocab})")
        cached = len(cache)
        streamer = TextStreamer(tokenizer)
        if interactive:
            sys.stdout.write("assistant> ")
        t0 = time.perf_counter()
        try:
            out = model.generate(torch.tensor([ids], device=device), args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 eos_token_id=None if args.no_eos else stops, streamer=streamer, generator=gen,
                                 past_key_values=cache)
        except (ValueError, MemoryError) as exc:
            sys.stdout.write("\n")
            p.error(_flag_message(str(exc)))
        dt = time.perf_counter() - t0
        history = out[0].tolist()
        if history[-1] == eot and len(history) > len(ids):
            # the model ended its turn with end-of-text: the cache holds every position but this last
            # one, so it becomes the <|im_end|> that closes a turn in training ("...<|endoftext|><|im_end|>"
            # is a sequence the finetune never produces)
            history[-1] = end
        # close the assistant's turn as ChatML does ("<|im_end|>\n"), whether it ended or ran out of tokens
        history += encode(("" if history[-1] == end else IM_END) + "\n")
        print(f"[turn {turn}: prefilled {len(ids) - cached} of {len(ids)} tokens; {streamer.n_tokens} tokens in "
              f"{dt:.2f} s, {streamer.n_tokens / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def run_command(main) -> int:
    """``main()`` as a command (this one's and the export CLI's): Ctrl-C (how a --chat user leaves) and a
    reader that closed the pipe (``| head``) end it quietly, with the statuses shells expect, instead of
    a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        try:
            sys.stdout.write("\n")
            sys.stdout.flush()
        except OSError:
            pass
        return 130
    except BrokenPipeError:
        # nothing more can be written; point stdout at devnull so the flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run_command(main))
