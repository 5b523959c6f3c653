"""Training library behind ``training/train.py``: configs, the trainer loop, checkpoints, metrics.

    from mpt_kernels.train import load_config, Trainer
    cfg = load_config("training/configs/tiny.yaml", ["max_steps=100"])
    summary = Trainer(cfg).fit()
"""
from .checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from .config import (CheckpointConfig, Config, DataConfig, EvalConfig, FaultConfig, ModelConfig, OptimConfig,
                     SchedulerConfig, dump_config, load_config)
from .metrics import MetricsLog, gpu_peak_flops, measure_cpu_peak_flops, mfu, read_metrics
from .schedule import CosineWithWarmup
from .trainer import Trainer, main, print_summary

__all__ = [
    "CheckpointConfig", "Config", "CosineWithWarmup", "DataConfig", "EvalConfig", "FaultConfig", "MetricsLog",
    "ModelConfig", "OptimConfig", "SchedulerConfig", "Trainer", "dump_config", "gpu_peak_flops", "latest_checkpoint",
    "list_checkpoints", "load_config", "main", "measure_cpu_peak_flops", "mfu", "print_summary", "read_metrics",
    "save_checkpoint",
]
