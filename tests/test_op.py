"""The core op against independent float64 math, identities and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from parallax_attention import parallax_attn, parallax_attn_varlen
from parallax_attention.ops import reference as ref
from parallax_attention.ops.torch_backend import parallax_attn_torch

F64 = torch.float64


def naive(q, r, k, v, causal=False, scale=None, window=(-1, -1)):
    """Row-by-row Parallax written from the definition, sharing no code with the package."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    left, right = window
    rows = []
    for bi in range(b):
        heads = []
        for h in range(hq):
            kv = h // (hq // hkv)
            outs = []
            for i in range(lq):
                c = i + lk - lq
                js = [j for j in range(lk)
                      if (not causal or j <= c) and (left < 0 or j >= c - left) and (right < 0 or j <= c + right)]
                if not js:
                    outs.append(q[bi, i, h] * 0)
                    continue
                kk, vv = k[bi, js, kv], v[bi, js, kv]
                p = torch.softmax(scale * (kk @ q[bi, i, h]), dim=0)
                t = kk @ r[bi, i, h]
                tbar = (p * t).sum()
                outs.append(((p * (1 + tbar - t))[:, None] * vv).sum(0))
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads, dim=1))
    return torch.stack(rows)


def make(b, lq, lk, hq, hkv, d, dtype=F64, r_scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, hq, d, generator=g, dtype=dtype)
    r = r_scale * torch.randn(b, lq, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, lk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, lk, hkv, d, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, r, k, v)]


def out_and_grads(fn, inputs, seed=1):
    out = fn(*inputs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)
    return (out,) + grads


CASES = [
    # b, lq, lk, hq, hkv, d, causal, window, scale
    (2, 9, 9, 2, 2, 8, False, (-1, -1), None),
    (2, 9, 9, 2, 2, 8, True, (-1, -1), None),
    (1, 7, 11, 4, 2, 8, True, (-1, -1), None),       # GQA, Lq < Lk (bottom-right causal)
    (1, 11, 6, 4, 1, 8, True, (-1, -1), None),       # MQA, Lq > Lk: leading rows see nothing
    (1, 10, 13, 3, 3, 4, False, (3, -1), None),      # one-sided window, non-causal
    (1, 12, 12, 2, 1, 4, True, (4, -1), None),       # sliding window + causal
    (1, 10, 12, 2, 2, 4, False, (2, 3), 0.37),       # two-sided window, explicit scale
    (1, 9, 9, 2, 2, 4, False, (-1, 1), None),        # right-only window
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_naive_float64(backend, case):
    b, lq, lk, hq, hkv, d, causal, window, scale = case
    inputs = make(b, lq, lk, hq, hkv, d)
    expect = out_and_grads(lambda *x: naive(*x, causal=causal, scale=scale, window=window), inputs)
    got = out_and_grads(lambda *x: parallax_attn(*x, causal=causal, softmax_scale=scale, window_size=window,
                                                 backend=backend), inputs)
    for name, e, g_ in zip(("out", "dq", "dr", "dk", "dv"), expect, got):
        torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES[1:], ids=[f"case{i}" for i in range(1, len(CASES))])
