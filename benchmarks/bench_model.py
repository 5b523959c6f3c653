"""MPT model end to end: ours (mpt_kernels.model) against transformers' MptForCausalLM, same weights,
same dtype (bf16), same run.

    python -m benchmarks model --device cpu|cuda [--quick] [--hf-long] [--dtype bfloat16]

The full CPU run takes ~30 min (transformers' bf16 fwd+bwd at mpt-125m S=2048 alone ~19 min);
--quick runs the same code paths at small sizes (FULL and QUICK below) in a few minutes.

Rows:
- train/fwd: forward and forward+backward tokens/s and peak memory, mpt-125m at seqlen 2048 (batch 1) and
  the tiny preset at seqlen 16384. Achieved TFLOP/s uses llm-foundry's MFU formula
  (``flops_per_token``), as a fraction of the bf16 matmul throughput measured in this run. That
  formula counts full S x S attention, twice what a causal kernel computes: at long seqlens (tiny at
  16384) the fraction can read above 1.
- prefill + decode: a 2k and a 16k prompt, then per-token decode latency against the KV cache; the
  prefill TFLOP/s counts what it executes (dense layers per token, causal attention, the LM head for
  the last token only); the decode fraction is (weights + KV cache bytes read per token) / measured
  copy bandwidth.

Peak memory: CUDA ``max_memory_allocated`` above the level before the call; CPU the process' peak RSS
(VmHWM, reset through /proc/self/clear_refs) above the RSS before the call, once malloc's free heap
(malloc_trim) and mpt_kernels' host pool have been handed back to the OS (memory they kept from
earlier calls would be reused without raising the RSS).
transformers at 16k builds (heads, 16k, 16k) float32 score matrices (~4 GiB each for tiny): it runs
only with --hf-long (default on CUDA, off on CPU where the shared 24 GiB box cannot hold it).
"""
from __future__ import annotations

import gc
import os
import statistics

import torch

from mpt_kernels.model import modeling

from . import harness


# What a run measures: train rows (preset, seqlen, config overrides), prefill/decode prompt lengths
# (tiny preset) and decode steps timed per prompt. --quick is a smoke run of every code path (both
# models, transformers with our Linear, prefill, decode, the fresh-process memory child) in a couple
# of minutes on a 2-core CPU: mpt-125m's width, heads and vocabulary with 2 layers at 128 tokens
# (transformers' CPU bf16 fwd+bwd took over 2 minutes alone at 512), tiny at 512, prompts 128 and
# 1024 (8x the context, as in the full run). Its rows are labelled with these sizes.
FULL = {"train": (("mpt-125m", 2048, {}), ("tiny", 16384, {})), "prompts": (2048, 16384), "decode_tokens": 32}
QUICK = {"train": (("mpt-125m", 128, {"n_layers": 2}), ("tiny", 512, {})), "prompts": (128, 1024),
         "decode_tokens": 16}
# CPU train rows time one call per case (full sizes: 7 s to 19 min each, where the first call's one-off
# costs, the host pool faulting in and the like, do not matter). A call shorter than this is timed
# again, the median of a few calls after it (the quick sizes: 0.05-1 s calls, first calls up to 2x slower).
CPU_SHORT_CALL_S = 2.0


def add_arguments(p):
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--hf-long", action="store_true", default=None,
                   help="also run transformers at 16k (default: on with --device cuda, off on the cpu)")
    p.add_argument("--no-hf-long", dest="hf_long", action="store_false")
    p.add_argument("--iters", type=harness.positive_int, default=None,
                   help="timed calls per train case (default: CPU 1, CUDA 10)")
    p.add_argument("--decode-tokens", type=harness.positive_int, default=None,
                   help="decode steps timed per prompt (default 32, 16 with --quick)")
    p.add_argument("--parts", default="train,decode", type=harness.comma_list(["train", "decode"]),
                   help="comma-separated: train (fwd, fwd+bwd), decode")


