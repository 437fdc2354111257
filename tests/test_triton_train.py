"""Triton training kernels (forward and backward) against the float64 reference.

On machines without CUDA these run under TRITON_INTERPRET=1 (set in conftest), in
fp32 and fp16 only: the interpreter's bf16 dot is unreliable. Shapes are small but
span several tiles in both directions, so tile-range arithmetic, boundary masks and
the unmasked interior path are all exercised (interpreter tiles are 16/32 wide).
"""

from __future__ import annotations

import pytest
import torch

from parallax_attention.ops import parallax_attn, parallax_attn_varlen
from parallax_attention.ops.reference import parallax_attn_reference

triton = pytest.importorskip("triton")
from parallax_attention.ops.triton import train as train_mod  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _make(b, lq, lk, hq, hkv, d, dtype, r_scale=None, gen=None):
    r_scale = d ** -0.5 if r_scale is None else r_scale
    q = torch.randn(b, lq, hq, d, generator=gen)
    r = torch.randn(b, lq, hq, d, generator=gen) * r_scale
    k = torch.randn(b, lk, hkv, d, generator=gen)
    v = torch.randn(b, lk, hkv, d, generator=gen)
    do = torch.randn(b, lq, hq, d, generator=gen)
    return [x.to(device=DEV, dtype=dtype) for x in (q, r, k, v, do)]


def _fwd_bwd(fn, xs, do):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o = fn(*xs)
    grads = torch.autograd.grad(o, xs, do)
    return [o, *grads]


def _compare(ours, ref, tol):
    names = ("o", "dq", "dr", "dk", "dv")
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        if b.double().norm() < 1e-9 * b.numel() ** 0.5:
            # analytically zero (e.g. dq, dr when each row sees exactly one key): absolute check
            assert a.double().abs().max() < 50 * tol, name
            continue
        err = _rel(a, b)
        assert err <= tol, f"{name}: norm-relative error {err:.2e} > {tol:.0e}"


CASES = [
    # (B, Lq, Lk, Hq, Hkv, D, causal, window)
    (2, 45, 45, 2, 2, 32, True, (-1, -1)),
    (1, 50, 50, 2, 2, 64, False, (-1, -1)),
    (2, 33, 70, 4, 2, 32, True, (-1, -1)),      # Lq < Lk, GQA
    (1, 70, 33, 3, 1, 32, True, (-1, -1)),      # Lq > Lk (empty leading rows), MQA
    (1, 61, 47, 2, 2, 32, False, (-1, -1)),     # Lq > Lk non-causal
    (1, 64, 64, 2, 1, 32, True, (9, -1)),       # sliding window not aligned to tiles
    (1, 57, 66, 4, 2, 32, False, (13, 5)),      # two-sided window, Lq != Lk
    (1, 50, 50, 2, 2, 32, False, (0, 0)),       # each row sees one key
    (1, 48, 48, 2, 2, 32, True, (21, 7)),       # causal clamps right to 0
    (1, 40, 40, 2, 2, 96, True, (-1, -1)),      # head dim padded to 128
    (1, 37, 41, 2, 2, 24, False, (3, -1)),      # head dim padded to 32
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Lq{}_Lk{}_H{}-{}_D{}_c{}_w{}-{}".format(*c[:7], *c[7]))
def test_matches_reference(case, dtype):
    b, lq, lk, hq, hkv, d, causal, window = case
    gen = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    q, r, k, v, do = _make(b, lq, lk, hq, hkv, d, dtype, gen=gen)
    ours = _fwd_bwd(lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="triton"),
                    (q, r, k, v), do)
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                   [x.double() for x in (q, r, k, v)], do.double())
    _compare(ours, ref, TOL[dtype])
    for a, x in zip(ours, (q, q, r, k, v)):
        assert a.dtype == dtype and a.shape == x.shape


def test_other_tile_shapes(monkeypatch):
    # The range arithmetic must not depend on BLOCK_M == BLOCK_N or on which is larger.
    monkeypatch.setitem(train_mod.INTERPRET_BLOCKS, "fwd", (16, 32))
    monkeypatch.setitem(train_mod.INTERPRET_BLOCKS, "dq", (32, 16))
    monkeypatch.setitem(train_mod.INTERPRET_BLOCKS, "dkv", (32, 16))
    gen = torch.Generator().manual_seed(11)
    for causal, window in ((True, (11, -1)), (False, (6, 17))):
        q, r, k, v, do = _make(1, 53, 67, 2, 1, 32, torch.float32, gen=gen)
        ours = _fwd_bwd(lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="triton"),
                        (q, r, k, v), do)
        ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                       [x.double() for x in (q, r, k, v)], do.double())
        _compare(ours, ref, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (7, 3))])