def test_torch_backend_small_tiles_float64(case):
    """Tiles smaller than the sequence, not dividing it: exercises skipping and boundary masks."""
    b, lq, lk, hq, hkv, d, causal, window, scale = case
    inputs = make(b, lq, lk, hq, hkv, d, seed=3)
    sc = scale or 1 / math.sqrt(d)
    expect = out_and_grads(lambda *x: naive(*x, causal=causal, scale=scale, window=window), inputs)
    got = out_and_grads(lambda *x: parallax_attn_torch(*x, causal, sc, window, block_q=4, block_k=3), inputs)
    for name, e, g_ in zip(("out", "dq", "dr", "dk", "dv"), expect, got):
        torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_varlen_equals_loop(backend):
    lens_q = [5, 0, 9, 3]
    lens_k = [7, 4, 9, 3]
    hq, hkv, d = 4, 2, 8
    inputs = make(1, sum(lens_q), sum(lens_k), hq, hkv, d, seed=5)
    packed = [x[0] for x in inputs]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    for causal, window in [(True, (-1, -1)), (False, (2, 1))]:
        out = parallax_attn_varlen(*packed, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                   window_size=window, backend=backend)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, packed, dout)
        pieces, dpieces = [], []
        for bi in range(len(lens_q)):
            q0, q1 = int(cu_q[bi]), int(cu_q[bi + 1])
            k0, k1 = int(cu_k[bi]), int(cu_k[bi + 1])
            if q1 == q0:
                continue
            sub = [packed[0][q0:q1], packed[1][q0:q1], packed[2][k0:k1], packed[3][k0:k1]]
            pieces.append(naive(*[x[None] for x in sub], causal=causal, window=window)[0])
            dpieces.append(dout[q0:q1])
        expect = torch.cat(pieces)
        egrads = torch.autograd.grad(expect, packed, torch.cat(dpieces))
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
        for e, g_ in zip(egrads, grads):
            torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_zero_probe_is_softmax_attention(backend, causal, heads):
    hq, hkv = heads
    q, r, k, v = [x.detach() for x in make(2, 13, 13, hq, hkv, 16)]
    out = parallax_attn(q, torch.zeros_like(r), k, v, causal=causal, backend=backend)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=hq != hkv).transpose(1, 2)
    assert (out - sdpa).abs().max().item() <= 1e-12


def test_weights_sum_to_one_and_can_be_negative():
    q, r, k, _ = [x.detach() for x in make(1, 16, 16, 2, 2, 8, r_scale=2.0)]
    w = ref.parallax_weights(q, r, k, causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 16, dtype=F64), rtol=0, atol=1e-12)
    assert (w < 0).any() and (w > 1).any()  # not a convex combination
    # Masked keys carry exactly zero weight.
    assert (w.triu(1) == 0).all()


