"""Learning-rate and weight-decay schedules as pure functions of the step.

A schedule knows nothing of optimizers: :meth:`Schedule.factors` maps a step
to (lr factor, weight-decay factor), and :func:`apply_schedule` multiplies each
param group's ``initial_lr`` / ``initial_weight_decay`` by them. Its only
state is the step, which the checkpoint already holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """WSD (warmup, stable, decay) or cosine, with weight-decay annealing.

    - ``wsd``: linear warmup over ``warmup`` steps to 1, constant, then over
      the last ``decay_frac`` of ``total`` steps a linear decay to ``min_ratio``.
    - ``cosine``: linear warmup, then cosine from 1 to ``min_ratio`` at ``total``.
    - weight decay: 1 before the decay phase; during it
      ``(1 - t)^wd_gamma`` with t in [0, 1] the progress through the decay phase
      (``wd_gamma=0`` turns annealing off). For cosine the "decay phase" is
      everything after warmup.

    Steps count from 0: ``factors(s)`` is used for the update that makes step s+1.
    """

    kind: str = "wsd"
    total: int = 1000
    warmup: int = 0
    decay_frac: float = 0.2
    min_ratio: float = 0.0
    wd_gamma: float = 2.0

    def __post_init__(self):
        if self.kind not in ("wsd", "cosine", "constant"):
            raise ValueError(f"schedule kind must be 'wsd', 'cosine' or 'constant', got {self.kind!r}")
        if self.total < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total}")
        if not 0 <= self.warmup <= self.total:
            raise ValueError(f"warmup must be in [0, total={self.total}], got {self.warmup}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        if self.wd_gamma < 0:
            raise ValueError(f"wd_gamma must be >= 0, got {self.wd_gamma}")

    @property
    def decay_start(self) -> int:
        if self.kind == "wsd":
            return max(self.warmup, self.total - int(round(self.decay_frac * self.total)))
        if self.kind == "cosine":
            return self.warmup
        return self.total

    def decay_progress(self, step: int) -> float:
        """t in [0, 1]: how far ``step`` is through the decay phase."""
        start = self.decay_start
        if step < start or self.total <= start:
            return 0.0
        return min(1.0, (step - start) / (self.total - start))

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = self.decay_progress(step)
        if self.kind == "wsd":
            return 1.0 - (1.0 - self.min_ratio) * t
        if self.kind == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    def wd_factor(self, step: int) -> float:
        if self.wd_gamma == 0:
            return 1.0
        return (1.0 - self.decay_progress(step)) ** self.wd_gamma

    def factors(self, step: int) -> tuple[float, float]:
        return self.lr_factor(step), self.wd_factor(step)


def apply_schedule(optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr and weight decay for ``step``; returns the lr factor."""
    lr_f, wd_f = schedule.factors(step)
    for group in optimizer.param_groups:
        base_lr = group.setdefault("initial_lr", group["lr"])
        base_wd = group.setdefault("initial_weight_decay", group["weight_decay"])
        group["lr"] = base_lr * lr_f
        group["weight_decay"] = base_wd * wd_f
    return lr_f
