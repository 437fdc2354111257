"""Training: config, loop, checkpoints and distributed wrappers (each usable on its own)."""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig) -> dict:
    from .loop import train as _train

    return _train(cfg)
