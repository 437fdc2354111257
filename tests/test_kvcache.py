"""parallax_attn_with_kvcache against float64 direct math on the gathered valid keys.

Both backends run here: "torch" natively and "triton" through the Triton
interpreter on CPU (float16/float32 only; the interpreter's bf16 dot is wrong).
"""

import pytest
import torch

from parallax_attention import parallax_attn_with_kvcache
from parallax_attention.ops.reference import parallax_attn_reference

F64 = torch.float64
BACKENDS = ["torch", "triton"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tol(dtype):
    return {torch.float16: 3e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]


def make_seq(b, cap, hkv, d, dtype, g):
    """Dense per-sequence keys/values (B, cap, Hkv, D)."""
    k = torch.randn(b, cap, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, cap, hkv, d, generator=g).to(dtype)
    return k, v


def poison(cache_k, cache_v, lens, value=float("nan")):
    """Fill every dense slot at or past each sequence's length."""
    for i, n in enumerate(lens):
        cache_k[i, n:] = value
        cache_v[i, n:] = value


def to_paged(k, v, page, g, spare=3):
    """Scatter dense (B, cap, Hkv, D) into shuffled pages; unused blocks hold NaN, unused table slots -1."""
    b, cap = k.shape[:2]
    nb = -(-cap // page)
    num_blocks = b * nb + spare
    perm = torch.randperm(num_blocks, generator=g)[: b * nb].view(b, nb)
    kp = torch.full((num_blocks, page) + k.shape[2:], float("nan"), dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    for i in range(b):
        for j in range(nb):
            rows = slice(j * page, min(cap, (j + 1) * page))
            kp[perm[i, j], : rows.stop - rows.start] = k[i, rows]
            vp[perm[i, j], : rows.stop - rows.start] = v[i, rows]
    return kp, vp, perm.to(torch.int32)


def expected(q, r, k, v, lens, causal=True, window=(-1, -1), scale=None):
    """Float64 reference per sequence on its first lens[b] keys."""
    outs = []
    for i, n in enumerate(lens):
        outs.append(parallax_attn_reference(q[i:i + 1].to(F64), r[i:i + 1].to(F64), k[i:i + 1, :n].to(F64),
                                            v[i:i + 1, :n].to(F64), causal=causal, window_size=window,
                                            softmax_scale=scale))
    return torch.cat(outs)


def inputs(b, lq, hq, hkv, d, cap, dtype, seed, r_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype)
    r = (r_scale * torch.randn(b, lq, hq, d, generator=g)).to(dtype)
    k, v = make_seq(b, cap, hkv, d, dtype, g)
    return q, r, k, v, g


LAYOUTS = ["dense", 16, 32]
HEADS = [(4, 4), (4, 2), (4, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"page{x}" if x != "dense" else x)
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lq", [1, 4])
def test_matches_reference(backend, layout, heads, lq):
    hq, hkv = heads
    b, d, cap = 3, 32, 80
    dtype = torch.float16
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, dtype, seed=hash((layout, heads, lq)) % 1000)
    lens = [5, 80, 47]                      # per-sequence lengths, one at full capacity
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if layout == "dense":
        out = parallax_attn_with_kvcache(q, r, k, v, cache_seqlens=seqlens, backend=backend)
    else:
        kp, vp, bt = to_paged(k, v, layout, g)
        out = parallax_attn_with_kvcache(q, r, kp, vp, cache_seqlens=seqlens, block_table=bt, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel(out, exp) < tol(dtype)


WINDOWS = [  # causal, window
    (True, (7, -1)),
    (True, (0, -1)),
    (False, (5, 2)),
    (False, (-1, 0)),
    (False, (-1, -1)),
    (True, (20, 3)),        # causal clamps the right side to 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 4])
@pytest.mark.parametrize("case", WINDOWS, ids=[f"w{i}" for i in range(len(WINDOWS))])
def test_windows(backend, lq, case):
    causal, window = case
    b, hq, hkv, d, cap = 2, 4, 2, 16, 70
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=11)
    lens = [9, 70]
    exp = expected(q, r, k, v, lens, causal=causal, window=window, scale=0.3)
    poison(k, v, lens)
    kp, vp, bt = to_paged(k, v, 16, g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for args in ((k, v, None), (kp, vp, bt)):
        out = parallax_attn_with_kvcache(q, r, args[0], args[1], cache_seqlens=seqlens, block_table=args[2],
                                         causal=causal, window_size=window, softmax_scale=0.3, backend=backend,
                                         num_splits=3)
        assert torch.isfinite(out).all()
        assert rel(out, exp) < tol(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero(backend):
    """Non-causal, a (0, 0) window and seqlen_q > keys: leading rows see nothing and return 0."""
    b, lq, hq, hkv, d, cap = 1, 4, 2, 2, 16, 16
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=5)
    out = parallax_attn_with_kvcache(q, r, k, v, cache_seqlens=2, causal=False, window_size=(0, 0),
                                     backend=backend)
    assert (out[:, :2] == 0).all()
    exp = expected(q, r, k, v, [2], causal=False, window=(0, 0))
    assert rel(out, exp) < tol(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["dense", 16])
@pytest.mark.parametrize("lnew", [1, 4])
def test_append_in_place(backend, layout, lnew):
    b, hq, hkv, d, cap = 3, 4, 2, 16, 64
    dtype = torch.float16
    q, r, k, v, g = inputs(b, lnew, hq, hkv, d, cap, dtype, seed=7)
    lens = [0, 30, cap - lnew]              # empty cache, middle, exactly full after the append
    knew = torch.randn(b, lnew, hkv, d, generator=g).to(dtype)
    vnew = torch.randn(b, lnew, hkv, d, generator=g).to(dtype)
    full_k, full_v = k.clone(), v.clone()
    for i, n in enumerate(lens):
        full_k[i, n:n + lnew] = knew[i]
        full_v[i, n:n + lnew] = vnew[i]
    total = [n + lnew for n in lens]
    exp = expected(q, r, full_k, full_v, total)
    poison(k, v, lens)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if layout == "dense":
        kc, vc, bt = k, v, None
    else:
        kc, vc, bt = to_paged(k, v, layout, g)
    before_k = kc.clone()
    out = parallax_attn_with_kvcache(q, r, kc, vc, knew, vnew, cache_seqlens=seqlens, block_table=bt,
                                     backend=backend, num_splits=3)
    assert rel(out, exp) < tol(dtype)
    # The cache now holds the new tokens at their positions, and nothing else changed.
    changed = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for i, n in enumerate(lens):
        for j in range(lnew):
            pos = n + j
            blk, off = (i, pos) if bt is None else (int(bt[i, pos // layout]), pos % layout)
            assert torch.equal(kc[blk, off], knew[i, j])
            assert torch.equal(vc[blk, off], vnew[i, j])
            changed[blk, off] = True
    same = torch.where(before_k.isnan(), torch.ones_like(before_k, dtype=torch.bool), before_k == kc)
    assert same[~changed].all()
    assert torch.equal(seqlens, torch.tensor(lens, dtype=torch.int32))  # lengths are the caller's to advance


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_and_none_seqlens(backend):
    b, lq, hq, hkv, d, cap = 2, 1, 2, 1, 16, 40
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=3)
    out_full = parallax_attn_with_kvcache(q, r, k, v, backend=backend)
    assert rel(out_full, expected(q, r, k, v, [cap, cap])) < tol(torch.float32)
    exp = expected(q, r, k, v, [17, 17])
    poison(k, v, [17, 17], float("inf"))
    out_int = parallax_attn_with_kvcache(q, r, k, v, cache_seqlens=17, backend=backend)
    assert rel(out_int, exp) < tol(torch.float32)


@pytest.mark.parametrize("layout", ["dense", 32])
def test_num_splits_and_backends_agree(layout):
    """Forced splits 1, 3, 8 and the heuristic give one result, in both backends."""
    b, lq, hq, hkv, d, cap = 2, 4, 8, 2, 32, 96
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=9)
    lens = [4, 96]
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    kc, vc, bt = (k, v, None) if layout == "dense" else to_paged(k, v, layout, g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    outs = {}
    for backend in BACKENDS:
        for ns in (0, 1, 3, 8):
            outs[backend, ns] = parallax_attn_with_kvcache(q, r, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                                           num_splits=ns, backend=backend)
            assert rel(outs[backend, ns], exp) < tol(torch.float32), (backend, ns)
    for key, out in outs.items():
        assert rel(out, outs["torch", 0]) < 1e-5, key


def test_float64_torch_and_auto():
    b, lq, hq, hkv, d, cap = 2, 2, 2, 1, 8, 20
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, F64, seed=1, r_scale=2.0)
    lens = [3, 20]
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    out = parallax_attn_with_kvcache(q, r, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    assert out.dtype == F64 and rel(out, exp) < 1e-12


def test_zero_probe_is_softmax_decode():
    """r = 0 gives exactly softmax attention over the valid keys."""
    b, lq, hq, hkv, d, cap = 2, 1, 4, 2, 16, 50
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=4)
    lens = [50, 23]
    ref = []
    for i, n in enumerate(lens):
        kk = k[i, :n].double().repeat_interleave(2, dim=1).transpose(0, 1)    # (Hq, n, D)
        vv = v[i, :n].double().repeat_interleave(2, dim=1).transpose(0, 1)
        qq = q[i, 0].double()[:, None]                                          # (Hq, 1, D)
        ref.append(torch.nn.functional.scaled_dot_product_attention(qq, kk, vv).transpose(0, 1))
    ref = torch.stack(ref)
    poison(k, v, lens)
    for backend in BACKENDS:
        out = parallax_attn_with_kvcache(q, torch.zeros_like(r), k, v,
                                         cache_seqlens=torch.tensor(lens, dtype=torch.int32), backend=backend)
        assert rel(out, ref) < 1e-5


def _base():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc = torch.randn(2, 32, 2, 16, generator=g)
    return dict(q=q, r=q.clone(), k_cache=kc, v_cache=kc.clone())


def _paged():
    a = _base()
    a["k_cache"] = torch.randn(6, 16, 2, 16)
    a["v_cache"] = torch.randn(6, 16, 2, 16)
    a["block_table"] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return a


BAD = [
    ("dense cache with block_table", lambda: dict(_base(), block_table=torch.zeros(2, 2, dtype=torch.int32),
                                                   k_cache=torch.randn(2, 33, 2, 16), v_cache=torch.randn(2, 33, 2, 16)),
     ValueError, "block_size a power of two"),
    ("paged cache without block_table", lambda: {k: v for k, v in _paged().items() if k != "block_table"},
     ValueError, "without block_table"),
    ("block_table dtype", lambda: dict(_paged(), block_table=_paged()["block_table"].long()), TypeError,
     "block_table: expected dtype torch.int32"),
    ("block_table shape", lambda: dict(_paged(), block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     "block_table: expected shape"),
    ("block id out of range", lambda: dict(_paged(), block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32),
                                           cache_seqlens=20), ValueError, "block ids"),
    ("cache too small for append", lambda: dict(_base(), k=torch.randn(2, 4, 2, 16), v=torch.randn(2, 4, 2, 16),
                                                cache_seqlens=torch.tensor([3, 30], dtype=torch.int32)),
     ValueError, "cache_seqlens: expected values in"),
    ("negative length", lambda: dict(_base(), cache_seqlens=-1), ValueError, "cache_seqlens: expected values in"),
    ("length past capacity", lambda: dict(_base(), cache_seqlens=torch.tensor([1, 33], dtype=torch.int32)),
     ValueError, "cache_seqlens: expected values in"),
    ("no keys", lambda: dict(_base(), cache_seqlens=0), ValueError, "at least one key"),
    ("seqlen_q above keys", lambda: dict(_base(), q=torch.randn(2, 4, 4, 16), r=torch.randn(2, 4, 4, 16),
                                         cache_seqlens=3), ValueError, "seqlen_q"),
    ("seqlens dtype", lambda: dict(_base(), cache_seqlens=torch.tensor([1, 2])), TypeError,
     "cache_seqlens: expected dtype torch.int32"),
    ("seqlens shape", lambda: dict(_base(), cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected shape"),
    ("seqlens type", lambda: dict(_base(), cache_seqlens=2.0), TypeError, "cache_seqlens: expected an int"),
    ("append without lengths", lambda: dict(_base(), k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16)),
     ValueError, "cache_seqlens: expected an int or"),
    ("k without v", lambda: dict(_base(), k=torch.randn(2, 1, 2, 16), cache_seqlens=1), ValueError, "both or neither"),
    ("new k heads", lambda: dict(_base(), k=torch.randn(2, 1, 4, 16), v=torch.randn(2, 1, 4, 16), cache_seqlens=1),
     ValueError, "k: expected shape"),
    ("dtype mismatch", lambda: dict(_base(), r=torch.randn(2, 1, 4, 16, dtype=torch.float64)), TypeError,
     "r: expected dtype"),
    ("new k dtype", lambda: dict(_base(), k=torch.randn(2, 1, 2, 16).half(), v=torch.randn(2, 1, 2, 16).half(),
                                 cache_seqlens=1), TypeError, "k: expected dtype"),
    ("heads do not divide", lambda: dict(_base(), k_cache=torch.randn(2, 32, 3, 16), v_cache=torch.randn(2, 32, 3, 16)),
     ValueError, "kv heads"),
    ("batch mismatch dense", lambda: dict(_base(), k_cache=torch.randn(3, 32, 2, 16), v_cache=torch.randn(3, 32, 2, 16)),
     ValueError, "without block_table"),
    ("bad q rank", lambda: dict(_base(), q=torch.randn(2, 4, 16)), ValueError, "q: expected a 4-D"),
    ("empty q", lambda: dict(_base(), q=torch.randn(2, 0, 4, 16), r=torch.randn(2, 0, 4, 16)), ValueError,
     "seqlen_q >= 1"),
    ("num_splits", lambda: dict(_base(), num_splits=-2), ValueError, "num_splits"),
    ("backend", lambda: dict(_base(), backend="cuda"), ValueError, "backend"),
    ("window", lambda: dict(_base(), window_size=(-3, 0)), ValueError, "window_size"),
    ("scale", lambda: dict(_base(), softmax_scale=0.0), ValueError, "softmax_scale"),
    ("grad", lambda: dict(_base(), q=torch.randn(2, 1, 4, 16, requires_grad=True)), ValueError, "forward-only"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_validation(case):
    _, build, exc, match = case
    with pytest.raises(exc, match=match):
        parallax_attn_with_kvcache(**build())


def test_triton_rejects_float64():
    a = _base()
    a = {k: v.double() for k, v in a.items()}
    with pytest.raises(TypeError, match="float64"):
        parallax_attn_with_kvcache(**a, backend="triton")


@pytest.mark.parametrize("config", [dict(STACKED=0), dict(BLOCK_N=16, PROGRAMS_PER_SM=1)], ids=["unstacked", "bn16"])
def test_triton_kernel_variants(config):
    """The two-dot fallback and other tile sizes compute the same function."""
    from parallax_attention.ops.triton import decode
    b, lq, hq, hkv, d, cap = 2, 4, 4, 2, 32, 64
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float16, seed=21)
    lens = [13, 64]
    exp = expected(q, r, k, v, lens, window=(9, -1))
    poison(k, v, lens)
    kp, vp, bt = to_paged(k, v, 16, g)
    old = decode.set_config(**config)
    try:
        for ns in (0, 3):
            out = parallax_attn_with_kvcache(q, r, kp, vp, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                             block_table=bt, window_size=(9, -1), num_splits=ns, backend="triton")
            assert rel(out, exp) < tol(torch.float16)
    finally:
        decode.set_config(**old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_not_power_of_two(backend):
    b, lq, hq, hkv, d, cap = 2, 2, 6, 3, 24, 40
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float32, seed=13)
    lens = [2, 33]
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    out = parallax_attn_with_kvcache(q, r, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                     num_splits=2, backend=backend)
    assert rel(out, exp) < tol(torch.float32)


def test_launch_config_from_static_shapes():
    """The default rule (wave model 2) on a 132-SM part: the configurations the H200 sweep found fastest."""
    from parallax_attention.ops.triton import decode
    cpu = torch.device("cpu")
    # B=1: one buffer, 64 splits of one tile each = 512 programs, one wave at about 4 per SM.
    assert decode.launch_config(1, 8, 1, 4096, 128, 2, False, cpu) == (2, 64)
    assert decode.launch_config(1, 8, 1, 16384, 128, 2, False, cpu) == (2, 64)
    # A short cache whose 1-tile splits would fit one wave at one program per SM: 2-tile splits.
    assert decode.launch_config(1, 8, 4, 1024, 128, 2, False, cpu) == (3, 8)
    assert decode.launch_config(1, 8, 1, 1024, 128, 2, True, cpu) == (3, 8)
    # B=8: 2 stages, 8 splits = 512 programs, one wave at about 4 per SM.
    assert decode.launch_config(8, 8, 4, 1024, 128, 2, False, cpu) == (2, 8)
    assert decode.launch_config(8, 8, 4, 4096, 128, 2, False, cpu) == (2, 8)
    # B=32: two buffers at 2 per SM keep HBM busy, so one split and no merge.
    assert decode.launch_config(32, 8, 4, 4096, 128, 2, False, cpu) == (3, 1)
    assert decode.launch_config(128, 8, 1, 16384, 128, 2, False, cpu) == (2, 5)
    # Paged: one buffer, about 4 per SM.
    assert decode.launch_config(8, 8, 4, 4096, 128, 2, True, cpu) == (3, 8)
    assert decode.launch_config(32, 8, 1, 4096, 128, 2, True, cpu) == (3, 2)
    assert decode.launch_config(128, 8, 1, 4096, 128, 2, True, cpu) == (3, 1)
    # A short cache gets one split.
    assert decode.launch_config(1, 1, 1, 100, 128, 2, False, cpu)[1] == 1


def test_launch_config_earlier_rules():
    """The earlier rules stay reachable for the benchmark's comparison columns."""
    from parallax_attention.ops.triton import decode
    cpu = torch.device("cpu")
    old = decode.set_config(**decode.WAVE_MODEL_1)
    try:
        # Wave model 1: two buffers need 3 programs per SM, splits of at least MIN_KEYS keys.
        assert decode.launch_config(8, 8, 4, 4096, 128, 2, False, cpu) == (3, 6)
        assert decode.launch_config(8, 8, 4, 4096, 128, 2, True, cpu) == (3, 8)
        assert decode.launch_config(1, 1, 1, 100, 128, 2, False, cpu)[1] == 1
        # The first, fixed rule: about 4 programs per SM.
        old.update(decode.set_config(PROGRAMS_PER_SM=4))
        assert decode.launch_config(1, 8, 1, 16384, 128, 2, False, cpu) == (3, 66)
    finally:
        decode.set_config(**old)


def test_page_scalar_by_grid_size():
    """PAGE_SCALAR 2 (default): one block-table entry per tile only when the grid fits one wave."""
    from parallax_attention.ops.triton import decode
    assert decode.use_page_scalar(64, 132) and decode.use_page_scalar(132, 132)
    assert not decode.use_page_scalar(512, 132)
    old = decode.set_config(PAGE_SCALAR=1)
    try:
        assert decode.use_page_scalar(512, 132)
        decode.set_config(PAGE_SCALAR=0)
        assert not decode.use_page_scalar(8, 132)
    finally:
        decode.set_config(**old)


def test_merge_warps_keep_partials_in_registers():
    """One warp while all splits' (O1, O2) fit 64 fp32 values per thread, more as splits grow (at
    most 4); MERGE_WARPS forces a count."""
    from parallax_attention.ops.triton import decode
    for block_s in (2, 4, 8, 16, 32, 64):
        for block_d in (32, 64, 128):
            w = decode.merge_warps(block_s, block_d)
            assert 1 <= w <= 4
            assert block_s * 2 * block_d // (32 * w) <= 64 or w == 4
            assert w == 1 or block_s * 2 * block_d // (32 * (w // 2)) > 64
    assert decode.merge_warps(8, 128) == 1 and decode.merge_warps(16, 128) == 2
    assert decode.merge_warps(64, 128) == 4
    old = decode.set_config(MERGE_WARPS=4)
    try:
        assert decode.merge_warps(8, 128) == 4
    finally:
        decode.set_config(**old)


def test_pdl_by_merge_grid_size():
    """PDL 1 always, 0 never, 2 (default) only for small merge grids: B=1 (8-32 programs) on, B=8 off."""
    from parallax_attention.ops.triton import decode
    old = decode.set_config(PDL=1)
    try:
        assert decode.use_pdl(8 * 32, 132)
        decode.set_config(PDL=2)
        assert decode.use_pdl(1 * 32, 132) and decode.use_pdl(8, 132)
        assert not decode.use_pdl(8 * 8, 132) and not decode.use_pdl(8 * 32, 132)
        decode.set_config(PDL=0)
        assert not decode.use_pdl(8, 132)
    finally:
        decode.set_config(**old)


@pytest.mark.parametrize("layout", ["dense", 16, 64, 128])
def test_one_tile_splits_match_reference(layout):
    """Splits of a single BLOCK_N tile (the default rule's choice for long caches), several of them
    empty for the shorter sequence."""
    from parallax_attention.ops.triton import decode
    b, lq, hq, hkv, d, cap = 2, 1, 4, 1, 32, 256
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float16, seed=41)
    lens = [cap, 70]
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    kk, vv, bt = (k, v, None) if layout == "dense" else to_paged(k, v, layout, g)
    splits = cap // decode._CONFIG["BLOCK_N"]
    assert splits == 4
    outs = []
    # the default; then (paged 64/128) block-table entries preloaded, read before the sequence
    # length (ONE_TILE) or after it
    for cfg in ({}, dict(PAGE_SCALAR=0), dict(PAGE_SCALAR=0, ONE_TILE=0)):
        old = decode.set_config(**cfg)
        try:
            outs.append(parallax_attn_with_kvcache(q, r, kk, vv, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                                   block_table=bt, num_splits=splits, backend="triton"))
        finally:
            decode.set_config(**old)
    for out in outs:
        assert rel(out, exp) < tol(torch.float16)
    assert torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("page", [64, 128])
@pytest.mark.parametrize("lq", [1, 4])
def test_page_per_tile_reads_match_per_key_reads(page, lq):
    """Pages that hold whole K/V tiles are read with one block-table entry per tile (PAGE_SCALAR);
    the result equals the per-key path and the reference, with an append and split boundaries
    inside pages."""
    from parallax_attention.ops.triton import decode
    b, hq, hkv, d, cap = 3, 4, 2, 32, 320
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float16, seed=57)
    lens = [cap - lq, 100, 1]
    full = [n + lq for n in lens]
    exp = expected(q, r, k, v, full)
    knew = torch.stack([k[i, n:n + lq] for i, n in enumerate(lens)])
    vnew = torch.stack([v[i, n:n + lq] for i, n in enumerate(lens)])
    poison(k, v, lens)
    outs = []
    # block-table entries preloaded before the loop (the default here), then without the preload:
    # one entry per tile forced on / off (the default decides by grid size)
    for cfg in (dict(PAGE_PRELOAD=1, PAGE_SCALAR=0), dict(PAGE_PRELOAD=0, PAGE_SCALAR=1),
                dict(PAGE_PRELOAD=0, PAGE_SCALAR=0)):
        kp, vp, bt = to_paged(k, v, page, torch.Generator().manual_seed(5))
        old = decode.set_config(**cfg)
        try:
            for ns in (0, 3):
                outs.append(parallax_attn_with_kvcache(
                    q, r, kp.clone(), vp.clone(), knew, vnew, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                    block_table=bt, num_splits=ns, backend="triton"))
        finally:
            decode.set_config(**old)
    for out in outs:
        assert rel(out, exp) < tol(torch.float16)
    # same keys in the same order with the same splits: only the addressing differs
    assert torch.equal(outs[1], outs[3]) and torch.equal(outs[1], outs[5])
    assert torch.equal(outs[2], outs[4])


def test_preload_entries_cover_every_split():
    """The preload holds every block-table entry a split can touch, for any length up to the capacity,
    and is 0 (not used) when that would exceed PAGE_PRELOAD_MAX."""
    from parallax_attention.ops.triton import decode
    block_n = 64
    for capacity, splits, page in ((4096, 64, 64), (1024, 8, 64), (1024, 2, 64), (1024, 3, 256), (16384, 64, 256),
                                   (1000, 7, 128), (320, 3, 64), (16384, 8, 64)):
        n = decode.preload_entries(capacity, splits, page, block_n)
        need = 0
        for span in range(1, capacity + 1, 7):   # the kernel's split ranges for a sequence of span keys
            chunk = -(-(-(-span // splits)) // block_n) * block_n
            for s in range(splits):
                lo, hi = s * chunk, min(s * chunk + chunk, span)
                if lo < hi:
                    need = max(need, (hi - 1) // page - lo // page + 1)
        if n:
            assert n >= need and n & (n - 1) == 0 and n <= decode.PAGE_PRELOAD_MAX
        else:
            assert need > decode.PAGE_PRELOAD_MAX // 2   # refused only where a smaller power of two cannot hold it
    assert decode.preload_entries(4096, 64, 64, 64) == 2
    assert decode.preload_entries(16384, 8, 64, 64) == 0


@pytest.mark.parametrize("page", [64, 256])
def test_preloaded_pages_ignore_unused_table_entries(page):
    """Entries past a sequence's last block may hold anything (-1, huge ids): the preload reads them
    but never addresses K/V with them."""
    from parallax_attention.ops.triton import decode
    b, lq, hq, hkv, d, cap = 3, 1, 4, 2, 32, 1024
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float16, seed=61)
    lens = [cap, 65, 300]
    exp = expected(q, r, k, v, lens)
    poison(k, v, lens)
    kp, vp, bt = to_paged(k, v, page, g)
    for i, n in enumerate(lens):
        used = -(-n // page)
        bt[i, used:] = torch.where(torch.arange(bt.shape[1] - used) % 2 == 0, -1, 2**31 - 1).to(torch.int32)
    old = decode.set_config(PAGE_SCALAR=0)   # this small grid would read one entry per tile instead
    try:
        for ns in (0, 2, 5):
            assert decode.paged_launch_config(b, hkv, hq // hkv, cap, cap, d, 2, page, False, ns,
                                              torch.device("cpu"))[2] > 0
            out = parallax_attn_with_kvcache(q, r, kp, vp, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                             block_table=bt, num_splits=ns, backend="triton")
            assert rel(out, exp) < tol(torch.float16)
    finally:
        decode.set_config(**old)


def test_paged_launch_plan():
    """Preloaded entries where they fit (then the dense cache's stages and splits), except on
    one-wave grids with pages of one tile, which read one entry per tile; neither with a left
    window or pages smaller than a tile. (stages, splits, entries) for the H200's 132 SMs."""
    from parallax_attention.ops.triton import decode
    cpu = torch.device("cpu")
    plan = lambda b, hq, l, page, left=False, ns=0: decode.paged_launch_config(  # noqa: E731
        b, 8, hq // 8, l, l, 128, 2, page, left, ns, cpu)
    assert plan(32, 32, 1024, 64) == (*decode.launch_config(32, 8, 4, 1024, 128, 2, False, cpu), 32)
    assert plan(1, 32, 4096, 64) == (2, 64, 2) and plan(1, 32, 4096, 256) == (2, 64, 2)
    assert plan(1, 8, 1024, 64) == (*decode.launch_config(1, 8, 1, 1024, 128, 2, True, cpu), 0)   # one wave
    # one wave with pages of four tiles: preloaded, with the dense cache's plan
    assert plan(1, 8, 1024, 256) == (*decode.launch_config(1, 8, 1, 1024, 128, 2, False, cpu), 2)
    assert plan(8, 8, 16384, 64)[2] == 0 and plan(8, 8, 16384, 256)[2] == 16      # 34 entries do not fit
    assert plan(32, 32, 1024, 64, left=True)[2] == 0 and plan(32, 32, 1024, 16)[2] == 0
    assert plan(32, 32, 1024, 64, ns=64)[2] == 2


@pytest.mark.parametrize("layout", ["dense", 16])
@pytest.mark.parametrize("window", [(-1, -1), (60, -1)])
def test_auto_splits_match_reference(layout, window):
    """Heuristic split counts > 1 (MIN_KEYS lowered so small caches split) give the reference output,
    including the window-bounded key count."""
    from parallax_attention.ops.triton import decode
    b, lq, hq, hkv, d, cap = 2, 1, 4, 2, 32, 160
    q, r, k, v, g = inputs(b, lq, hq, hkv, d, cap, torch.float16, seed=31)
    lens = [cap, 77]
    exp = expected(q, r, k, v, lens, window=window)
    poison(k, v, lens)
    kk, vv, bt = (k, v, None) if layout == "dense" else to_paged(k, v, layout, g)
    old = decode.set_config(MIN_KEYS=16, BLOCK_N=16, MODEL=1)
    try:
        keys = cap if window[0] < 0 else lq + window[0]
        stages, splits = decode.launch_config(b, hkv, hq // hkv * lq, keys, d, 2, layout != "dense",
                                              torch.device("cpu"))
        assert splits > 1
        out = parallax_attn_with_kvcache(q, r, kk, vv, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                         block_table=bt, window_size=window, backend="triton")
    finally:
        decode.set_config(**old)
    assert rel(out, exp) < tol(torch.float16)


def test_paged_reads_on_random_shapes():
    """Kernel vs the float64 torch backend on random paged problems: block sizes 16-256, GQA,
    Lq 1-4, appends, left windows, forced splits, and every way of reading the block table
    (preloaded, per tile, per key, one-tile splits' early read); table entries past each
    sequence are -1 and unused blocks NaN."""
    import random

    from parallax_attention.ops.triton import decode
    rng = random.Random(0)
    configs = [{}, dict(PAGE_SCALAR=0), dict(PAGE_SCALAR=1), dict(PAGE_PRELOAD=0), dict(ONE_TILE=0)]
    for it in range(30):
        b, hkv, grp, d = rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([16, 32])
        lq, page, nb = rng.choice([1, 2, 4]), rng.choice([16, 64, 128, 256]), rng.choice([1, 2, 3, 5])
        cap = nb * page
        lnew = rng.choice([0, 1, lq])
        lens = [rng.randint(max(lq - lnew, 0 if lnew else 1), cap - lnew) for _ in range(b)]
        window = rng.choice([(-1, -1), (rng.randint(0, 300), -1)])
        splits = rng.choice([0, 1, 3, 8, 64])
        g = torch.Generator().manual_seed(it)
        q = torch.randn(b, lq, hkv * grp, d, generator=g)
        r = 0.5 * torch.randn(b, lq, hkv * grp, d, generator=g)
        k, v = torch.randn(b, cap, hkv, d, generator=g), torch.randn(b, cap, hkv, d, generator=g)
        knew = torch.randn(b, lnew, hkv, d, generator=g) if lnew else None
        vnew = torch.randn(b, lnew, hkv, d, generator=g) if lnew else None
        poison(k, v, lens)
        kp, vp, bt = to_paged(k, v, page, g)
        for i, n in enumerate(lens):
            bt[i, -(-(n + lnew) // page):] = -1
        seq = torch.tensor(lens, dtype=torch.int32)
        exp = parallax_attn_with_kvcache(q.double(), r.double(), kp.double(), vp.double(),
                                         knew.double() if lnew else None, vnew.double() if lnew else None,
                                         cache_seqlens=seq, block_table=bt, window_size=window, backend="torch")
        old = decode.set_config(**rng.choice(configs))
        try:
            out = parallax_attn_with_kvcache(q, r, kp, vp, knew, vnew, cache_seqlens=seq, block_table=bt,
                                             window_size=window, num_splits=splits, backend="triton")
        finally:
            decode.set_config(**old)
        assert torch.isfinite(out).all() and rel(out, exp) < 1e-4, (it, b, hkv, grp, d, lq, page, cap, lnew, lens,
                                                                    window, splits)