def test_varlen_matches_reference(dtype, causal, window):
    gen = torch.Generator().manual_seed(5)
    lens_q = [17, 1, 0, 40, 23]
    lens_k = [17, 30, 4, 40, 9]      # per-sequence Lq != Lk, an empty query sequence, Lq > Lk
    hq, hkv, d = 4, 2, 32
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q, r, _, _, do = (x[0] for x in _make(1, sum(lens_q), 1, hq, hkv, d, dtype, gen=gen))
    _, _, k, v, _ = (x[0] for x in _make(1, 1, sum(lens_k), hq, hkv, d, dtype, gen=gen))

    ours = _fwd_bwd(lambda *x: parallax_attn_varlen(*x, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                    window_size=window, backend="triton"),
                    (q, r, k, v), do)

    def ref_fn(q, r, k, v):
        outs = []
        for i in range(len(lens_q)):
            sq = slice(int(cu_q[i]), int(cu_q[i + 1]))
            sk = slice(int(cu_k[i]), int(cu_k[i + 1]))
            if lens_q[i] == 0:
                continue
            outs.append(parallax_attn_reference(q[None, sq], r[None, sq], k[None, sk], v[None, sk],
                                                causal=causal, window_size=window)[0])
        return torch.cat(outs)

    ref = _fwd_bwd(ref_fn, [x.double() for x in (q, r, k, v)], do.double())
    _compare(ours, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rows_without_keys_give_zeros_and_zero_grads(dtype):
    # Lq > Lk under bottom-right causal: the first Lq - Lk queries see no key.
    gen = torch.Generator().manual_seed(3)
    q, r, k, v, do = _make(2, 40, 25, 2, 2, 32, dtype, gen=gen)
    out, dq, dr, dk, dv = _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, backend="triton"), (q, r, k, v), do)
    for t in (out, dq, dr):
        assert torch.isfinite(t).all()
        assert torch.count_nonzero(t[:, :15]) == 0
        assert torch.count_nonzero(t[:, 15:]) > 0
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()

    # keys past Lk must not leak: a causal problem cut to its first 25 keys leaves rows 0..4 empty and
    # must give the trailing keys exactly zero gradient
    q, r, k, v, do = _make(1, 30, 30, 2, 2, 32, dtype, gen=gen)
    out, dq, dr, dk, dv = _fwd_bwd(
        lambda q, r, k, v: parallax_attn(q, r, k[:, :25], v[:, :25], causal=True, backend="triton"), (q, r, k, v), do)
    assert torch.count_nonzero(out[:, :5]) == 0 and torch.count_nonzero(dq[:, :5]) == 0
    assert torch.count_nonzero(dk[:, 25:]) == 0 and torch.count_nonzero(dv[:, 25:]) == 0
    assert torch.count_nonzero(dk[:, :25]) > 0


def test_large_probe_and_scores_stay_accurate():
    # |t| ~ 50 and peaked softmax: the two-branch combination must not blow up or cancel badly.
    gen = torch.Generator().manual_seed(9)
    q, r, k, v, do = _make(1, 48, 48, 2, 2, 32, torch.float32, r_scale=8.0, gen=gen)
    q = q * 4
    ours = _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, backend="triton"), (q, r, k, v), do)
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=True), [x.double() for x in (q, r, k, v)],
                   do.double())
    _compare(ours, ref, 1e-4)


def test_zero_probe_is_softmax_attention():
    gen = torch.Generator().manual_seed(4)
    q, r, k, v, do = _make(1, 40, 40, 2, 2, 32, torch.float32, gen=gen)
    out = parallax_attn(q, torch.zeros_like(r), k, v, causal=True, backend="triton")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2)
    assert _rel(out, sdpa) < 1e-5


@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[6], CASES[9], CASES[10]],
                         ids=["mqa_lq_gt_lk", "window_unaligned", "two_sided", "d96", "d24"])
def test_tma_and_pointer_loads_agree(case, monkeypatch):
    # Dense 2-byte inputs stream their tiles through tensor descriptors (zero-filled past the end);
    # the pointer path (varlen, fp32, unaligned strides) must give the same bits.
    b, lq, lk, hq, hkv, d, causal, window = case
    gen = torch.Generator().manual_seed(44)
    q, r, k, v, do = _make(b, lq, lk, hq, hkv, d, torch.float16, gen=gen)
    assert train_mod._use_tma(dict(VARLEN=False), [q, r, k, v])
    monkeypatch.setattr(train_mod, "TMA_KERNELS", frozenset({"fwd", "dq", "dkv"}))
    f = lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="triton")  # noqa: E731
    with_tma = _fwd_bwd(f, (q, r, k, v), do)
    monkeypatch.setattr(train_mod, "USE_TMA", False)
    with_pointers = _fwd_bwd(f, (q, r, k, v), do)
    for a, b_ in zip(with_tma, with_pointers):
        assert torch.equal(a, b_)
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                   [x.double() for x in (q, r, k, v)], do.double())
    _compare(with_tma, ref, TOL[torch.float16])


