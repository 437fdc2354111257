import copy
import math

import pytest
import torch
from torch import nn

from parallax_attention.optim import (
    MuonAdamW,
    Schedule,
    adjusted_lr,
    apply_schedule,
    build_optimizer,
    build_param_groups,
    zeropower_via_newtonschulz,
)


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_singular_values_in_band(shape, dtype):
    g = torch.Generator().manual_seed(0)
    # Ill-conditioned input: singular values spread over 3 orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    k = min(shape)
    s = torch.logspace(0, -3, k, dtype=torch.float64)
    m = (u[:, :k] @ torch.diag(s) @ v[:, :k].T).to(dtype)
    x = zeropower_via_newtonschulz(m, dtype=dtype)
    assert x.shape == m.shape and x.dtype == m.dtype
    sv = torch.linalg.svdvals(x.double())
    # The quintic with these coefficients does not converge to 1; it lands
    # singular values (of all but the tiniest inputs) in roughly [0.5, 1.2].
    assert sv.max() < 1.25
    assert sv[s > 1e-2].min() > 0.5
    # Same singular vectors: x ~ U V^T, so x^T m is symmetric PSD-ish (positive diagonal in V basis).
    proj = u[:, :k].T @ x.double() @ v[:, :k]
    off = proj - torch.diag(torch.diagonal(proj))
    assert off.abs().max() < 0.1 * torch.diagonal(proj).abs().min() + 0.05


def test_newton_schulz_validates_input():
    with pytest.raises(ValueError, match="2-D"):
        zeropower_via_newtonschulz(torch.randn(3, 4, 5, 6))
    with pytest.raises(ValueError, match="2-D"):
        zeropower_via_newtonschulz(torch.randn(5))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_stack_equals_each_matrix(shape):
    # A stack is orthogonalised matrix by matrix: its own norm for each, no mixing across the batch.
    g = torch.Generator().manual_seed(3)
    mats = torch.randn(5, *shape, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1, 10, 1e2, 1e3],
                                                                                      dtype=torch.float64)[:, None, None]
    stacked = zeropower_via_newtonschulz(mats, dtype=None)
    for m, x in zip(mats, stacked):
        torch.testing.assert_close(x, zeropower_via_newtonschulz(m, dtype=None), rtol=1e-12, atol=1e-12)


def test_muon_steps_same_shape_matrices_like_one_at_a_time():
    # Same-shape matrices are stepped as one batched Newton-Schulz; the update equals stepping each alone.
    torch.manual_seed(4)
    w0 = [torch.randn(32, 48) for _ in range(3)] + [torch.randn(48, 32)]
    together = [nn.Parameter(w.clone()) for w in w0]
    alone = [nn.Parameter(w.clone()) for w in w0]
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float64)
    opt_together = MuonAdamW([dict(kind="muon", params=together)], **kw)
    opts_alone = [MuonAdamW([dict(kind="muon", params=[p])], **kw) for p in alone]
    for _ in range(2):
        grads = [torch.randn_like(w) for w in w0]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_together.step()
        for o in opts_alone:
            o.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_adjusted_lr_both_rules():
    assert adjusted_lr(0.02, (1024, 256), "original") == pytest.approx(0.02 * 2.0)
    assert adjusted_lr(0.02, (256, 1024), "original") == pytest.approx(0.02)
    assert adjusted_lr(0.02, (256, 1024), "match_rms_adamw") == pytest.approx(0.02 * 0.2 * 32)
    with pytest.raises(ValueError, match="adjust_lr"):
        adjusted_lr(0.02, (2, 2), "bogus")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layer = nn.Module()
        self.layer.q_proj = nn.Linear(16, 24, bias=False)
        self.layer.r_proj = nn.Linear(16, 24, bias=True)
        self.layer.q_norm = nn.RMSNorm(8) if hasattr(nn, "RMSNorm") else nn.LayerNorm(8)
        self.layer.probe_gate = nn.Linear(16, 2, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(16, 32, bias=False)
        self.mlp.down_proj = nn.Linear(32, 16, bias=False)
        self.lm_head = nn.Linear(16, 50, bias=False)


def _group_names(groups):
    return {g["name"]: set(g["param_names"]) for g in groups}


def test_param_group_assignment_muon_and_adamw_only():
    m = Tiny()
    names = _group_names(build_param_groups(m, "muon"))
    assert names["muon"] == {"layer.q_proj.weight", "layer.r_proj.weight", "mlp.gate_proj.weight",
                             "mlp.down_proj.weight"}
    assert names["adamw"] == {"embed_tokens.weight", "lm_head.weight"}
    assert names["adamw_no_wd"] == {"layer.r_proj.bias", "layer.q_norm.weight", "layer.probe_gate.weight"}
    groups = build_param_groups(m, "adamw")
    assert all(g["kind"] == "adamw" for g in groups)
    assert _group_names(groups)["adamw_hidden"] == names["muon"]
    nwd = [g for g in groups if g["name"] == "adamw_no_wd"][0]
    assert nwd["weight_decay"] == 0.0


def test_tied_parameters_counted_once():
    m = Tiny()
    m.lm_head.weight = m.embed_tokens.weight
    groups = build_param_groups(m, "muon")
    total = sum(len(g["params"]) for g in groups)
    assert total == len({id(p) for p in m.parameters()})


def test_muon_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=[nn.Parameter(torch.randn(4))])])