# ---- memory ---------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_free_memory() -> None:
    import ctypes

    import mpt_kernels as mk

    mk.empty_host_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Extra peak memory of the block, in bytes (None where it cannot be measured)."""

    def __init__(self, device):
        self.device = device
        self.extra = None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            # Memory freed earlier but kept by malloc or by our host pool would be reused without
            # raising the RSS: the block's allocations would not count. Hand it back first.
            _release_free_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.base = _rss_kib("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.extra = _rss_kib("VmHWM") * 1024 - self.base
        return False


_CHILD_PREFILL = r"""
import json, sys, torch
sys.path[:0] = json.loads(sys.argv[2])
from benchmarks import bench_model as b
a = json.loads(sys.argv[1])
torch.manual_seed(0)
ours, hf = b._build(a["preset"], a["prompt_len"], "cpu", getattr(torch, a["dtype"]))
model = ours if a["which"] == "ours" else hf
del ours, hf
model.eval()
ids = torch.randint(0, model.config.vocab_size, (1, a["prompt_len"]))
with torch.no_grad(), b.PeakMemory("cpu") as pm:
    if a["which"] == "ours":
        cache = model.new_cache(1, capacity=a["prompt_len"] + 8)
        model._forward(ids, None, None, None, cache, True, 1)
    else:
        from transformers import DynamicCache
        model(input_ids=ids, **{b._hf_cache_kw(model): DynamicCache(config=model.config)}, use_cache=True, logits_to_keep=1)
print(json.dumps({"extra": pm.extra}))
"""


def prefill_peak_fresh_process(preset, prompt_len, dtype, which="ours"):
    """Extra peak RSS of one prefill (KV cache included) in a fresh CPU process, in bytes.

    In this process the allocator (and our host pool) reuse memory freed by earlier cases, which
    VmHWM cannot see; a fresh process starts with no such memory, so its VmHWM rise is the real
    footprint (an upper bound: it includes the allocator's slack)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arg = json.dumps(dict(preset=preset, prompt_len=prompt_len, dtype=str(dtype).replace("torch.", ""),
                          which=which))
    r = subprocess.run([sys.executable, "-c", _CHILD_PREFILL, arg, json.dumps(sys.path + [root])],
                       capture_output=True, text=True, cwd=root, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"prefill memory child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["extra"]


# ---- models ---------------------------------------------------------------------------------------
def _build(preset, seqlen, device, dtype, **overrides):
    from transformers import MptConfig as HFConfig
    from transformers import MptForCausalLM as HFModel

    from mpt_kernels.model import MPTConfig, MPTForCausalLM

    # max_seq_len >= seqlen so transformers' bias table covers the run; ours has no such limit.
    cfg = MPTConfig.from_preset(preset, max_seq_len=max(seqlen + 128, 2048), **overrides)  # + decode steps
    ours = MPTForCausalLM(cfg).to(device=device, dtype=dtype)
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_dict().items() if k in (
        "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "no_bias",
        "layer_norm_epsilon")}, attn_config={"attn_impl": "torch"})
    hf_cfg._attn_implementation = "eager"
    hf = HFModel(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)  # same weights (lm_head is tied to wte)
    hf = hf.to(device=device, dtype=dtype)
    return ours, hf


def _hf_cache_kw(model) -> str:
    """The name transformers' forward takes the KV cache under: ``cache`` in newer releases,
    ``past_key_values`` before the rename (e.g. 5.17, which would swallow ``cache=`` into **kwargs
    and decode against an empty cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _patch_linears(model, on: bool):
    """Give (or take back from) a transformers model's nn.Linear layers our CPU float32-GEMM linear."""
    import types

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            if on:
                mod.forward = types.MethodType(lambda self, x: modeling.linear(x, self.weight, self.bias), mod)
            elif "forward" in mod.__dict__:
                del mod.forward