def test_tma_needs_aligned_strides():
    x = torch.zeros(1, 8, 2, 24, dtype=torch.float16)
    assert train_mod._use_tma(dict(VARLEN=False), [x])
    assert not train_mod._use_tma(dict(VARLEN=True), [x])
    assert not train_mod._use_tma(dict(VARLEN=False), [x.float()])
    # a head dim of 20 halves: rows 40 bytes apart, not a multiple of 16
    assert not train_mod._use_tma(dict(VARLEN=False), [torch.zeros(1, 8, 2, 20, dtype=torch.float16)])


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(6)
    q, r, k, v, do = _make(1, 45, 45, 4, 1, 32, torch.float32, gen=gen)
    f = lambda *x: parallax_attn(*x, causal=True, window_size=(10, -1), backend="triton")  # noqa: E731
    g1 = _fwd_bwd(f, (q, r, k, v), do)
    g2 = _fwd_bwd(f, (q, r, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_float64_routes_to_torch_backend():
    gen = torch.Generator().manual_seed(8)
    q, r, k, v, do = _make(1, 20, 20, 2, 2, 16, torch.float64, gen=gen)
    out = parallax_attn(q, r, k, v, causal=True, backend="triton")
    ref = parallax_attn_reference(q, r, k, v, causal=True)
    assert out.dtype == torch.float64 and _rel(out, ref) < 1e-12


def test_custom_op_registration_opcheck():
    gen = torch.Generator().manual_seed(12)
    q, r, k, v, _ = _make(1, 20, 24, 2, 1, 16, torch.float32, gen=gen)
    args = [x.requires_grad_() for x in (q, r, k, v)] + [None, None, 20, 24, True, 0.25, 5, -1]
    torch.library.opcheck(torch.ops.parallax_attention.fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_custom_op_path_equals_eager_path():
    # Eager calls use an autograd.Function, compiled graphs the custom ops: same kernels, same bits.
    gen = torch.Generator().manual_seed(15)
    q, r, k, v, do = _make(2, 30, 37, 4, 2, 32, torch.float32, gen=gen)
    eager = _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, window_size=(9, 2), backend="triton"),
                     (q, r, k, v), do)
    via_op = _fwd_bwd(lambda *x: torch.ops.parallax_attention.fwd(*x, None, None, 30, 37, True, 32 ** -0.5, 9, 2)[0],
                      (q, r, k, v), do)
    for a, b in zip(via_op, eager):
        assert torch.equal(a, b)


def test_compile_fullgraph_forward_backward():
    gen = torch.Generator().manual_seed(13)
    q, r, k, v, do = _make(1, 40, 40, 4, 2, 32, torch.float32, gen=gen)

    def f(q, r, k, v):
        return parallax_attn(q, r, k, v, causal=True, window_size=(12, -1), backend="triton")

    eager = _fwd_bwd(f, (q, r, k, v), do)
    compiled = _fwd_bwd(torch.compile(f, fullgraph=True, backend="aot_eager"), (q, r, k, v), do)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_broadcast_output_gradient():
    # loss.sum() hands the backward an expanded (stride-0) gradient
    gen = torch.Generator().manual_seed(14)
    q, r, k, v, _ = _make(1, 33, 33, 2, 2, 32, torch.float32, gen=gen)
    xs = [x.clone().requires_grad_() for x in (q, r, k, v)]
    parallax_attn(*xs, causal=True, backend="triton").sum().backward()
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=True), [x.double() for x in (q, r, k, v)],
                   torch.ones(q.shape, dtype=torch.float64))
    _compare([ref[0].float()] + [x.grad for x in xs], ref, TOL[torch.float32])


@pytest.mark.parametrize("mode", ["atomic", "fused", "fused_atomic"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6]], ids=["gqa", "mqa_lq_gt_lk", "window"])
def test_opt_in_backwards(case, mode, monkeypatch):
    # PARALLAX_TRAIN_BWD=atomic: one fused Triton backward kernel, dq/dr accumulated with atomics; the
    # fused Gluon backward needs Hopper, elsewhere (here: the interpreter) the default one runs
    monkeypatch.setenv("PARALLAX_TRAIN_BWD", mode)
    b, lq, lk, hq, hkv, d, causal, window = case
    gen = torch.Generator().manual_seed(21)
    q, r, k, v, do = _make(b, lq, lk, hq, hkv, d, torch.float32, gen=gen)
    ours = _fwd_bwd(lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="triton"),
                    (q, r, k, v), do)
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                   [x.double() for x in (q, r, k, v)], do.double())
    _compare(ours, ref, TOL[torch.float32])


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_sums_written_out_in_the_layout_of_q(varlen, dtype):
    # the fused backward sums dq^T, dr^T in fp32 as (heads x D, queries, padded to 4); the write-out
    # kernel must give dq[t, h, :] = acc[0, h D : (h + 1) D, t] (and dr from acc[1]) in q's dtype
    gen = torch.Generator().manual_seed(24)
    hq, d = 3, 32
    shape = (83, hq, d) if varlen else (2, 41, hq, d)
    rows = 83 if varlen else 82
    acc = torch.randn(2, hq * d, 84, generator=gen).to(DEV)
    acc[:, :, rows:] = float("nan")  # padding columns are never read
    dq = torch.empty(shape, device=DEV, dtype=dtype)
    dr = torch.empty(shape, device=DEV, dtype=dtype)
    train_mod.fused_acc_out(acc, dq, dr)
    want = acc[:, :, :rows].reshape(2, hq, d, rows).permute(0, 3, 1, 2).to(dtype)
    assert torch.equal(dq.reshape(rows, hq, d), want[0])
    assert torch.equal(dr.reshape(rows, hq, d), want[1])