def _reference_muon_steps(w0, grads, lr, wd, mu, adjust):
    """Muon written out independently: momentum, Nesterov, NS5 (fp32), decoupled wd."""
    w = w0.clone()
    buf = torch.zeros_like(w)
    a, b, c = 3.4445, -4.7750, 2.0315
    for g in grads:
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / x.norm()
        for _ in range(5):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        x = x.T if u.shape[0] > u.shape[1] else x
        rows, cols = w.shape
        scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
        w = w * (1 - lr * wd) - lr * scale * x
    return w


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_update_matches_independent_computation(adjust):
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(3)]
    p = nn.Parameter(w0.clone())
    opt = MuonAdamW([dict(kind="muon", params=[p])], lr=0.01, weight_decay=0.1,
                    adjust_lr=adjust, ns_dtype=torch.float32)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _reference_muon_steps(w0, grads, 0.01, 0.1, 0.95, adjust)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(p.detach(), w0)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_matches_torch_optim_muon():
    torch.manual_seed(1)
    w0 = torch.randn(40, 24)
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = MuonAdamW([dict(kind="muon", params=[p1])], lr=0.02, weight_decay=0.05,
                     adjust_lr="match_rms_adamw", ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([p2], lr=0.02, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(40, 24)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=0, atol=1e-6)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(2)
    w0 = torch.randn(10, 6)
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = MuonAdamW([dict(kind="adamw", params=[p1])], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        g = torch.randn(10, 6)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-6, atol=1e-6)


def test_optimizer_state_dict_roundtrip_continues_identically():
    torch.manual_seed(3)
    m1 = Tiny()
    m2 = Tiny()
    m2.load_state_dict(m1.state_dict())
    o1 = build_optimizer(m1, "muon", lr=1e-2)
    x = torch.randint(0, 50, (4, 7))

    def loss(m):
        h = m.embed_tokens(x)
        h = h + m.mlp.down_proj(torch.relu(m.mlp.gate_proj(h))) + m.layer.q_proj(h)[..., :16]
        return m.lm_head(h).logsumexp(-1).mean()

    for _ in range(2):
        o1.zero_grad()
        loss(m1).backward()
        o1.step()
    m2.load_state_dict(m1.state_dict())
    o2 = build_optimizer(m2, "muon", lr=1e-2)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as if read back from a file
    for o, m in ((o1, m1), (o2, m2)):
        o.zero_grad()
        loss(m).backward()
        o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- schedules


def test_wsd_closed_form():
    s = Schedule("wsd", total=100, warmup=10, decay_frac=0.2, min_ratio=0.1, wd_gamma=2.0)
    assert s.lr_factor(0) == pytest.approx(0.1)
    assert s.lr_factor(9) == pytest.approx(1.0)
    assert s.lr_factor(50) == 1.0 and s.wd_factor(50) == 1.0
    assert s.decay_start == 80
    for step in (80, 85, 90, 99):
        t = (step - 80) / 20
        assert s.lr_factor(step) == pytest.approx(1 - 0.9 * t)
        assert s.wd_factor(step) == pytest.approx((1 - t) ** 2)


def test_cosine_closed_form_and_wd_gamma():
    s = Schedule("cosine", total=50, warmup=5, min_ratio=0.0, wd_gamma=3.0)
    for step in (5, 17, 30, 49):
        t = (step - 5) / 45
        assert s.lr_factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))
        assert s.wd_factor(step) == pytest.approx((1 - t) ** 3)
    assert Schedule("wsd", total=10, wd_gamma=0).wd_factor(9) == 1.0


def test_schedule_validation_names_argument():
    with pytest.raises(ValueError, match="warmup"):
        Schedule("wsd", total=10, warmup=20)
    with pytest.raises(ValueError, match="kind"):
        Schedule("linear")


def test_apply_schedule_scales_groups():
    p = nn.Parameter(torch.randn(4, 4))
    q = nn.Parameter(torch.randn(4))
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02, weight_decay=0.1),
                     dict(kind="adamw", params=[q], lr=1e-3, weight_decay=0.0)])
    s = Schedule("wsd", total=10, warmup=0, decay_frac=0.5)
    apply_schedule(opt, s, 7)
    t = (7 - 5) / 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - t))
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1 * (1 - t) ** 2)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * (1 - t))
    apply_schedule(opt, s, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
