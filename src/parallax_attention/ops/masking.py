"""Which keys a query sees: bottom-right causal alignment and FlashAttention windows.

Query i of Lq and key j of Lk are aligned so that the last query sits on the
last key (shift = Lk - Lq). Key j is visible to query i when

    i + shift - left <= j <= i + shift + right      (a bound of -1 is unbounded)

and, if causal, j <= i + shift. Causal is therefore the window's right bound
clamped to 0.
"""

from __future__ import annotations

import torch


def effective_bounds(causal: bool, window: tuple[int, int]) -> tuple[int | None, int | None]:
    """(left, right) offsets around the diagonal after folding in causality; None = unbounded."""
    left, right = window
    lo = None if left < 0 else left
    hi = None if right < 0 else right
    if causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def visible_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, shift: int, causal: bool,
                 window: tuple[int, int]) -> torch.Tensor | None:
    """Boolean (len(q_idx), len(k_idx)) mask of visible pairs, or None when all are visible."""
    lo, hi = effective_bounds(causal, window)
    if lo is None and hi is None:
        return None
    diag = q_idx[:, None] + shift
    mask = None
    if lo is not None:
        mask = k_idx[None, :] >= diag - lo
    if hi is not None:
        upper = k_idx[None, :] <= diag + hi
        mask = upper if mask is None else mask & upper
    return mask


def key_range(q_start: int, q_end: int, lk: int, shift: int, causal: bool,
              window: tuple[int, int]) -> tuple[int, int]:
    """Half-open range of keys that any query in [q_start, q_end) can see (may be empty)."""
    lo, hi = effective_bounds(causal, window)
    k_start = 0 if lo is None else max(0, q_start + shift - lo)
    k_end = lk if hi is None else min(lk, q_end - 1 + shift + hi + 1)
    return k_start, max(k_start, k_end)


def block_fully_visible(q_start: int, q_end: int, k_start: int, k_end: int, shift: int,
                        causal: bool, window: tuple[int, int]) -> bool:
    lo, hi = effective_bounds(causal, window)
    if lo is not None and k_start < (q_end - 1) + shift - lo:
        return False
    if hi is not None and (k_end - 1) > q_start + shift + hi:
        return False
    return True