def test_backward_mode_is_validated(monkeypatch):
    monkeypatch.setenv("PARALLAX_TRAIN_BWD", "fast")
    q, r, k, v, do = _make(1, 20, 20, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="PARALLAX_TRAIN_BWD"):
        _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, backend="triton"), (q, r, k, v), do)


@pytest.mark.parametrize("ws", [False, True], ids=["loop", "warp_specialized"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[6], CASES[8],
                                  (2, 64, 64, 4, 2, 16, True, (-1, -1))],
                         ids=["causal", "gqa_lq_lt_lk", "mqa_lq_gt_lk", "window_unaligned", "two_sided",
                              "causal_window", "d16_aligned_rows"])
def test_dkv_descriptor_kernel(case, ws, monkeypatch):
    # 2-byte dense inputs with a power-of-two head dim take the dk/dv kernel that reads through
    # device-made descriptors (rows past a sequence read from its neighbours and masked); it must
    # agree with the pointer kernel and the float64 reference, with and without warp specialization
    # (which only the rows-multiple-of-4 layouts get, through descriptor-read statistics).
    b, lq, lk, hq, hkv, d, causal, window = case
    gen = torch.Generator().manual_seed(45)
    q, r, k, v, do = _make(b, lq, lk, hq, hkv, d, torch.float16, gen=gen)
    calls = []
    real = train_mod._launch_dkv_tma
    monkeypatch.setattr(train_mod, "_launch_dkv_tma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(train_mod, "DKV_TMA_CONFIG", {k: c[:4] + (ws,) for k, c in train_mod.DKV_TMA_CONFIG.items()})
    f = lambda *x: parallax_attn(*x, causal=causal, window_size=window, backend="triton")  # noqa: E731
    ours = _fwd_bwd(f, (q, r, k, v), do)
    assert calls, "the descriptor kernel did not run"
    monkeypatch.setattr(train_mod, "DKV_TMA", False)
    pointers = _fwd_bwd(f, (q, r, k, v), do)
    assert len(calls) == 1
    ref = _fwd_bwd(lambda *x: parallax_attn_reference(*x, causal=causal, window_size=window),
                   [x.double() for x in (q, r, k, v)], do.double())
    _compare(ours, ref, TOL[torch.float16])
    for a, p in zip(ours[3:], pointers[3:]):
        assert _rel(a, p) < 1e-3


@pytest.mark.parametrize("hq, hkv, L, d, ws_config, ws", [(2, 2, 64, 128, False, False), (2, 2, 64, 128, True, True),
                                                          (2, 2, 45, 128, True, False), (4, 2, 64, 128, False, False),
                                                          (2, 2, 64, 64, False, False)],
                         ids=["mha", "mha_ws_config", "mha_ws_config_rows_not_multiple_of_4", "gqa", "mha_d64"])
def test_dkv_descriptor_warp_specialization_choice(hq, hkv, L, d, ws_config, ws, monkeypatch):
    # Warp specialization raced on the GPU (NaN in dk/dv), so no default launch asks for it; a
    # configuration that does gets it only where the row statistics can be read through
    # descriptors (lengths a multiple of 4), else the 8-warp loop runs
    assert not any(c[4] for c in train_mod.DKV_TMA_CONFIG.values())
    if ws_config:
        monkeypatch.setitem(train_mod.DKV_TMA_CONFIG, (128, "mha"), (32, 128, 4, 3, True))
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)
    monkeypatch.setattr(train_mod, "_bwd_dkv_tma_kernel", Recorder())
    q, r, k, v, do = _make(1, L, L, hq, hkv, d, torch.float16)
    _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, backend="triton"), (q, r, k, v), do)
    assert len(launches) == 1
    assert launches[0]["WS"] is ws
    assert launches[0]["STATS_TMA"] is (L % 4 == 0)


