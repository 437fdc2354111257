"""Training recipe optimizer (Muon + AdamW in one object) and schedules."""

from .muon import (
    NS_COEFFICIENTS,
    NS_STEPS,
    MuonAdamW,
    adjusted_lr,
    build_optimizer,
    build_param_groups,
    classify_parameter,
    zeropower_via_newtonschulz,
)
from .schedules import Schedule, apply_schedule

__all__ = [
    "NS_COEFFICIENTS", "NS_STEPS", "MuonAdamW", "Schedule", "adjusted_lr", "apply_schedule",
    "build_optimizer", "build_param_groups", "classify_parameter", "zeropower_via_newtonschulz",
]
