"""The training loop: pretraining and finetuning of MPT models, one process or many.

    from mpt_kernels.train import load_config, Trainer
    summary = Trainer(load_config("training/configs/tiny.yaml", ["max_steps=50"])).fit()

One optimizer step = ``global_batch_size`` samples = ``accum`` micro-batches of
``micro_batch_size`` on each of ``world_size`` ranks (accum = global / (micro * world)). Under
``torchrun`` the model is wrapped in DDP or FSDP2 (``fully_shard`` per block, then the root) and
checkpoints go through torch.distributed.checkpoint, one shard per rank; with one process they are
plain ``torch.save`` files. Either way a checkpoint holds everything needed to continue the same
run exactly: weights, optimizer (Lion's momentum, step counts, stochastic-rounding seed), the
learning-rate schedule, the data position (samples consumed, from which the streaming dataset
computes the next sample directly) and every rank's RNG states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import (FinetuneDataset, Stream, StreamingTokenDataset, TokenShards, load_tokenizer, make_loader,
                    padded_vocab_size)
from ..data.dataset import _vocab_sha256_of_file, tokenizer_mismatch_error
from .checkpoint import latest_checkpoint, load_rng, read_trainer_state, save_checkpoint
from .config import Config, dump_config
from .metrics import MetricsLog, cpu_has_native_bf16, mfu, peak_flops, plot_loss_curve, read_metrics
from .schedule import CosineWithWarmup


def _kernels_have_cuda() -> bool:
    import mpt_kernels as mk

    return mk.cuda_available()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ResumeError(ValueError):
    """checkpoint.autoresume found a checkpoint this config cannot continue (another model shape,
    data mix or optimizer): reported as a usage error, with what to do."""


def _inside(path: str | os.PathLike | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


class Trainer:
    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self._t0 = time.time()  # max_minutes and the reported wall time count the data/model set-up too
        self._init_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self._build_data()
        self._build_model()
        self._build_optimizer()
        # Only now that the config could be set up: a failed setup writes nothing into the run folder
        # (the bundled corpus, a cache, may already be built in <run>/corpus).
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self._barrier()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.rank == 0)

    # ------------------------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda asked for, but torch sees no CUDA device")
        if use_cuda and not _kernels_have_cuda():
            # (otherwise the first LayerNorm on the GPU fails, after the data and the model are built)
            why = ("torch sees a CUDA device, but this build of mpt_kernels has no CUDA kernels (installed "
                   "without nvcc, or with MPT_KERNELS_CUDA=0): reinstall with the CUDA toolkit on PATH "
                   "(MPT_KERNELS_CUDA=1 pip install .)")
            if cfg.device == "cuda":
                raise ValueError(f"device=cuda: {why}, or pass device=cpu")
            _log(f"[train] WARNING: {why}; training on the CPU instead (device=auto)")
            use_cuda = False
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            from torch.distributed import PrefixStore
            from torch.distributed.rendezvous import rendezvous

            # torchrun keeps its key-value store across restarts: without a per-attempt prefix the
            # restarted ranks can read the dead attempt's addresses and fail to connect (seen with gloo).
            store, rank, world_size = next(rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group("nccl" if use_cuda else "gloo", store=PrefixStore(f"mptk/attempt{attempt}", store),
                                    rank=rank, world_size=world_size)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.precision == "auto":
            if use_cuda:
                self.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
            else:
                self.precision = "bf16" if cpu_has_native_bf16() else "fp32"
        else:
            self.precision = cfg.precision
        if use_cuda and self.precision == "fp32":
            # Caught here rather than at the first attention call, minutes later.
            raise ValueError("precision: fp32 training on CUDA is not supported: the CUDA attention kernels take "
                             "bfloat16/float16 (sm_80+ GPUs); use precision=bf16 (autocast, float32 master weights)")
        per_step = cfg.micro_batch_size * self.world
        if cfg.global_batch_size % per_step:
            raise ValueError(f"global_batch_size ({cfg.global_batch_size}) must be a multiple of micro_batch_size x "
                             f"world_size ({cfg.micro_batch_size} x {self.world})")
        self.accum = cfg.global_batch_size // per_step

    def _rng_aside(self):
        """Keeps torch's default generator out of what is not the training step: a DataLoader iterator
        draws its base seed from it, the CPU peak measurement draws random matrices. Dropout draws from
        it too, so those draws would shift its masks, and a resumed run (no step-0 evaluation, a new
        train loader, another start-up measurement) would train on other masks than a run that never
        stopped."""
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        common = dict(seed=cfg.seed, batch_size=cfg.micro_batch_size, rank=self.rank, world_size=self.world)
        paths = [("model.init_from", cfg.model.init_from, "folder")]
        if d.kind == "finetune":
            paths += [("data.finetune_path", d.finetune_path, "file"), ("data.finetune_val_path", d.finetune_val_path, "file")]
        for key, value, what in paths:
            if value and not (Path(value).is_dir() if what == "folder" else Path(value).is_file()):
                raise FileNotFoundError(
                    f"{key}={value!r}: no such {what} (a relative path is read from the current directory, "
                    f"{os.getcwd()!r}; the shipped configs' relative paths work from the repository root)")
        if d.kind == "bundled":
            from ..data.corpus import build_default_corpus

            cache = Path(d.cache_dir) if d.cache_dir else self.run_dir / "corpus"
            kwargs = dict(seq_len=d.seq_len, tokenizer=d.tokenizer, vocab_size=d.bpe_vocab_size,
                          val_fraction=d.val_fraction, max_code_bytes=d.max_code_bytes)
            if self.rank == 0:  # one rank builds, the others read the finished cache
                paths = build_default_corpus(cache, show_progress=cfg.progress, **kwargs)
            self._barrier()
            if self.rank != 0:
                paths = build_default_corpus(cache, show_progress=False, **kwargs)
            self.tokenizer = load_tokenizer(paths["tokenizer"])
            self._check_init_from_tokenizer()
            # (the sources' names are checked by Config.validate, before the corpus is built)
            train = [Stream(paths[k]["train"], float(p)) for k, p in d.bundled_proportions.items() if p > 0]
            val = [Stream(paths[k]["val"], float(p)) for k, p in d.bundled_proportions.items() if p > 0]
        elif d.kind == "shards":
            train = [Stream(s["path"], s.get("proportion")) if isinstance(s, dict) else Stream(str(s)) for s in d.streams]
            val = [Stream(s["path"], s.get("proportion")) if isinstance(s, dict) else Stream(str(s)) for s in d.val_streams]
            self.tokenizer = self._shards_tokenizer(train, val)
            self._check_init_from_tokenizer()
        else:
            tok_path = d.tokenizer or (cfg.model.init_from and Path(cfg.model.init_from) / "tokenizer.json")
            if not tok_path:
                raise ValueError("finetuning needs data.tokenizer (or a tokenizer.json in model.init_from)")
            self.tokenizer = load_tokenizer(tok_path)
            self._check_init_from_tokenizer()  # before ChatML's markers are added to it
            ft = dict(max_seq_len=d.seq_len, fmt=d.finetune_format)
            self.train_set = FinetuneDataset(d.finetune_path, self.tokenizer, shuffle=d.shuffle, **ft, **common)
            self.val_set = (FinetuneDataset(d.finetune_val_path, self.tokenizer, shuffle=False, **ft, **common)
                            if d.finetune_val_path else None)
            self._plan_eval()
            self.collate = self.train_set.collate
            if self.rank == 0:
                for name, ds in (("data.finetune_path", self.train_set), ("data.finetune_val_path", self.val_set)):
                    if ds is not None and ds.dropped:
                        _log(f"[train] {name}: {ds.dropped} example(s) dropped: no response token within "
                             f"data.seq_len={d.seq_len} tokens")
            return
        mix = dict(sequence_id=d.sequence_id, allow_tokenizer_mismatch=d.allow_tokenizer_mismatch)
        self.train_set = StreamingTokenDataset(train, shuffle=d.shuffle, epoch_size=d.epoch_size, **mix, **common)
        self.val_set = StreamingTokenDataset(val, **mix, **common) if val else None
        self._plan_eval()
        for name, ds in (("data.streams", self.train_set), ("data.val_streams", self.val_set)):
            if ds is not None and ds.seq_len != d.seq_len:
                # samples are read whole: the step's token count, MFU and max_seq_len all follow data.seq_len
                raise ValueError(f"data.seq_len={d.seq_len}, but the shards of {name} hold {ds.seq_len}-token samples: "
                                 f"set data.seq_len={ds.seq_len}, or convert the data with --seq-len {d.seq_len}")
        if self.train_set.vocab_size and self.train_set.vocab_size > self.tokenizer.vocab_size:
            raise ValueError(f"the shards hold ids up to {self.train_set.vocab_size}, more than the tokenizer's "
                             f"{self.tokenizer.vocab_size}: wrong tokenizer?")
        from ..data import collate

        self.collate = collate

    def _shards_tokenizer(self, train: list[Stream], val: list[Stream]):
        """The tokenizer of data.kind=shards: data.tokenizer, else the one the first index names. Every
        train and val stream must have been converted with it (the same vocabulary: the hash each
        index records, or for an older index the tokenizer it names). Reads the indexes only: no
        dataset is built (one of the first stream alone refused a proportion of 0)."""
        d = self.cfg.data
        named = ([(f"data.streams[{i}] ({s.path!r})", TokenShards(s.path)) for i, s in enumerate(train)]
                 + [(f"data.val_streams[{i}] ({s.path!r})", TokenShards(s.path)) for i, s in enumerate(val)])
        tok_path = d.tokenizer
        for _, shards in ([] if tok_path else named):
            tok_path = shards.resolve_tokenizer()
            if tok_path:
                break
        if not tok_path:
            raise ValueError("data.tokenizer is needed (the shards' indexes do not name their tokenizer)")
        tokenizer = load_tokenizer(tok_path)
        if d.allow_tokenizer_mismatch:
            return tokenizer
        ref = None  # (name, shards, vocabulary hash) of the first stream whose tokenizer is known
        for name, shards in named:
            sha = shards.tokenizer_vocab_sha256()
            if sha is None:
                continue
            if ref is None:
                ref = (name, shards, sha)
            elif sha != ref[2]:
                raise tokenizer_mismatch_error(ref[0], ref[1].tokenizer_name(), name, shards.tokenizer_name())
        if d.tokenizer and ref is not None and ref[2] != tokenizer.vocab_sha256():
            raise ValueError(
                f"data.tokenizer={d.tokenizer!r} is not the tokenizer {ref[0]} was converted with "
                f"({ref[1].tokenizer_name()}): their vocabularies differ, so the model would learn the shards' ids "
                "as other tokens and the run would save the wrong tokenizer beside it. Leave data.tokenizer unset "
                "(each index names its tokenizer), point it at that tokenizer, or set "
                "data.allow_tokenizer_mismatch=true to train anyway")
        return tokenizer

    def _check_init_from_tokenizer(self) -> None:
        """model.init_from's tokenizer.json (when it has one) must be the data's: the model's ids mean
        its tokens, and the run saves the data's tokenizer beside the weights."""
        m, d = self.cfg.model, self.cfg.data
        if not m.init_from or d.allow_tokenizer_mismatch:
            return
        theirs = Path(m.init_from) / "tokenizer.json"
        if not theirs.is_file():
            return
        if _vocab_sha256_of_file(str(theirs)) != self.tokenizer.vocab_sha256():
            n = load_tokenizer(theirs).vocab_size
            raise ValueError(
                f"model.init_from={m.init_from!r} was trained with the tokenizer {str(theirs)!r} ({n} tokens), but "
                f"the data uses {self.tokenizer.path!r} ({self.tokenizer.vocab_size} tokens), whose vocabulary "
                "differs: the model would read the data's ids as other tokens, and the run would save the data's "
                "tokenizer beside weights trained with another. Use data made with the model's tokenizer (for "
                "shards: converted with --tokenizer " + str(theirs) + "; otherwise data.tokenizer unset or set "
                "to it), or set data.allow_tokenizer_mismatch=true to train the model on the new tokenizer's ids")

    def _plan_eval(self) -> None:
        """Samples per evaluation: eval.batches micro-batches per rank, but never more than one pass
        over a smaller val set (the order would repeat samples and weight them unevenly), in whole
        batches so every rank runs the same number of equal batches (FSDP's collectives need that).
        A val set smaller than one micro-batch per rank is read in one smaller batch."""
        self.eval_note = ""
        if self.val_set is None:
            return
        cfg, world = self.cfg, self.world
        micro = cfg.micro_batch_size
        want = cfg.eval.batches * micro * world
        n_val = int(self.val_set.order.epoch_size)  # one pass (with proportions: one epoch of the mix)
        if n_val >= want:
            batch, n = micro, want
        else:
            batch = micro if n_val >= micro * world else max(1, n_val // world)
            n = max(1, n_val // (batch * world)) * batch * world
            self.eval_note = (f"{n} samples: one pass over the {n_val}-sample val set, in whole batches, not "
                              f"eval.batches x micro_batch_size x processes = {cfg.eval.batches} x {micro} x {world}")
            if self.rank == 0:
                _log(f"[train] held-out evaluation reads {n} samples ({n // (batch * world)} batch(es) of {batch} per "
                     f"process): the val set holds {n_val}, fewer than eval.batches x micro_batch_size x processes "
                     f"= {want}")
        self.val_set.batch_size = batch
        self.val_set.num_samples = n

    def _build_model(self) -> None:
        from ..model import MPTConfig, MPTForCausalLM

        cfg, m = self.cfg, self.cfg.model
        overrides = dict(m.overrides)
        if m.init_from:
            model = MPTForCausalLM.from_pretrained(m.init_from, device=self.device)
            if overrides:  # e.g. StoryWriter: longer max_seq_len, alibi_bias_max 16
                with torch.device("meta"):  # no second random initialisation: the weights are replaced
                    changed = MPTForCausalLM(model.config.replace(**overrides))
                changed.load_state_dict(model.state_dict(), assign=True)
                model = changed
            if self.tokenizer.vocab_size > model.config.vocab_size:
                # e.g. ChatML's two markers added to a tokenizer whose model has no spare padded rows
                new_vocab = padded_vocab_size(self.tokenizer.vocab_size, 128)
                if self.rank == 0:
                    _log(f"[train] the tokenizer has {self.tokenizer.vocab_size} tokens, the model "
                         f"{model.config.vocab_size} rows: vocabulary grown to {new_vocab} (a multiple of 128); "
                         "the new rows start at the mean embedding")
                model.resize_token_embeddings(new_vocab)
        else:
            base = MPTConfig.from_preset(m.preset)
            vocab = m.vocab_size or padded_vocab_size(self.tokenizer.vocab_size, 128)
            if vocab < self.tokenizer.vocab_size:
                raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's {self.tokenizer.vocab_size}")
            overrides.setdefault("vocab_size", vocab)
            overrides.setdefault("max_seq_len", max(base.max_seq_len, cfg.data.seq_len))
            with torch.device(self.device):  # initialised where it trains (a 7B CPU init takes minutes)
                model = MPTForCausalLM(MPTConfig.from_preset(m.preset, **overrides))
        model.to(self.device)
        self.model_config = model.config
        self.n_params = model.num_parameters()
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        if m.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint

            for block in model.transformer.blocks:
                fwd = block.forward
                block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
        self.raw_model = model  # the unwrapped module (under FSDP2 it is sharded in place)
        if self.distributed and cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.blocks:
                fully_shard(block)
            fully_shard(model)
            self.model = model
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        else:
            self.model = model
        if m.compile:
            model.compile()  # in place: state-dict keys stay the same

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "lion":
            from .. import optim as mk_optim

            self.optimizer = mk_optim.Lion(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           decoupled_weight_decay=True, max_grad_norm=o.max_grad_norm,
                                           skip_nonfinite=True, seed=self.cfg.seed)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = CosineWithWarmup(self.optimizer, base_lr=o.lr, warmup_steps=self.cfg.scheduler.warmup_steps,
                                          max_steps=self.cfg.max_steps, min_lr_ratio=self.cfg.scheduler.min_lr_ratio)

    # ------------------------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True) if "labels" in batch else ids
        kw = {}
        if "sequence_id" in batch:
            kw["sequence_id"] = batch["sequence_id"].to(self.device, non_blocking=True)
        with self._autocast():
            return self.model(ids, labels=labels, **kw).loss

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def _skipped_steps(self) -> int:
        # _adamw_skipped: the steps the optimizer itself does not count (AdamW's; after a resume also
        # a count restored from the trainer state that the optimizer's state dict did not carry)
        return int(getattr(self.optimizer, "skipped_steps", 0)) + getattr(self, "_adamw_skipped", 0)

    def train_step(self, data_iter) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over the global batch, tokens in it). Tokens are real
        tokens: a finetuning batch's right padding is computed but not counted (``lengths``), so
        tokens/s and MFU are not inflated by it.

        The loss (and so the gradient) is the mean over every target token of the global batch. In
        pretraining every micro-batch holds the same number of targets, so that is the mean of the
        micro-batches' means. Finetuning batches do not (responses differ in length, prompts are
        masked): each micro-batch's mean is weighted by its share of the global batch's targets
        (counted across ranks), so the step does not depend on micro_batch_size, accumulation or the
        number of ranks."""
        self.model.train()
        weights = None
        if self.cfg.data.kind == "finetune":  # the weights need every micro-batch's target count first
            batches = [next(data_iter) for _ in range(self.accum)]
            counts = [int((b.get("labels", b["input_ids"])[:, 1:] != -100).sum()) for b in batches]
            n = torch.tensor([float(sum(counts))], dtype=torch.float64, device=self.device)
            if self.distributed:
                dist.all_reduce(n, op=dist.ReduceOp.SUM)
            n_global = max(float(n.item()), 1.0)
            # DDP and FSDP average the ranks' gradients: the world factor turns that into the sum / n_global
            weights = [c * self.world / n_global for c in counts]
        else:  # fetched as they are used, so loading keeps overlapping the previous micro-batch's compute
            batches = (next(data_iter) for _ in range(self.accum))
        total = torch.zeros((), device=self.device)
        tokens = 0
        for i, batch in enumerate(batches):
            tokens += int(batch["lengths"].sum()) if "lengths" in batch else batch["input_ids"].numel()
            last = i == self.accum - 1
            if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last:
                ctx = self.model.no_sync()  # gradients are averaged once, at the last micro-batch
            else:
                ctx = contextlib.nullcontext()
                if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
                    self.model.set_requires_gradient_sync(last)
            with ctx:
                loss = self._forward_loss(batch)
                if weights is None:
                    loss = loss / self.accum
                elif counts[i] == 0:  # no targets here (loss NaN): a zero-weight backward keeps DDP in step
                    loss = loss.nan_to_num(0.0) * 0.0
                else:
                    loss = loss * weights[i]
                loss.backward()
            total += loss.detach().float()
        if self.cfg.optim.name == "adamw":
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm or math.inf)
            if torch.isfinite(norm):
                self.optimizer.step()
            else:
                self._adamw_skipped = getattr(self, "_adamw_skipped", 0) + 1
        else:
            self.optimizer.step()  # Lion: clipping and the non-finite check happen inside, fused
        self.optimizer.zero_grad(set_to_none=True)
        if weights is not None and self.distributed:  # ranks' padding differs: sum their real tokens
            both = torch.stack([total.double(), torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            loss_sum, tokens_sum = both.tolist()
            return loss_sum / self.world, int(tokens_sum)
        loss = self._all_reduce_mean(total)
        return float(loss.item()), tokens * self.world

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.val_set is None:
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        with self._rng_aside():
            for batch in make_loader(self.val_set, collate_fn=self.collate):
                labels = batch["labels"] if "labels" in batch else batch["input_ids"]
                n = int((labels[:, 1:] != -100).sum())
                loss = self._forward_loss(batch)
                sums[0] += loss.double() * n
                sums[1] += n
        if self.distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.model.train()
        loss = float(sums[0] / sums[1])
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(sums[1])}

    def _data_iter(self, consumed: int):
        self.train_set.set_position(consumed)
        with self._rng_aside():
            return iter(make_loader(self.train_set, num_workers=self.cfg.data.num_workers,
                                    pin_memory=self.device.type == "cuda", collate_fn=self.collate))

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, step: int, consumed: int, *, kill_mid_save: bool = False) -> Path:
        def write(tmp: Path) -> None:
            if self.distributed:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict

                msd, osd = get_state_dict(self.model, self.optimizer)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
            else:
                torch.save(self.raw_model.state_dict(), tmp / "model.pt")
                torch.save(self.optimizer.state_dict(), tmp / "optim.pt")
            if kill_mid_save and self.rank != 0:  # (rank 0 dies later, with everything written)
                crash(tmp)

        def crash(_tmp: Path) -> None:  # test hook: die with the files written but not yet renamed
            _log(f"[train] fault injection: SIGKILL in the middle of saving step {step} (rank {self.rank})")
            os.kill(os.getpid(), signal.SIGKILL)

        state = {"consumed_samples": consumed, "data": self.train_set.state_dict(consumed),
                 "scheduler": self.scheduler.state_dict(), "skipped_steps": self._skipped_steps(),
                 "precision": self.precision, "tokens_seen": int(getattr(self, "_tokens_seen", 0)),
                 "optim": self.cfg.optim.name, "data_kind": self.cfg.data.kind}
        return save_checkpoint(self.ckpt_dir, step, rank=self.rank, world_size=self.world, write=write,
                               trainer_state=state, keep_last=self.cfg.checkpoint.keep_last, barrier=self._barrier,
                               before_rename=crash if kill_mid_save and self.rank == 0 else None)

    def resume(self) -> tuple[int, int]:
        """Load the latest checkpoint of this run; returns (step, samples consumed). A checkpoint this
        config cannot continue (another data mix, model shape or optimizer) raises :class:`ResumeError`."""
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            return 0, 0
        st = read_trainer_state(ck)

        def cannot(what: str, exc: BaseException | None = None) -> ResumeError:
            detail = ""
            if exc is not None:
                lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
                detail = ": " + " ".join(lines[:4]) + (" ..." if len(lines) > 4 else "")
            return ResumeError(
                f"checkpoint.autoresume=true: the latest checkpoint of run {self.cfg.run_name!r} ({ck}) was written "
                f"with {what}, so this config cannot continue it{detail}. Set checkpoint.autoresume=false to start a "
                f"new run in {str(self.run_dir)!r} (its checkpoints are removed), or give this run a new run_name")

        for key, mine in (("optim", self.cfg.optim.name), ("data_kind", self.cfg.data.kind)):
            if st.get(key, mine) != mine:
                name = "optim.name" if key == "optim" else "data.kind"
                raise cannot(f"{name}={st[key]} (this config has {mine})")
        try:  # first, since it is cheap: the data order the checkpoint continues
            self.train_set.load_state_dict(st["data"])
        except ValueError as exc:
            raise cannot("another data mix (streams, their data, sizes or proportions, data.epoch_size, seed or "
                         "data.shuffle)", exc) from exc
        errors: tuple = (RuntimeError, ValueError, KeyError)
        if (ck / "dcp").is_dir():  # torch.distributed.checkpoint reports a mismatch as a BaseException
            from torch.distributed.checkpoint.api import CheckpointException

            errors += (CheckpointException,)
        try:
            self._load_checkpoint_weights(ck)
        except errors as exc:
            raise cannot("another model or optimizer (shape, vocabulary, optimizer settings, or number of "
                         "processes)", exc) from exc
        self.scheduler.load_state_dict(st["scheduler"])
        # Skipped-step count: Lion restores its own from its state dict; whatever the optimizer does not
        # keep (AdamW's, or a Lion state saved before it kept the count) continues from the trainer state.
        self._adamw_skipped = max(0, int(st.get("skipped_steps", 0)) - int(getattr(self.optimizer, "skipped_steps", 0)))
        self._resumed_tokens = st.get("tokens_seen")
        load_rng(ck, self.rank)
        if self.rank == 0:
            _log(f"[train] resumed from {ck} (step {st['step']}, {st['consumed_samples']} samples consumed)")
        return int(st["step"]), int(st["consumed_samples"])

    def _load_checkpoint_weights(self, ck: Path) -> None:
        if (ck / "dcp").is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(self.model, self.optimizer)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=str(ck / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        elif self.distributed:
            raise RuntimeError(f"{ck} was written by a single process; resume it with one process")
        else:
            self.raw_model.load_state_dict(torch.load(ck / "model.pt", map_location=self.device, weights_only=True))
            self.optimizer.load_state_dict(torch.load(ck / "optim.pt", map_location=self.device, weights_only=False))

    def _start_over(self) -> None:
        """A run that does not resume starts clean, even in a directory that holds an earlier run of the
        same name: the earlier run's checkpoints would otherwise outnumber and outlast the new run's
        (keep_last keeps the highest steps, and a later autoresume would continue the earlier run), and
        its metrics would mix into the new run's summary and loss curve."""
        if self.rank == 0:
            import shutil

            from .checkpoint import list_checkpoints

            old = list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
            metrics = self.run_dir / "metrics.jsonl"
            hf = self.run_dir / "hf"
            # The earlier run's Hugging Face export goes too (with checkpoint.save_hf=false nothing would
            # replace it), unless this run reads from it (model.init_from, a tokenizer or data inside it).
            d = self.cfg.data
            reads = [self.cfg.model.init_from, d.tokenizer, d.finetune_path, d.finetune_val_path, d.cache_dir]
            reads += [s["path"] if isinstance(s, dict) else s for s in d.streams + d.val_streams]
            keep_hf = hf.is_dir() and any(_inside(r, hf) for r in reads)
            drop_hf = hf.is_dir() and not keep_hf
            if old or metrics.exists() or drop_hf:
                what = f"checkpoints up to step {old[-1][0]}" if old else ("metrics" if metrics.exists() else "hf/")
                _log(f"[train] {self.run_dir} holds an earlier run ({what}): starting a new run in its place (its "
                     "checkpoints, metrics and loss curve are removed"
                     + ("; so is its Hugging Face export hf/" if drop_hf else "")
                     + ("; its hf/ is kept: this run reads from it" if keep_hf else "")
                     + "; checkpoint.autoresume=true continues a run)")
                for _, path in old:  # (leftover .tmp-* saves: the next save_checkpoint removes them)
                    shutil.rmtree(path)
                metrics.unlink(missing_ok=True)
                (self.run_dir / "loss.png").unlink(missing_ok=True)
                if drop_hf:
                    shutil.rmtree(hf)
        self._barrier()

    def _fault_armed(self, step: int) -> bool:
        """Test hook (config ``fault``): should this rank die at this step?"""
        f = self.cfg.fault
        if f.kill_at_step != step or self.rank != f.rank:
            return False
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return False
        if f.marker:
            if Path(f.marker).exists():
                return False
            Path(f.marker).write_text(f"killed at step {step}{' during the save' if f.during_save else ''}\n")
        return True

    # ------------------------------------------------------------------------------------ output
    def full_model(self):
        """The whole model on rank 0 (None elsewhere). Under FSDP2 a collective: the shards are
        gathered into a fresh unsharded copy (generation calls the model outside ``__call__``, where
        FSDP's all-gather hooks would not run)."""
        if self.distributed and self.cfg.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from ..model import MPTForCausalLM

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank != 0:
                return None
            full = MPTForCausalLM(self.model_config)
            full.load_state_dict(sd)
            return full.to(self.device)
        return self.raw_model if self.rank == 0 else None

    def _chat_format(self) -> str | None:
        """The prompt format the model is finetuned on (None: pretraining)."""
        return self.cfg.data.finetune_format if self.cfg.data.kind == "finetune" else None

    def _stop_ids(self) -> list[int]:
        """Where generation ends: the end-of-text, and for ChatML the end of the assistant's turn
        (what the finetune trains the model to emit; it never trains an end-of-text there)."""
        from ..data.finetune import IM_END

        ids = [self.tokenizer.eos_id]
        if self._chat_format() == "chatml":
            ids.insert(0, self.tokenizer.token_to_id(IM_END))
        return ids

    def save_hf(self, model) -> Path | None:
        """The final model in Hugging Face format, with its tokenizer (tokenizer.json and the
        tokenizer_config.json transformers' AutoTokenizer reads; a finetune's chat template renders
        its prompt format) and a generation_config.json that stops where the format ends a turn
        (rank 0)."""
        from ..data.finetune import chat_template

        out = self.run_dir / "hf"
        if self.rank == 0:
            eos = self.tokenizer.eos_id
            model.save_pretrained(out, eos_token_id=eos, bos_token_id=eos)  # NeoX/GPT style: one <|endoftext|>
            fmt = self._chat_format()
            self.tokenizer.save_hf(out, chat_template=chat_template(fmt) if fmt else None)
            stops = self._stop_ids()
            gen_path = out / "generation_config.json"
            if len(stops) > 1:  # ChatML: transformers' generate() would run past <|im_end|> into a next turn
                gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
                gen.update(eos_token_id=stops, pad_token_id=eos)
                gen_path.write_text(json.dumps(gen, indent=2) + "\n")
        return out if self.rank == 0 else None

    def _sample_prompt_ids(self, prompt: str) -> list[int]:
        """eval.sample_prompt's ids. A finetune's model answers prompts in its format: a plain prompt is
        the user's message, put in that format exactly as the finetune tokenizes it (the shipped
        instruct config's question also samples a chatml finetune in ChatML); a prompt already in the
        format (starting with mpt-instruct's first line, or holding <|im_start|>) is taken as it is."""
        from ..data.finetune import IM_START, INSTRUCT_INTRO, format_chatml, format_mpt_instruct, tokenize_example

        fmt = self._chat_format()
        if fmt == "chatml" and IM_START not in prompt:
            segs = format_chatml({"prompt": prompt, "response": ""})[:-2]  # up to the assistant's turn opening
        elif fmt == "mpt-instruct" and not prompt.startswith(INSTRUCT_INTRO):
            segs = format_mpt_instruct({"prompt": prompt, "response": ""}, self.tokenizer.eos_token)[:-1]
        else:
            return self.tokenizer.encode(prompt)
        return tokenize_example(segs, self.tokenizer)[0].tolist()

    @torch.no_grad()
    def sample(self, model) -> str | None:
        e = self.cfg.eval
        if e.sample_tokens <= 0 or model is None:
            return None
        ids = self._sample_prompt_ids(e.sample_prompt) or [self.tokenizer.eos_id]
        x = torch.tensor([ids], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        was_training = model.training
        model.eval()
        with self._autocast():
            out = model.generate(x, max_new_tokens=e.sample_tokens, temperature=e.temperature, top_k=e.top_k,
                                 eos_token_id=self._stop_ids(), generator=gen)
        model.train(was_training)
        return self.tokenizer.decode(out[0].tolist())

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train to max_steps (or max_minutes), evaluating, checkpointing and sampling as configured.
        On the CPU, denormal floats are flushed to zero meanwhile (cfg.flush_denormals): once a run's
        attention probabilities and gradients reach them, every operation on one costs Intel cores a
        microcode assist (the tiny run slowed from ~7,500 to ~4,500 tokens/s after 50 steps)."""
        from .. import _ext

        flush = self.device.type == "cpu" and self.cfg.flush_denormals
        was = _ext.set_flush_denormal(True) if flush else None
        try:
            return self._fit()
        finally:
            if flush:
                _ext.set_flush_denormal(was)

    def _fit(self) -> dict:
        cfg = self.cfg
        t_start = self._t0
        step, consumed = self.resume() if cfg.checkpoint.autoresume else (0, 0)
        resumed = step > 0
        # The step whose checkpoint already holds this state: the final save skips it rather than
        # write the same checkpoint again (a max_minutes stop on a save step, a finished run resumed),
        # which costs a whole save and swaps the folders, with no complete step_N for a moment.
        saved_step = step if resumed else None
        if not resumed:
            self._start_over()
        seq_len = cfg.data.seq_len
        # real tokens trained on so far (finetuning's padding not counted; a checkpoint from before
        # this count existed: samples x seq_len, exact for pretraining)
        self._tokens_seen = getattr(self, "_resumed_tokens", None) if resumed else 0
        if self._tokens_seen is None:
            self._tokens_seen = consumed * seq_len
        with self._rng_aside():
            peak, peak_src = peak_flops(self.device, self.precision)
        if self.rank == 0:
            _log(f"[train] {self.n_params / 1e6:.2f}M parameters ({cfg.model.preset}), {self.world} process(es) on "
                 f"{self.device.type}, {self.precision}, global batch {cfg.global_batch_size} x "
                 f"{'up to ' if cfg.data.kind == 'finetune' else ''}{seq_len} tokens "
                 f"(micro {cfg.micro_batch_size}, accumulation {self.accum}), {cfg.max_steps} steps; "
                 f"MFU peak {peak / 1e12:.3g} TFLOP/s per device from {peak_src}")
            self.metrics.write(kind="start", step=step, resumed=resumed, n_params=self.n_params, world_size=self.world,
                               device=str(self.device), precision=self.precision, peak_flops=peak, peak_source=peak_src,
                               flops_per_token=self.flops_per_token, vocab_size=self.model_config.vocab_size)
        first_eval = None
        if not resumed and cfg.eval.every >= 0:
            first_eval = self.evaluate()
            if first_eval and self.rank == 0:
                self.metrics.write(kind="eval", step=0, **first_eval)
                _log(f"[train] held-out before training: loss {first_eval['loss']:.3f}, ppl {first_eval['ppl']:.1f}"
                     + (f" ({self.eval_note})" if self.eval_note else ""))
        data_iter = self._data_iter(consumed)
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
        skipped_before = self._skipped_steps()
        window_t, window_tokens = time.perf_counter(), 0
        last_eval = first_eval
        stopped_early = False
        peak_rechecked = False
        while step < cfg.max_steps:
            lr = self.scheduler.apply(step)
            loss, tokens = self.train_step(data_iter)
            step += 1
            consumed += cfg.global_batch_size
            window_tokens += tokens
            self._tokens_seen += tokens
            skipped = self._skipped_steps()
            rec = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": self._tokens_seen}
            if skipped > skipped_before:
                rec["skipped"] = True
                if self.rank == 0:
                    msg = f"[train] step {step}: non-finite gradients, update skipped ({skipped} so far)"
                    (bar.write(msg, file=sys.stderr) if bar else _log(msg))
                skipped_before = skipped
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt
                if self.device.type == "cpu" and (not peak_rechecked or mfu(self.flops_per_token, tps, peak, self.world) > 1):
                    # The CPU peak is the best matmul rate measured so far: the start-up measurement
                    # may have run on a busy machine (the corpus build, another process), which left
                    # MFU above 100% until the first evaluation re-measured it. Check again at the
                    # first log step, and whenever MFU would read above 100%.
                    with self._rng_aside():
                        peak = max(peak, peak_flops(self.device, self.precision, seconds=0.25)[0])
                    peak_rechecked = True
                rec.update(tokens_per_s=tps, mfu=mfu(self.flops_per_token, tps, peak, self.world))
                window_t, window_tokens = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu']:.1%}")
            if self.rank == 0:
                self.metrics.write(**rec)
            if bar is not None:
                bar.update(1)
            t_aside = time.perf_counter()  # evaluation and checkpointing stay out of tokens/s and MFU
            if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < cfg.max_steps:
                if self.device.type == "cpu":
                    # The CPU peak is the best matmul rate measured so far: a start-up measurement
                    # taken while the machine was busy would otherwise leave MFU above 100% later.
                    with self._rng_aside():
                        peak = max(peak, peak_flops(self.device, self.precision, seconds=0.25)[0])
                last_eval = self.evaluate()
                if last_eval and self.rank == 0:
                    self.metrics.write(kind="eval", step=step, **last_eval)
                    msg = f"[eval] step {step}: held-out loss {last_eval['loss']:.3f}, ppl {last_eval['ppl']:.1f}"
                    msg += f" ({self.eval_note})" if self.eval_note else ""
                    (bar.write(msg, file=sys.stderr) if bar else _log(msg))  # progress=false: the console too
            saving = bool(cfg.checkpoint.save_every) and step % cfg.checkpoint.save_every == 0 and step < cfg.max_steps
            fault = self._fault_armed(step)
            if saving:
                self.save(step, consumed, kill_mid_save=fault and cfg.fault.during_save)
                saved_step = step
            window_t += time.perf_counter() - t_aside
            if fault and not cfg.fault.during_save:
                _log(f"[train] fault injection: SIGKILL after step {step} (rank {self.rank})")
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.max_minutes is not None:
                over = torch.tensor([float((time.time() - t_start) / 60 > cfg.max_minutes)], device=self.device)
                if self.distributed:  # every rank must stop at the same step
                    dist.all_reduce(over, op=dist.ReduceOp.MAX)
                if over.item() > 0:
                    stopped_early = True
                    if self.rank == 0:
                        msg = (f"[train] stopped after step {step} of {cfg.max_steps}: max_minutes={cfg.max_minutes} "
                               f"reached (learning rate {lr:.2e}, not yet at the end of its schedule)")
                        (bar.write(msg, file=sys.stderr) if bar else _log(msg))
                    break
        if bar is not None:
            bar.close()
        final_eval = self.evaluate()
        if final_eval and self.rank == 0:
            self.metrics.write(kind="eval", step=step, **final_eval)
        if step != saved_step:
            self.save(step, consumed)
        full = self.full_model() if (cfg.checkpoint.save_hf or cfg.eval.sample_tokens > 0) else None
        hf = self.save_hf(full) if cfg.checkpoint.save_hf else None
        text = self.sample(full)
        self._barrier()
        wall = time.time() - t_start
        if first_eval is None and self.rank == 0:  # resumed: the step-0 evaluation is in the metrics
            ev = read_metrics(self.run_dir / "metrics.jsonl", "eval")
            if ev and ev[0].get("step") == 0:
                first_eval = {k: ev[0][k] for k in ("loss", "ppl", "tokens") if k in ev[0]}
        summary = {"steps": step, "max_steps": cfg.max_steps, "stopped_early": stopped_early, "wall_s": wall, "final_eval": final_eval,
                   "first_eval": first_eval, "skipped_steps": self._skipped_steps(), "hf_dir": str(hf) if hf else None,
                   "sample": text, "run_dir": str(self.run_dir)}
        if self.rank == 0:
            train = read_metrics(self.run_dir / "metrics.jsonl", "train")
            finite = [r["loss"] for r in train if math.isfinite(r["loss"])]  # a skipped step's loss is NaN/inf
            if finite:
                k = max(1, min(10, len(finite) // 5))
                summary["loss_first"] = sum(finite[:k]) / k
                summary["loss_last"] = sum(finite[-k:]) / k
            if train:
                tps = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
                mf = [r["mfu"] for r in train if "mfu" in r]
                if tps:
                    summary["tokens_per_s"] = sum(tps) / len(tps)
                    summary["mfu"] = sum(mf) / len(mf)
            if cfg.plot and plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                                            title=(cfg.run_name if cfg.run_name == cfg.model.preset
                                                   else f"{cfg.run_name} ({cfg.model.preset})")):
                summary["plot"] = str(self.run_dir / "loss.png")
            self.metrics.write(kind="summary", **{k: v for k, v in summary.items() if k != "sample"})
        return summary

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def print_summary(s: dict) -> None:
    lines = ["", "=" * 72, f"run: {s['run_dir']}   steps: {s['steps']}   wall time: {s['wall_s']:.0f} s"]
    if s.get("stopped_early"):
        lines.append(f"stopped early by max_minutes after {s['steps']} of {s.get('max_steps', '?')} steps")
    if "loss_first" in s:
        lines.append(f"train loss: {s['loss_first']:.3f} (first steps) -> {s['loss_last']:.3f} (last steps)")
    if s.get("first_eval") and s.get("final_eval"):
        a, b = s["first_eval"], s["final_eval"]
        lines.append(f"held-out loss: {a['loss']:.3f} -> {b['loss']:.3f}   perplexity: {a['ppl']:.1f} -> {b['ppl']:.1f}")
    elif s.get("final_eval"):
        lines.append(f"held-out loss: {s['final_eval']['loss']:.3f}   perplexity: {s['final_eval']['ppl']:.1f}")
    if "tokens_per_s" in s:
        lines.append(f"throughput: {s['tokens_per_s']:,.0f} tokens/s   MFU: {s['mfu']:.1%}")
    if s.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite gradients): {s['skipped_steps']}")
    if s.get("hf_dir"):
        lines.append(f"model (Hugging Face format): {s['hf_dir']}")
    if s.get("plot"):
        lines.append(f"loss curve: {s['plot']}")
    if s.get("sample") is not None:
        lines += ["sample:", "-" * 72, s["sample"], "-" * 72]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None, default_config: str | None = None) -> int:
    """Command line of training/train.py; ``default_config`` is used when no --config is given."""
    import argparse

    from .config import load_config

    default_cfg = Path(default_config) if default_config else None
    ap = argparse.ArgumentParser(prog="train.py", description="Pretrain or finetune an MPT model. With no "
                                 "arguments: the tiny preset on the bundled corpus (CPU-sized).")
    ap.add_argument("--config", default=None, help=f"YAML config (default: {default_cfg or 'built-in defaults'})")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=100 optim.lr=3e-3")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    a = ap.parse_args(argv)
    path = a.config or (default_cfg if default_cfg is not None and default_cfg.is_file() else None)
    try:
        cfg = load_config(path, a.overrides)
    except (ValueError, OSError) as exc:  # a bad key, value or file: argparse's style, no traceback
        ap.error(f"config: {exc}")
    if a.print_config:
        try:
            print(dump_config(cfg), flush=True)
        except BrokenPipeError:  # `--print-config | head`: the reader left; end quietly, as shells expect
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would raise)
            return 1
        return 0
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as exc:  # what the config asks for cannot be set up: no traceback
        ap.error(f"setup: {exc}")
    try:
        summary = trainer.fit()
        if trainer.rank == 0:
            print_summary(summary)
    except ResumeError as exc:  # autoresume with a config that cannot continue the checkpoint: no traceback
        ap.error(f"resume: {exc}")
    finally:
        trainer.close()
    return 0