def test_dkv_descriptor_kernel_varlen(monkeypatch):
    gen = torch.Generator().manual_seed(46)
    lens_q, lens_k = [17, 0, 40, 23], [17, 4, 40, 9]
    hq, hkv, d = 4, 2, 32
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q, r, _, _, do = (x[0] for x in _make(1, sum(lens_q), 1, hq, hkv, d, torch.float16, gen=gen))
    _, _, k, v, _ = (x[0] for x in _make(1, 1, sum(lens_k), hq, hkv, d, torch.float16, gen=gen))
    calls = []
    real = train_mod._launch_dkv_tma
    monkeypatch.setattr(train_mod, "_launch_dkv_tma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    f = lambda *x: parallax_attn_varlen(*x, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,  # noqa: E731
                                        backend="triton")
    ours = _fwd_bwd(f, (q, r, k, v), do)
    assert calls
    monkeypatch.setattr(train_mod, "DKV_TMA", False)
    pointers = _fwd_bwd(f, (q, r, k, v), do)
    for a, p in zip(ours, pointers):
        assert torch.isfinite(a).all()
        assert _rel(a, p) < 1e-3


def _record_gluon_launches(monkeypatch, module, kernel, after=None):
    """Replace a Gluon module's kernel by a recorder of its launches (grid, args, kwargs) and take it
    wherever it has a configuration (the GPU gate would refuse this machine); after(args) runs on
    each recorded launch."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append((grid, args, kwargs))
                if after is not None:
                    after(args)
            return record
    monkeypatch.setattr(module, kernel, Recorder())
    monkeypatch.setattr(module, "usable", lambda q, k, d, tensors: d in module.CONFIG)
    monkeypatch.setattr(module, "ENABLED", True)
    # these shapes are far below the work from which dense inputs take descriptors made on the host
    monkeypatch.setattr(module._gluon, "HOST_DESC_MIN_WORK", 0)
    return launches


@pytest.mark.parametrize("hq, hkv, L, d, window", [(2, 2, 64, 128, (-1, -1)), (4, 2, 45, 128, (-1, -1)),
                                                   (2, 2, 64, 64, (16, -1)), (2, 2, 64, 96, (-1, -1))],
                         ids=["mha", "gqa_rows_not_multiple_of_4", "d64_window", "d96_not_taken"])
def test_dkv_gluon_launch(hq, hkv, L, d, window, monkeypatch):
    # On Hopper the warp-specialized Gluon kernel takes dk/dv (head dims 64 and 128); it cannot run
    # without the GPU, so its launch is recorded: one program per (sequence, kv head) x 128 keys,
    # the per-head-dim tiling, the statistics through TMA only where rows are 16-byte aligned, and
    # the register budget that fits the 12 warps in one SM's register file
    from parallax_attention.ops.triton import dkv_gluon
    if not dkv_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    launches = _record_gluon_launches(monkeypatch, dkv_gluon, "_dkv_ws_kernel")
    q, r, k, v, do = _make(2, L, L, hq, hkv, d, torch.float16)
    _fwd_bwd(lambda *x: parallax_attn(*x, causal=True, window_size=window, backend="triton"), (q, r, k, v), do)
    if d not in dkv_gluon.CONFIG:
        assert not launches
        return
    (grid, args, kw), = launches
    assert grid == (2 * hkv, -(-L // dkv_gluon.BLOCK_N))
    assert (kw["BLOCK_M"], kw["STAGES"], kw["IN_FLIGHT"], kw["A_REGS"]) == dkv_gluon.CONFIG[d]
    assert kw["G"] == hq // hkv and kw["D"] == d and kw["HAS_LEFT"] == (window[0] >= 0)
    assert kw["STATS_TMA"] is (L % 4 == 0)
    # dense inputs: the copy engine's descriptors are made on the host, over (batch, rows, heads x D) and
    # the statistics' (batch, heads, rows), so tiles past a sequence's end read zeros
    names = ("QD", "RD", "DOD", "KD", "VD", "LSED", "TBD", "DELTAD", "BETAD")
    if L % 4:
        assert not any(n in kw for n in names)
    else:
        descs = [kw[n] for n in names]
        bm = kw["BLOCK_M"]
        assert [list(x.shape) for x in descs] == [[2, L, hq * d]] * 3 + [[2, L, hkv * d]] * 2 + [[2, hq, L]] * 4
        assert [list(x.block_shape) for x in descs] == [[1, bm, d]] * 3 + [[1, 128, d]] * 2 + [[1, 1, bm]] * 4
        q_, r_, k_, v_, do_, *stats = args[:9]
        assert all(x.base is t for x, t in zip(descs, (q_, r_, do_, k_, v_, *stats)))
        # and with keys in whole 64-row tiles, dk, dv leave through the copy engine, 64 keys (one
        # consumer warpgroup's) by 64 columns (one swizzled chunk of the staging tile) a copy
        if d in (64, 128) and L % 64 == 0:
            assert [(x.base, list(x.shape), list(x.block_shape)) for x in (kw["DKD"], kw["DVD"])] == [
                (args[9], [2, L, hkv * d], [1, 64, 64]), (args[10], [2, L, hkv * d], [1, 64, 64])]
        else:
            assert "DKD" not in kw
    assert kw["num_warps"] == 4 and kw["maxnreg"] * 12 * 32 <= 65536


def test_host_descriptor_floor(monkeypatch):
    # below HOST_DESC_MIN_WORK (and for packed sequences, and with PARALLAX_HOST_DESC=0) the kernels make
    # their descriptors on the device: host ones cost the launch path more than they save there
    from parallax_attention.ops.triton import _gluon
    if not _gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    meta = {"VARLEN": False}
    floor = _gluon.HOST_DESC_MIN_WORK
    assert _gluon.use_host_desc(meta, 4, 16, 4096, 4096) is (4 * 16 * 4096 * 4096 >= floor)
    assert not _gluon.use_host_desc(meta, 1, 16, 4096, 4096)
    assert not _gluon.use_host_desc(meta, 4, 16, 1024, 1024)
    assert _gluon.use_host_desc(meta, 1, 16, 16384, 16384)
    assert not _gluon.use_host_desc({"VARLEN": True}, 1, 16, 16384, 16384)
    monkeypatch.setattr(_gluon, "HOST_DESC", False)
    assert not _gluon.use_host_desc(meta, 1, 16, 16384, 16384)


def test_dkv_gluon_gate():
    # CPU tensors, the interpreter (set for these tests where there is no GPU) and any GPU that is
    # not sm_90 (no warp-group MMA) take the Triton kernel
    from parallax_attention.ops.triton import dkv_gluon
    q = torch.zeros(1, 8, 2, 128, dtype=torch.float16)
    assert not dkv_gluon.usable(q, q, 128, (q,))


@pytest.mark.parametrize("hq, hkv, lq, lk, d, window", [(2, 2, 64, 64, 128, (-1, -1)), (4, 2, 200, 300, 128, (-1, -1)),
                                                        (2, 2, 130, 130, 64, (16, 0)), (2, 2, 128, 128, 64, (-1, -1)),
                                                        (2, 2, 64, 64, 96, (-1, -1))],
                         ids=["mha", "gqa_lq_lt_lk", "d64_window", "d64_whole_tiles", "d96_not_taken"])
def test_fwd_gluon_launch(hq, hkv, lq, lk, d, window, monkeypatch):
    # On Hopper the warp-specialized Gluon forward takes dense inputs of head dims 64 and 128; it
    # cannot run without the GPU, so its launch is recorded: one program per (sequence, query head)
    # x 128 query rows, the per-head-dim key tile, the mask bounds as the Triton kernel receives
    # them, and the register budget that fits the 12 warps in one SM's register file
    from parallax_attention.ops.triton import fwd_gluon
    if not fwd_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    launches = _record_gluon_launches(monkeypatch, fwd_gluon, "_fwd_ws_kernel")
    gen = torch.Generator().manual_seed(47)
    q, r, _, _, _ = _make(2, lq, lq, hq, hkv, d, torch.float16, gen=gen)
    _, _, k, v, _ = _make(2, lk, lk, hq, hkv, d, torch.float16, gen=gen)
    with torch.no_grad():
        parallax_attn(q, r, k, v, causal=True, window_size=window, backend="triton")
    if d not in fwd_gluon.CONFIG:
        assert not launches
        return
    (grid, args, kw), = launches
    assert grid == (2 * hq, -(-lq // fwd_gluon.BLOCK_M))
    lse = args[6]
    assert lse.shape == (2, hq, lq) and args[10:14] == (lse.stride(0), lse.stride(1), lq, lk)
    assert args[14] == pytest.approx(d ** -0.5 * train_mod.LOG2E)
    # causal folds into the right bound (0); a left window passes its width
    assert args[15:17] == (max(window[0], 0), 0) and kw["HAS_LEFT"] == (window[0] >= 0) and kw["HAS_RIGHT"]
    assert kw["VARLEN"] is False
    assert (kw["BLOCK_N"], kw["STAGES"]) == fwd_gluon.CONFIG[d]
    # fully masked trailing tiles are skipped unless PARALLAX_TRIM_MASKED=0
    assert kw["TRIM"] is fwd_gluon._gluon.TRIM_MASKED
    descs = [kw[n] for n in ("QD", "RD", "KD", "VD")]
    assert [list(x.shape) for x in descs] == [[2, lq, hq * d]] * 2 + [[2, lk, hkv * d]] * 2
    # rows in whole 64-row tiles: o and vbar leave through the copy engine, 64 rows (one consumer
    # warpgroup's) by 64 columns (one swizzled chunk of the staging tile) a copy
    if d in (64, 128) and lq % 64 == 0:
        assert [(x.base, list(x.shape), list(x.block_shape)) for x in (kw["OD"], kw["VBD"])] == [
            (args[4], [2, lq, hq * d], [1, 64, 64]), (args[5], [2, lq, hq * d], [1, 64, 64])]
    else:
        assert "OD" not in kw
    assert [list(x.block_shape) for x in descs] == [[1, 128, d]] * 2 + [[1, kw["BLOCK_N"], d]] * 2
    assert kw["HQ"] == hq and kw["HKV"] == hkv and kw["G"] == hq // hkv and kw["D"] == d
    assert kw["num_warps"] == 4 and kw["maxnreg"] * 12 * 32 <= 65536


def test_gluon_rings_hold_the_skipped_tiles():
    # a consumer warpgroup skips up to 64 fully masked rows of the other operand (keys in the forward
    # and dq/dr, queries in dk/dv); that is safe only while the ring's stages hold them all, or the
    # producer would wait for a release that never comes, or a stage would be released twice
    from parallax_attention.ops.triton import dkv_gluon, dq_gluon, fwd_gluon
    for mod in (fwd_gluon, dq_gluon):
        for d, (block_n, stages) in mod.CONFIG.items():
            assert stages * block_n >= 64, (mod.__name__, d)
    for d, (block_m, stages, *_flags) in dkv_gluon.CONFIG.items():
        assert stages * block_m >= 64, d


def test_fwd_gluon_gate():
    # CPU tensors, the interpreter, 4-byte dtypes, other head dims and any GPU that is not sm_90
    # take the Triton forward
    from parallax_attention.ops.triton import fwd_gluon
    q = torch.zeros(1, 8, 2, 128, dtype=torch.float16)
    assert not fwd_gluon.usable(q, q, 128, (q,))
    assert not fwd_gluon.usable(q.float(), q.float(), 128, (q.float(),))
    assert not fwd_gluon.usable(q[..., :96], q[..., :96], 96, (q[..., :96],))


def test_fwd_gluon_launch_varlen(monkeypatch):
    # packed sequences: one program per (sequence, query head) x 128 rows of the longest, with the
    # cumulative lengths passed for the kernel to find each sequence's rows
    from parallax_attention.ops.triton import fwd_gluon
    if not fwd_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    launches = _record_gluon_launches(monkeypatch, fwd_gluon, "_fwd_ws_kernel")
    lens = [100, 300, 7]
    cu = torch.tensor([0, 100, 400, 407], dtype=torch.int32, device=DEV)
    q, r, k, v, _ = (x[0] for x in _make(1, sum(lens), sum(lens), 4, 2, 64, torch.float16))
    with torch.no_grad():
        parallax_attn_varlen(q, r, k, v, cu, cu, 300, 300, causal=True, backend="triton")
    (grid, args, kw), = launches
    assert grid == (3 * 4, 3) and args[8] is cu and args[9] is cu and kw["VARLEN"] is True
    assert "QD" not in kw  # packed sequences: descriptors made on the device, per sequence
    assert args[10:14] == (0, sum(lens), 300, 300)


@pytest.mark.parametrize("varlen, L", [(False, 200), (True, 200), (False, 256)])
def test_dq_gluon_launch(varlen, L, monkeypatch):
    # On Hopper the warp-specialized Gluon kernel takes dq/dr; its launch is recorded: one program
    # per (sequence, query head) x 128 query rows, the per-head-dim key tile, the statistics and
    # output tensors in the Triton kernel's order, and the register budget of 12 warps
    from parallax_attention.ops.triton import dq_gluon
    if not dq_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    # delta, beta, dq, dr get defined values for the dk/dv kernel after it
    launches = _record_gluon_launches(monkeypatch, dq_gluon, "_dq_ws_kernel",
                                      after=lambda args: [out.zero_() for out in args[9:13]])
    hq, hkv, d = 4, 2, 64
    q, r, k, v, do = _make(2, L, L, hq, hkv, d, torch.float16)
    if varlen:
        cu = torch.tensor([0, L, 2 * L], dtype=torch.int32, device=DEV)
        q, r, k, v, do = (x.flatten(0, 1) for x in (q, r, k, v, do))
        f = lambda *x: parallax_attn_varlen(*x, cu, cu, L, L, causal=True, backend="triton")  # noqa: E731
    else:
        f = lambda *x: parallax_attn(*x, causal=True, backend="triton")  # noqa: E731
    _fwd_bwd(f, (q, r, k, v), do)
    (grid, args, kw), = launches
    assert grid == (2 * hq, -(-L // dq_gluon.BLOCK_M))
    lse, tbar, delta, beta = args[7:11]
    assert lse.shape == delta.shape == (hq, 2 * L) if varlen else lse.shape == (2, hq, L)
    assert args[11].shape == args[12].shape == q.shape and args[6] is not None
    assert args[15:19] == ((0, 2 * L) if varlen else (hq * L, L)) + (L, L)
    assert args[19] == pytest.approx(d ** -0.5) and args[20] == pytest.approx(d ** -0.5 * dq_gluon.LOG2E)
    assert kw["VARLEN"] is varlen and (kw["BLOCK_N"], kw["STAGES"]) == dq_gluon.CONFIG[d]
    if varlen:
        assert "QD" not in kw
    else:
        descs = [kw[n] for n in ("QD", "RD", "DOD", "KD", "VD")]
        assert [list(x.shape) for x in descs] == [[2, L, hq * d]] * 3 + [[2, L, hkv * d]] * 2
        assert [list(x.block_shape) for x in descs] == [[1, 128, d]] * 3 + [[1, kw["BLOCK_N"], d]] * 2
    if not varlen and L % 64 == 0:
        # whole 64-row tiles: dq, dr leave through the copy engine, 64 rows by 64 columns a copy
        assert [(x.base, list(x.block_shape)) for x in (kw["DQD"], kw["DRD"])] == [(args[11], [1, 64, 64]),
                                                                                (args[12], [1, 64, 64])]
    else:
        assert "DQD" not in kw and "DRD" not in kw
    assert kw["HQ"] == hq and kw["HKV"] == hkv and kw["G"] == hq // hkv and kw["D"] == d
    assert kw["num_warps"] == 4 and kw["maxnreg"] * 12 * 32 <= 65536


def test_dq_gluon_gate():
    from parallax_attention.ops.triton import dq_gluon
    q = torch.zeros(1, 8, 2, 128, dtype=torch.float16)
    assert not dq_gluon.usable(q, q, 128, (q,))
    assert not dq_gluon.usable(q.float(), q.float(), 128, (q.float(),))
    assert not dq_gluon.usable(q[..., :96], q[..., :96], 96, (q[..., :96],))


def test_gluon_fast_launch_cache(monkeypatch):
    # _gluon.launch compiles through JITFunction.run once per specialization (Triton's binder says
    # what that is) and then calls the compiled kernel's launcher itself with the bound arguments; a
    # call whose specialization or launch options differ must compile anew, never reuse
    from parallax_attention.ops.triton import _gluon
    compiles, runs = [], []

    class Compiled:
        function = "fn"
        packed_metadata = "meta"

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *a):
            runs.append(a)

    def binder(X, n, scale, BLOCK, **options):
        # as Triton's: a tensor by dtype and 16-byte alignment, an int by value 1 and divisibility
        # by 16, constexprs by value
        spec = [(str(X.dtype), X.data_ptr() % 16 == 0), ("i32", n == 1, n % 16 == 0), ("fp32",),
                ("constexpr", BLOCK)]
        return dict(X=X, n=n, scale=scale, BLOCK=BLOCK), spec, options

    class Kernel:
        device_caches = {None: (None, None, None, None, binder)}
        pre_run_hooks = []

        def __getitem__(self, grid):
            def compile_and_launch(*args, **kwargs):
                compiles.append((grid, args, kwargs))
                return Compiled()
            return compile_and_launch

    monkeypatch.setattr(_gluon, "FAST_LAUNCH", True)
    monkeypatch.setattr(_gluon, "_current_stream", lambda device: 7)
    kernel = Kernel()
    x = torch.zeros(64)
    _gluon.launch(kernel, (2, 3), x, 32, 0.5, BLOCK=16, num_warps=4)
    assert len(compiles) == 1 and not runs
    _gluon.launch(kernel, (5,), x, 48, 0.25, BLOCK=16, num_warps=4)  # same specialization: no compile
    assert len(compiles) == 1 and len(runs) == 1
    assert runs[0][:7] == (5, 1, 1, 7, "fn", "meta", None)
    params = runs[0][9:]
    assert params[0] is x and params[1:] == (48, 0.25, 16)
    for call in ((x, 33, 0.5), (x, 1, 0.5), (x[1:], 32, 0.5), (x.double(), 32, 0.5)):
        _gluon.launch(kernel, (1,), *call, BLOCK=16, num_warps=4)
    assert len(compiles) == 5, "each changed specialization compiles its own kernel"
    _gluon.launch(kernel, (1,), x, 32, 0.5, BLOCK=32, num_warps=4)  # another constexpr
    _gluon.launch(kernel, (1,), x, 32, 0.5, BLOCK=16, num_warps=8)  # another launch option
    assert len(compiles) == 7 and len(runs) == 1
    Kernel.pre_run_hooks = [lambda *a, **k: None]  # hooks: Triton's own path every time
    _gluon.launch(kernel, (1,), x, 48, 0.5, BLOCK=16, num_warps=4)
    Kernel.pre_run_hooks = []
    monkeypatch.setattr(_gluon, "FAST_LAUNCH", False)
    _gluon.launch(kernel, (1,), x, 48, 0.5, BLOCK=16, num_warps=4)
    assert len(compiles) == 9 and len(runs) == 1