def _ours_loss(m, ids):
    return m(ids, labels=ids).loss


def _hf_loss(m, ids):
    return m(input_ids=ids, labels=ids, use_cache=False).loss


def _bench_train(ctx, report, preset, seqlen, ours, hf, run_hf, iters, warmup, peak_flops):
    ids = torch.randint(0, ours.config.vocab_size, (1, seqlen), device=ctx.device)
    results = {}
    variants = [("ours", ours, _ours_loss, True), ("transformers", hf, _hf_loss, run_hf)]
    if ctx.device == "cpu" and modeling._FP32_GEMM_ON_CPU and ours.dtype != torch.float32:
        # transformers with our float32-GEMM Linear: isolates what the attention/LayerNorm kernels give
        variants.append(("transformers+f32gemm", hf, _hf_loss, run_hf))
    for name, model, loss_fn, enabled in variants:
        if not enabled:
            continue
        model.train()
        _patch_linears(model, name == "transformers+f32gemm")

        def fwd():
            with torch.no_grad():
                loss_fn(model, ids)

        def fwd_bwd():
            loss_fn(model, ids).backward()
            for p in model.parameters():
                p.grad = None

        for mode, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
            _progress(f"{preset} S={seqlen} {name} {mode}")
            for _ in range(warmup):
                fn()
            with PeakMemory(ctx.device) as pm:
                t0 = _now(ctx)
                fn()
                t = _now(ctx) - t0
            if iters > 1:  # the memory-measured call counts as one sample
                t = statistics.median([t] + [_timed(ctx, fn) for _ in range(iters - 1)])
            elif ctx.device == "cpu" and t < CPU_SHORT_CALL_S:  # the first call was the warm-up
                t = statistics.median([_timed(ctx, fn) for _ in range(min(5, max(2, int(CPU_SHORT_CALL_S / t))))])
            results[(name, mode)] = (seqlen / t, pm.extra)
            _progress(f"  -> {seqlen / t:.1f} tok/s, peak +{(pm.extra or 0) / 2**20:.0f} MiB")
    _patch_linears(hf, False)
    flops_fb = ours.flops_per_token(seqlen)
    for mode in ("forward", "fwd+bwd"):
        tps, mem = results[("ours", mode)]
        base = results.get(("transformers", mode))
        same = results.get(("transformers+f32gemm", mode))
        f = flops_fb / 3 if mode == "forward" else flops_fb
        report.add(case=f"{preset} S={seqlen}", mode=mode, ours_tok_s=tps,
                   hf_tok_s=base[0] if base else float("nan"),
                   speedup=tps / base[0] if base else float("nan"),
                   ours_peak_MiB=mem / 2**20 if mem is not None else float("nan"),
                   hf_peak_MiB=base[1] / 2**20 if base and base[1] is not None else float("nan"),
                   hf_f32gemm_tok_s=same[0] if same else float("nan"),
                   speedup_same_gemm=tps / same[0] if same else float("nan"),
                   ours_TFLOPs=tps * f / 1e12, frac_of_matmul=tps * f / 1e12 / peak_flops)