def test_output_is_mean_minus_covariance_times_probe():
    q, r, k, v = [x.detach() for x in make(1, 6, 6, 1, 1, 5)]
    out = parallax_attn(q, r, k, v, causal=True, backend="torch")
    p = ref.softmax_weights(q, k, causal=True)[0, 0]
    for i in range(6):
        kk, vv = k[0, :, 0], v[0, :, 0]
        vbar, kbar = p[i] @ vv, p[i] @ kk
        cov = ((vv - vbar).T * p[i]) @ (kk - kbar)            # Cov_p(v, k), (D, D)
        torch.testing.assert_close(out[0, i, 0], vbar - cov @ r[0, i, 0], rtol=1e-12, atol=1e-12)
    base, corr = ref.parallax_decompose(q, r, k, v, causal=True)
    torch.testing.assert_close(base - corr, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base, ref.softmax_attn(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def test_lla_is_intercept_of_weighted_ridge_regression():
    q, _, k, v = [x.detach() for x in make(1, 5, 8, 2, 1, 3)]
    lam = 0.7
    out = ref.lla_attn(q, k, v, ridge=lam, causal=False)
    p = ref.softmax_weights(q, k)
    for h in range(2):
        for i in range(5):
            x = k[0, :, 0] - q[0, i, h]                              # (Lk, D)
            design = torch.cat([torch.ones(8, 1, dtype=F64), x], dim=1)
            wsq = p[0, h, i].sqrt()[:, None]
            # Ridge on the slope only: augment with sqrt(lam) rows that leave the intercept free.
            aug_x = torch.cat([design * wsq, torch.cat([torch.zeros(3, 1, dtype=F64),
                                                        math.sqrt(lam) * torch.eye(3, dtype=F64)], 1)])
            aug_y = torch.cat([v[0, :, 0] * wsq, torch.zeros(3, 3, dtype=F64)])
            coef = torch.linalg.lstsq(aug_x, aug_y).solution
            torch.testing.assert_close(out[0, i, h], coef[0], rtol=1e-9, atol=1e-9)


def test_lla_tends_to_softmax_as_ridge_grows():
    q, _, k, v = [x.detach() for x in make(1, 7, 7, 2, 2, 4)]
    sm = ref.softmax_attn(q, k, v, causal=True)
    errs = [(ref.lla_attn(q, k, v, ridge=lam, causal=True) - sm).abs().max().item() for lam in (1.0, 1e3, 1e6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_affine_linear_attention_is_uniform_parallax():
    q, r, k, v = [x.detach() for x in make(1, 6, 6, 2, 1, 4)]
    out = ref.affine_linear_attn(q, r, k, v, causal=True)
    for h in range(2):
        for i in range(6):
            kk, vv = k[0, : i + 1, 0], v[0, : i + 1, 0]
            t = kk @ r[0, i, h]
            expect = ((1 + t.mean() - t)[:, None] * vv).mean(0)
            torch.testing.assert_close(out[0, i, h], expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck(backend):
    inputs = make(1, 5, 6, 2, 1, 3, seed=7)
    for causal, window in [(True, (-1, -1)), (False, (1, 2))]:
        assert torch.autograd.gradcheck(
            lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend=backend), inputs)


def test_torch_backend_matches_reference_float32_unaligned():
    """Default tiles (128) with lengths that are not multiples of them."""
    inputs = make(1, 300, 333, 4, 2, 32, dtype=torch.float32, seed=11)
    for causal, window in [(True, (-1, -1)), (False, (-1, -1)), (True, (150, -1))]:
        e = out_and_grads(lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="reference"), inputs)
        g = out_and_grads(lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="torch"), inputs)
        for name, a, b_ in zip(("out", "dq", "dr", "dk", "dv"), e, g):
            rel = ((a - b_).norm() / a.norm()).item()
            assert rel <= 2e-5, (name, causal, window, rel)


def test_torch_backend_keeps_no_score_matrix():
    lq = lk = 512
    inputs = make(1, lq, lk, 2, 2, 16, dtype=torch.float32)
    biggest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: biggest.append(t.numel()) or t, lambda t: t):
        out = parallax_attn(*inputs, causal=True, backend="torch")
    assert max(biggest) < lq * lk
    out.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rows_without_keys_are_zero_with_zero_grads(backend):
    # Lq > Lk with causal: query i sees keys j <= i - 4, so the first 4 rows see nothing;
    # a window (0, 0) beyond the keys empties rows too.
    q, r, k, v = make(1, 10, 6, 2, 1, 4)
    out = parallax_attn(q, r, k, v, causal=True, backend=backend)
    assert torch.isfinite(out).all() and (out[:, :4] == 0).all() and (out[:, 4:] != 0).any()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(q.grad).all() and (q.grad[:, :4] == 0).all() and (r.grad[:, :4] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_scores_and_probes_stay_finite(backend, dtype):
    q, r, k, v = [x.detach() for x in make(1, 20, 20, 2, 2, 16, dtype=dtype)]
    q = q / q.norm(dim=-1, keepdim=True) * 400.0
    k = k / k.norm(dim=-1, keepdim=True) * 100.0     # |scale q.k| up to 1e4
    r = r / r.norm(dim=-1, keepdim=True) * 1e3
    inputs = [x.requires_grad_() for x in (q, r, k, v)]
    out = parallax_attn(*inputs, causal=True, backend=backend)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    expect = naive(*(x.detach().double() for x in inputs), causal=True)
    rel = ((out.double() - expect).norm() / expect.norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    inputs = make(1, 40, 40, 4, 2, 32, dtype=torch.float32, r_scale=0.1)
    low = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = parallax_attn(*low, causal=True)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(x.grad.dtype == dtype for x in low)
    expect = naive(*(x.detach().double() for x in low), causal=True)
    rel = ((out.double() - expect).norm() / expect.norm()).item()
    assert rel < {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]


# ---------------------------------------------------------------- bad input

def _good():
    return [x.detach() for x in make(1, 4, 4, 4, 2, 8, dtype=torch.float32)]


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "q: expected a 4-D"),
    (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, "r: expected the shape of q"),
    (lambda a: a.__setitem__(3, a[3][:, :3]), ValueError, "v: expected the shape of k"),
    (lambda a: a.__setitem__(2, torch.randn(1, 4, 2, 4)), ValueError, "v: expected the shape of k"),
    (lambda a: (a.__setitem__(2, torch.randn(1, 4, 2, 4)), a.__setitem__(3, torch.randn(1, 4, 2, 4))),
     ValueError, "head_dim 8"),
    (lambda a: (a.__setitem__(2, torch.randn(1, 4, 3, 8)), a.__setitem__(3, torch.randn(1, 4, 3, 8))),
     ValueError, "divides the 4 query heads"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, "v: expected dtype torch.float32"),
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "q: expected dtype float64"),
    (lambda a: a.__setitem__(1, a[1].to("meta")), ValueError, "r: expected device cpu"),
    (lambda a: a.__setitem__(0, a[0].numpy()), TypeError, "q: expected a torch.Tensor"),
    (lambda a: (a.__setitem__(2, torch.randn(2, 4, 2, 8)), a.__setitem__(3, torch.randn(2, 4, 2, 8))),
     ValueError, "k: expected batch size 1"),
])
def test_bad_tensors(mutate, exc, words):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=words):
        parallax_attn(*args)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale="1"), TypeError, "softmax_scale"),
    (dict(window_size=(-2, 0)), ValueError, "window_size: expected left >= -1"),
    (dict(window_size=(0, -5)), ValueError, "window_size: expected right >= -1"),
    (dict(window_size=(1.5, 0)), TypeError, "window_size"),
    (dict(window_size=3), TypeError, "window_size"),
    (dict(backend="cuda"), ValueError, "backend: expected one of 'auto', 'reference', 'torch', 'triton'"),
])
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        parallax_attn(*_good(), **kwargs)


