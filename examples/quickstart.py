"""Parallax attention in a few lines, checking what it promises as it goes.

    python examples/quickstart.py
"""

import torch
import torch.nn.functional as F

from parallax_attention import parallax_attn, parallax_attn_varlen
from parallax_attention.ops.reference import parallax_decompose, parallax_weights

torch.manual_seed(0)
B, L, Hq, Hkv, D = 2, 300, 8, 2, 64          # GQA: 4 query heads per kv head
q = torch.randn(B, L, Hq, D, requires_grad=True)
r = 0.1 * torch.randn(B, L, Hq, D)           # the probe, shaped like q
r.requires_grad_()
k = torch.randn(B, L, Hkv, D, requires_grad=True)
v = torch.randn(B, L, Hkv, D, requires_grad=True)


def check(what, ok):
    print(f"[{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        raise SystemExit(1)


# 1. The op: streaming, memory-efficient backend by default on CPU.
out = parallax_attn(q, r, k, v, causal=True)
out.sum().backward()
check(f"parallax_attn output {tuple(out.shape)}, gradients for q, r, k, v",
      all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, r, k, v)))

# 2. It agrees with the direct formula computed in float64.
q64, r64, k64, v64 = (x.detach().double() for x in (q, r, k, v))
exact = parallax_attn(q64, r64, k64, v64, causal=True, backend="reference")
rel = ((out.double() - exact).norm() / exact.norm()).item()
check(f"streaming float32 vs float64 reference: relative error {rel:.1e}", rel < 1e-5)

# 3. With a zero probe it is exactly softmax attention.
sm = parallax_attn(q64, torch.zeros_like(r64), k64, v64, causal=True)
sdpa = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2),
                                      is_causal=True, enable_gqa=True).transpose(1, 2)
check(f"r = 0 equals torch SDPA: max difference {(sm - sdpa).abs().max().item():.1e}",
      (sm - sdpa).abs().max().item() < 1e-12)

# 4. The output is the softmax output minus the covariance correction; weights sum to one.
base, correction = parallax_decompose(q64[:, :32], r64[:, :32], k64[:, :32], v64[:, :32], causal=True)
w = parallax_weights(q64[:, :32], r64[:, :32], k64[:, :32], causal=True)
# (causal: the first 32 queries see only the first 32 keys, so the full run's rows match)
check("output = softmax output - Cov_p(v, k) r", torch.allclose(base - correction, exact[:, :32], atol=1e-12))
check(f"weights sum to one (max deviation {(w.sum(-1) - 1).abs().max().item():.1e}); "
      f"{100 * (w < 0).double().mean().item():.1f}% of them are negative",
      (w.sum(-1) - 1).abs().max().item() < 1e-12)

# 5. Packed variable-length sequences equal separate calls.
lens = [120, 37, 143]
cu = torch.tensor([0, 120, 157, 300], dtype=torch.int32)
packed = parallax_attn_varlen(q64[0], r64[0], k64[0], v64[0], cu, cu, max(lens), max(lens), causal=True)
separate = torch.cat([parallax_attn(q64[:1, a:b], r64[:1, a:b], k64[:1, a:b], v64[:1, a:b], causal=True)[0]
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
check("varlen equals per-sequence calls", torch.allclose(packed, separate, atol=1e-12))

# 6. A sliding window (FlashAttention convention: 64 keys back, none ahead).
win = parallax_attn(q, r, k, v, causal=True, window_size=(64, 0))
check(f"sliding-window output {tuple(win.shape)} is finite", torch.isfinite(win).all().item())
print("all checks passed")
