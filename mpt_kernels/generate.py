"""Sample from a local MPT checkpoint directory, streaming tokens as they are produced.

    python -m mpt_kernels.generate --model DIR --prompt "Once upon a time" --max-new-tokens 100
    python -m mpt_kernels.generate --model DIR --prompt "..." --temperature 0      # greedy

DIR holds config.json, the weights (model.safetensors, shards or pytorch_model.bin) and tokenizer.json
(read with the ``tokenizers`` library). No network access.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


class TextStreamer:
    """transformers' streamer protocol (put / end), printing decoded text as it grows. Decoding the whole
    generated tail each time and printing only the new suffix keeps multi-byte / merged tokens right."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False
        self.n_tokens = 0

    def put(self, ids: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt, already shown
            self.prompt_seen = True
            return
        self.ids.append(int(ids.reshape(-1)[0]))
        self.n_tokens += 1
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpt_kernels.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local MPT checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn-impl", default="flash", choices=["flash", "torch"])
    p.add_argument("--no-eos", action="store_true", help="keep going past the end-of-text token")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from mpt_kernels.model import MPTForCausalLM

    tok_path = os.path.join(args.model, "tokenizer.json")
    if not os.path.exists(tok_path):
        p.error(f"--model: {tok_path} not found")
    tokenizer = Tokenizer.from_file(tok_path)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model = MPTForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device, attn_impl=args.attn_impl)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        p.error("--prompt: encodes to no tokens")
    eos = None
    if not args.no_eos:
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            if tokenizer.token_to_id(name) is not None:
                eos = tokenizer.token_to_id(name)
                break
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=eos, streamer=streamer, generator=gen)
    dt = time.perf_counter() - t0
    print(f"[{streamer.n_tokens} tokens in {dt:.2f} s, {streamer.n_tokens / max(dt, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