def _bench_decode(ctx, report, preset, prompt_len, ours, hf, run_hf, n_tokens, bandwidth):
    from transformers import DynamicCache

    V = ours.config.vocab_size
    ids = torch.randint(0, V, (1, prompt_len), device=ctx.device)
    ours.eval()
    hf.eval()
    out = {}
    _progress(f"decode {preset} prompt={prompt_len}")
    with torch.no_grad():
        cache = ours.new_cache(1, capacity=prompt_len + n_tokens + 8)
        with PeakMemory(ctx.device) as pm:
            t0 = _now(ctx)
            ours._forward(ids, None, None, None, cache, True, 1)
            t_prefill = _now(ctx) - t0
        nxt = torch.randint(0, V, (1, 1), device=ctx.device)
        ours._forward(nxt, None, None, None, cache, True, 1)  # warm the decode path
        t0 = _now(ctx)
        for _ in range(n_tokens):
            ours._forward(nxt, None, None, None, cache, True, 1)
        t_decode = (_now(ctx) - t0) / n_tokens  # before the memory child below runs
        extra = pm.extra
        if ctx.device == "cpu":  # in-process RSS misses reused memory: measure in a fresh process
            extra = prefill_peak_fresh_process(preset, prompt_len, ours.dtype)
        out["ours"] = (t_prefill, t_decode, extra)
        _progress(f"  -> prefill {t_prefill:.2f} s, decode {out['ours'][1] * 1e3:.1f} ms/token")
        del cache
        if run_hf:
            hcache = DynamicCache(config=hf.config)
            ckw = _hf_cache_kw(hf)
            with PeakMemory(ctx.device) as pm:
                t0 = _now(ctx)
                hf(input_ids=ids, **{ckw: hcache}, use_cache=True, logits_to_keep=1)
                t_prefill = _now(ctx) - t0
            hf(input_ids=nxt, **{ckw: hcache}, use_cache=True)
            t0 = _now(ctx)
            for _ in range(n_tokens):
                hf(input_ids=nxt, **{ckw: hcache}, use_cache=True)
            t_decode = (_now(ctx) - t0) / n_tokens
            extra = pm.extra
            if ctx.device == "cpu":
                extra = prefill_peak_fresh_process(preset, prompt_len, ours.dtype, which="transformers")
            out["transformers"] = (t_prefill, t_decode, extra)
            del hcache
    c = ours.config
    kv_bytes = 2 * c.n_layers * prompt_len * c.kv_n_heads * c.head_dim * ours.dtype.itemsize
    w_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    t_ours = out["ours"][1]
    base = out.get("transformers")
    report.add(case=f"{preset} prompt={prompt_len}", mode="prefill",
               ours_tok_s=prompt_len / out["ours"][0], hf_tok_s=prompt_len / base[0] if base else float("nan"),
               speedup=base[0] / out["ours"][0] if base else float("nan"),
               ours_peak_MiB=out["ours"][2] / 2**20 if out["ours"][2] is not None else float("nan"),
               hf_peak_MiB=base[2] / 2**20 if base and base[2] is not None else float("nan"),
               ours_TFLOPs=_prefill_flops(ours.config, ours.num_parameters(), prompt_len) / out["ours"][0] / 1e12)
    report.add(case=f"{preset} prompt={prompt_len}", mode="decode", ours_tok_s=1 / t_ours,
               hf_tok_s=1 / base[1] if base else float("nan"), speedup=base[1] / t_ours if base else float("nan"),
               ours_ms_per_token=t_ours * 1e3, frac_of_bandwidth=(kv_bytes + w_bytes) / t_ours / 1e9 / bandwidth)
    return t_ours


def _progress(msg):
    import sys
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(ctx, fn):
    t0 = _now(ctx)
    fn()
    return _now(ctx) - t0


def _now(ctx):
    import time

    harness.synchronize(ctx.device)
    return time.perf_counter()


