"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``
(llm-foundry's ``cosine_with_warmup`` with ``alpha_f = min_lr_ratio``)."""
from __future__ import annotations

import math


class CosineWithWarmup:
    """Sets each param group's ``lr`` from the step number. Stateless apart from the step, so
    resuming only needs :meth:`state_dict` (kept for symmetry with torch schedulers)."""

    def __init__(self, optimizer, *, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1):
        if warmup_steps < 0 or max_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and max_steps >= 1, got {warmup_steps}, {max_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        cos = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)

    def apply(self, step: int) -> float:
        """Set the optimizer's lr for step ``step`` and return it."""
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.step_num = step
        return lr

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "max_steps": self.max_steps, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])
