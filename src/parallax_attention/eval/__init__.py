"""Evaluation helpers: validation loss and perplexity over token shards."""

from .perplexity import evaluate_loss, lm_loss

__all__ = ["evaluate_loss", "lm_loss"]