def run(ctx: harness.Context) -> harness.Report:
    a = ctx.args
    dtype = getattr(torch, a.dtype if a is not None else "bfloat16")
    hf_long = a.hf_long if a is not None and a.hf_long is not None else ctx.device == "cuda"
    quick = ctx.quick
    # CPU: one timed call per case (each is seconds to minutes on the 2-core box; the first-call overhead
    # is negligible at that scale; shorter calls: see CPU_SHORT_CALL_S); CUDA: warm up, then the median of 10.
    iters = (a.iters if a is not None and a.iters else None) or (1 if ctx.device == "cpu" else 10)
    warmup = 0 if ctx.device == "cpu" else 2
    sizes = QUICK if quick else FULL
    n_decode = (a.decode_tokens if a is not None and a.decode_tokens else None) or sizes["decode_tokens"]
    if ctx.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    # The compute roof of what actually runs: our CPU low-precision Linear layers run float32 GEMMs.
    gemm_dtype = torch.float32 if (ctx.device == "cpu" and modeling._FP32_GEMM_ON_CPU) else dtype
    peak = harness.matmul_flops(ctx.device, gemm_dtype)
    bw = harness.copy_bandwidth(ctx.device)
    report = harness.Report(
        title=f"MPT model, ours vs transformers' MptForCausalLM ({ctx.device}, {a.dtype if a else 'bfloat16'}, batch 1)",
        columns=["case", "mode", "ours_tok_s", "hf_tok_s", "speedup", "hf_f32gemm_tok_s", "speedup_same_gemm",
                 "ours_peak_MiB", "hf_peak_MiB", "ours_TFLOPs",
                 "frac_of_matmul", "ours_ms_per_token", "frac_of_bandwidth"],
        limits={f"matmul_TFLOPs_{str(gemm_dtype).replace('torch.', '')}": peak, "copy_GBps": bw},
    )
    train_cases = list(sizes["train"])
    parts = set((a.parts if a is not None and getattr(a, "parts", None) else "train,decode").split(","))
    if not parts <= {"train", "decode"}:
        raise SystemExit(f"--parts: expected train and/or decode, got {sorted(parts)}")
    if "train" not in parts:
        train_cases = []
    for preset, seqlen, over in train_cases:
        ours, hf = _build(preset, seqlen, ctx.device, dtype, **over)
        label = preset + "".join(f" {k}={v}" for k, v in over.items())
        _bench_train(ctx, report, label, seqlen, ours, hf, hf_long or seqlen <= 4096, iters, warmup, peak)
        del ours, hf
        gc.collect()

    ms = {}
    for prompt_len in sizes["prompts"] if "decode" in parts else ():
        ours, hf = _build("tiny", prompt_len, ctx.device, dtype)
        ms[prompt_len] = _bench_decode(ctx, report, "tiny", prompt_len, ours, hf, hf_long or prompt_len <= 4096,
                                       n_decode, bw)
        del ours, hf
        gc.collect()
    if ms:
        (s0, t0_), (s1, t1_) = sorted(ms.items())
        report.notes.append(
            f"Decode latency grows {t1_ / t0_:.2f}x from a {s0}- to a {s1}-token context "
            f"({s1 / s0:.0f}x the context): target at most linear.")
    if ctx.device == "cpu" and modeling._FP32_GEMM_ON_CPU:
        report.notes.append("This CPU has no bf16 dot-product instructions: our Linear layers run float32 GEMMs "
                            "on bf16 tensors (torch's bf16 GEMM is several times slower here). hf_f32gemm = "
                            "transformers with the same Linear, so speedup_same_gemm is what the attention and "
                            "LayerNorm kernels give on their own.")
    report.notes.append("speedup = transformers' time / ours. Peak memory: extra bytes over the level before "
                        "the call (CPU: peak RSS, includes the allocator's slack). HF columns are n/a where "
                        "transformers was not run (16k on CPU: its dense score matrices do not fit).")
    report.plot = harness.bar_plot("case", ["ours_tok_s", "hf_tok_s"], "tokens / s", group_key="mode")
    return report


def _prefill_flops(c, n_params: int, S: int) -> float:
    """FLOPs a prefill executes: the dense layers for every token, causal attention (on average S / 2
    keys per query: 4 * d_model * S / 2 per token and layer), and the LM head for the last token only
    (the prefill keeps one position's logits). llm-foundry's training formula would count the head
    for every token and full S x S attention, which overstates a prefill (>100% of the matmul roof)."""
    head = c.vocab_size * c.d_model
    dense = n_params - head * (1 if c.tie_word_embeddings else 2)  # neither the lookup nor the head per token
    return S * (2.0 * dense + 2.0 * c.n_layers * c.d_model * S) + 2.0 * head