def test_bad_cu_seqlens():
    q, r, k, v = [x[0] for x in _good()]
    good = torch.tensor([0, 2, 4], dtype=torch.int32)
    cases = [
        (good.long(), TypeError, "cu_seqlens_q: expected dtype torch.int32"),
        (torch.tensor([0, 3, 2, 4], dtype=torch.int32), ValueError, "cu_seqlens_q: expected non-decreasing"),
        (torch.tensor([0, 2, 5], dtype=torch.int32), ValueError, "cu_seqlens_q: expected the last value"),
        (torch.tensor([1, 2, 4], dtype=torch.int32), ValueError, "cu_seqlens_q: expected the first value"),
        (torch.tensor([4], dtype=torch.int32), ValueError, "cu_seqlens_q: expected a 1-D tensor"),
    ]
    for cu, exc, words in cases:
        with pytest.raises(exc, match=words):
            parallax_attn_varlen(q, r, k, v, cu, good, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected length batch\\+1 = 3"):
        parallax_attn_varlen(q, r, k, v, good, torch.tensor([0, 4], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest sequence"):
        parallax_attn_varlen(q, r, k, v, good, good, 1, 4)
    with pytest.raises(ValueError, match="q: expected a 3-D"):
        parallax_attn_varlen(q[None], r, k, v, good, good, 2, 2)


def test_empty_inputs():
    q, r, k, v = make(1, 3, 0, 2, 2, 4)
    out = parallax_attn(q, r, k, v)
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_cu_seqlens_form_checks_without_reading_values():
    """The CUDA-graph-capture path: dtype/shape/device are still checked, values are not read."""
    from parallax_attention.ops._validation import check_cu_seqlens
    bad_values = torch.tensor([0, 5, 2], dtype=torch.int32)
    assert check_cu_seqlens("cu_seqlens_q", bad_values, 4, bad_values.device, check_values=False) is None
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens("cu_seqlens_q", bad_values, 2, bad_values.device)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype torch.int32"):
        check_cu_seqlens("cu_seqlens_q", bad_values.long(), 4, bad_values.device, check_values=False)
