#!/usr/bin/env python
"""Pretrain or finetune an MPT model.

    python training/train.py                                   # tiny preset, bundled corpus, CPU-sized
    python training/train.py --config training/configs/tiny.yaml max_steps=50 optim.lr=2e-3
    python training/train.py --config training/configs/mpt-125m.yaml data.tokenizer=/path/to/tokenizer.json
    torchrun --nproc_per_node=8 training/train.py --config training/configs/mpt-1b.yaml parallel=fsdp

Everything lives in mpt_kernels.train (config dataclasses, trainer, checkpoints); see docs/training.md.
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    if importlib.util.find_spec("mpt_kernels") is None:
        # Not installed: use the checkout this script sits in (built with `setup.py build_ext --inplace`).
        sys.path.insert(0, os.path.dirname(HERE))
    from mpt_kernels.train import main

    sys.exit(main(default_config=os.path.join(HERE, "configs", "tiny.yaml")))
