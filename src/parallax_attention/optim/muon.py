"""Muon for hidden 2-D matrices and AdamW for everything else, in one optimizer.

Why not wrap ``torch.optim.Muon``: it only accepts plain 2-D tensors and
orthogonalises whatever it is given, so under FSDP2 (parameters and gradients
are DTensors sharded on dim 0) it would orthogonalise each rank's *shard* — a
different, wrong update. This implementation follows the same math (same
Newton-Schulz polynomial, momentum, Nesterov, decoupled weight decay and both
learning-rate adjustments; a test checks it update-for-update against
``torch.optim.Muon``) and gathers a sharded matrix before orthogonalising it.
The AdamW half is written out too so that both halves live in one
``torch.optim.Optimizer`` whose ``param_groups`` carry a ``kind`` key: one
object to step, checkpoint and schedule.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
LR_ADJUSTMENTS = ("original", "match_rms_adamw", "none")


def zeropower_via_newtonschulz(
    g: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    """Approximate U V^T of ``g = U S V^T`` with the quintic Newton-Schulz iteration.

    The coefficients maximise the slope at zero rather than converge, so the
    singular values of the result land roughly in [0.5, 1.5] instead of at 1
    (Keller Jordan's Muon). ``g`` is one matrix, or a stack (batch, n, m) of
    same-shape matrices, each orthogonalised on its own with batched products
    (one launch per product for the whole stack). ``dtype`` is the working
    precision (bf16 as in the reference; ``None`` keeps ``g``'s dtype).
    Returns a tensor of ``g``'s dtype.
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"g must be a 2-D matrix or a 3-D stack of matrices, got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, b, c = coefficients
    x = g.to(dtype) if dtype is not None else g.clone()
    transposed = g.size(-2) > g.size(-1)
    if transposed:  # iterate on the short side: X X^T is then the small Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in (0, 1].
    if x.ndim == 2:
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def _shape_runs(idx: list[int], shapes: list) -> list[list[int]]:
    """``idx`` cut into runs of consecutive same-shape matrices (callers sort by shape first)."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and tuple(shapes[runs[-1][0]]) == tuple(shapes[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _by_shape(idx, shapes) -> list[int]:
    """``idx`` ordered so same-shape matrices are adjacent; depends only on the shapes."""
    return sorted(idx, key=lambda i: (tuple(shapes[i]), i))


def _newtonschulz_grouped(mats: list[Tensor], steps, coefficients, eps, dtype) -> list[Tensor]:
    """:func:`zeropower_via_newtonschulz` of each matrix, same-shape matrices stacked into one batch.

    Each group costs a stack and two casts however many matrices it holds: per-matrix copies
    are what made the optimizer step host-bound.
    """
    keys = [(tuple(m.shape), str(m.dtype)) for m in mats]
    out: list[Tensor | None] = [None] * len(mats)
    for run in _shape_runs(sorted(range(len(mats)), key=lambda i: (keys[i], i)), keys):
        if len(run) == 1:
            out[run[0]] = zeropower_via_newtonschulz(mats[run[0]], steps, coefficients, eps, dtype)
            continue
        stacked = torch.stack([mats[i] for i in run])
        x = zeropower_via_newtonschulz(stacked.to(dtype or stacked.dtype), steps, coefficients, eps, None)
        for i, xi in zip(run, x.to(stacked.dtype).unbind(0)):
            out[i] = xi
    return out


def adjusted_lr(lr: float, shape: torch.Size | tuple[int, ...], adjustment: str) -> float:
    """Per-matrix Muon learning rate.

    ``original``: lr * max(1, rows/cols)^0.5 (Keller Jordan).
    ``match_rms_adamw``: lr * 0.2 * sqrt(max(rows, cols)), which gives the update
    the RMS of a typical AdamW update so AdamW's lr and weight decay carry over
    (Moonshot, "Muon is Scalable for LLM Training").
    """
    rows, cols = int(shape[0]), int(shape[1])
    if adjustment == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjustment == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjustment == "none":
        return lr
    raise ValueError(f"adjust_lr must be one of {LR_ADJUSTMENTS}, got {adjustment!r}")


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _orthogonalise(update: Tensor, steps, coefficients, eps, dtype) -> Tensor:
    """Newton-Schulz on the *whole* matrix, also when ``update`` is an FSDP2 shard."""
    if not _is_dtensor(update):
        return zeropower_via_newtonschulz(update, steps, coefficients, eps, dtype)
    from torch.distributed.tensor import DTensor, Replicate

    # Gather the full matrix on every rank (each rank computes the same result;
    # the redundant work is small next to the forward/backward), then hand back
    # the local shard with the parameter's own placements. Replicate -> Shard
    # is a local slice, no communication.
    full = zeropower_via_newtonschulz(update.full_tensor(), steps, coefficients, eps, dtype)
    replicated = DTensor.from_local(
        full, update.device_mesh, [Replicate()] * update.device_mesh.ndim, run_check=False
    )
    return replicated.redistribute(update.device_mesh, update.placements)


def _dtype_name(dtype) -> str | None:
    if dtype is None or dtype == "none":
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return dtype
    raise ValueError(f"ns_dtype must be a torch dtype, its name, or None; got {dtype!r}")


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (same storage: in-place ops on it update the DTensor), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _row_sharded(p: Tensor) -> bool:
    """FSDP2's layout: a 1-D mesh, rows split in chunks of ceil(n / world), the last ones short or empty."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or len(p.placements) != 1:
        return False
    pl = p.placements[0]
    if type(pl) is not Shard or pl.dim != 0:
        return False
    world, me = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-p.shape[0] // world)
    return p.to_local().shape == (max(0, min(chunk, p.shape[0] - me * chunk)), p.shape[1])


def _all_gather_flat(send: Tensor, pg) -> Tensor:
    """(world, numel) from every rank's equally long 1-D ``send``; one collective."""
    import torch.distributed as dist

    out = send.new_empty(dist.get_world_size(pg), send.numel())
    if dist.get_backend(pg) == "nccl":
        dist.all_gather_into_tensor(out, send, group=pg)
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.unbind(0)), send, group=pg)
    return out


# Matrices are gathered in buckets of at most this many elements (256 MB in bf16), so the
# transient full copies stay small next to the model while each bucket is one collective.
GATHER_BUCKET_NUMEL = 128 * 2**20


def _deal(bucket: list[int], shapes: list[torch.Size], world: int) -> dict[int, int]:
    """Owner rank of each matrix: largest Newton-Schulz cost first, each to the least-loaded rank.

    Uses only the shapes, so every rank computes the same deal.
    """
    load = [0.0] * world
    owner = {}
    for i in sorted(bucket, key=lambda j: (-shapes[j].numel() * min(shapes[j]), j)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += shapes[i].numel() * min(shapes[i])
    return owner


def _all_to_all_flat(send: Tensor, send_sizes: list[int], recv_sizes: list[int], pg) -> Tensor:
    import torch.distributed as dist

    out = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=pg)
    return out


def _orthogonalise_row_sharded(shapes: list[torch.Size], shards: list[Tensor], mesh, steps, coefficients, eps,
                               dtype, mode: str) -> list[Tensor]:
    """Full-matrix Newton-Schulz for row shards laid out as FSDP2 lays them out; returns each rank's rows.

    Rows travel in the Newton-Schulz working dtype (its first step is that cast, so moving
    them after it changes nothing), padded to the shard size, one collective per bucket and
    direction. ``mode="round_robin"``: each matrix has one owner rank (matrices dealt so the
    ranks' Newton-Schulz flops balance); an all-to-all brings every rank's rows of a matrix to
    its owner, the owner orthogonalises, and a second all-to-all returns each rank its rows,
    so a rank moves about 2/world of the bucket, not twice all of it. ``"redundant"``: one
    all-gather and every rank orthogonalises every matrix.

    Matrices of one shape sit next to each other in every buffer, so packing, unpacking and
    Newton-Schulz cost a few launches per shape and bucket, not per matrix; the returned rows
    are views into one buffer in the shards' dtype.
    """
    pg = mesh.get_group()
    world, me = mesh.size(), mesh.get_local_rank()
    work_dtype = dtype or shards[0].dtype
    out_dtype = shards[0].dtype
    out: list[Tensor | None] = [None] * len(shards)
    chunk = [-(-shape[0] // world) for shape in shapes]

    def pack(idx: list[int]) -> Tensor:
        """This rank's rows of matrices ``idx``, each padded to its shard size, as one flat buffer."""
        parts = [torch.nn.functional.pad(shards[i], (0, 0, 0, chunk[i] - shards[i].shape[0]))
                 if shards[i].shape[0] != chunk[i] else shards[i] for i in idx]
        return torch.cat([t.reshape(-1) for t in parts]).to(work_dtype) if parts else \
            shards[0].new_empty(0, dtype=work_dtype)

    def unpack(gathered: Tensor, idx: list[int]):
        """(world, seg) buffer of every rank's padded rows of ``idx`` -> (run, stacked full matrices)."""
        off = 0
        for run in _shape_runs(idx, shapes):
            rows, cols = shapes[run[0]]
            size = chunk[run[0]] * cols
            block = gathered[:, off:off + len(run) * size].view(world, len(run), chunk[run[0]], cols)
            yield run, block.transpose(0, 1).reshape(len(run), world * chunk[run[0]], cols)[:, :rows]
            off += len(run) * size

    def orthogonalise(stacked: Tensor) -> Tensor:
        return zeropower_via_newtonschulz(stacked, steps, coefficients, eps, None)

    def own_rows(run: list[int], x: Tensor) -> None:
        lo = min(me * chunk[run[0]], shapes[run[0]][0])
        hi = min(lo + chunk[run[0]], shapes[run[0]][0])
        for i, xi in zip(run, x[:, lo:hi].to(out_dtype).unbind(0)):
            out[i] = xi

    buckets, cur, cur_numel = [], [], 0
    for i, shape in enumerate(shapes):
        if cur and cur_numel + shape.numel() > GATHER_BUCKET_NUMEL:
            buckets.append(cur)
            cur, cur_numel = [], 0
        cur.append(i)
        cur_numel += shape.numel()
    if cur:
        buckets.append(cur)

    for bucket in buckets:
        if mode == "redundant":
            idx = _by_shape(bucket, shapes)
            for run, full in unpack(_all_gather_flat(pack(idx), pg), idx):
                own_rows(run, orthogonalise(full))
            continue
        owner = _deal(bucket, shapes, world)
        by_owner = [_by_shape([i for i in bucket if owner[i] == r], shapes) for r in range(world)]
        # Padded rows of every owned matrix: the same count from every rank.
        seg = [sum(chunk[i] * shapes[i][1] for i in by_owner[r]) for r in range(world)]
        send = torch.cat([pack(by_owner[r]) for r in range(world)])
        recv = _all_to_all_flat(send, seg, [seg[me]] * world, pg).view(world, seg[me])
        # Back to the ranks: (world, rows of rank r of each owned matrix), padded to the shard size.
        back = []
        for run, full in unpack(recv, by_owner[me]):
            x = orthogonalise(full)
            pad = world * chunk[run[0]] - x.shape[1]
            x = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
            back.append(x.reshape(len(run), world, -1).transpose(0, 1).reshape(world, -1))
        send = torch.cat(back, dim=1).reshape(-1) if back else recv.new_empty(0)
        recv = _all_to_all_flat(send, [seg[me]] * world, seg, pg).to(out_dtype)
        off = 0
        for r in range(world):
            for i in by_owner[r]:
                size = chunk[i] * shapes[i][1]
                lo = min(me * chunk[i], shapes[i][0])
                hi = min(lo + chunk[i], shapes[i][0])
                out[i] = recv[off:off + size].view(chunk[i], shapes[i][1])[:hi - lo]
                off += size
    return out


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer: Muon on groups with ``kind="muon"``, AdamW on ``kind="adamw"``.

    Build the groups with :func:`build_param_groups` (or pass dicts with a
    ``kind`` key). Muon groups use ``lr, momentum, nesterov, weight_decay,
    ns_steps, ns_coefficients, adjust_lr, ns_dtype``; AdamW groups use ``lr,
    betas, eps, weight_decay``. Weight decay is decoupled (``p *= 1 - lr*wd``)
    in both. Each group also remembers ``initial_lr`` and
    ``initial_weight_decay`` so a schedule can scale them.

    Under FSDP2 a Muon group's ``distributed_ns`` picks how the full matrices
    are orthogonalised: ``"round_robin"`` (default; each matrix on one owner
    rank, rows moved there and back with all-to-alls) or ``"redundant"``
    (one all-gather, every rank does every matrix); see
    :func:`_orthogonalise_row_sharded`. Element-wise updates run on the local
    shards with foreach kernels.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        adjust_lr: str = "match_rms_adamw",
        ns_dtype: torch.dtype | str | None = torch.bfloat16,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        distributed_ns: str = "round_robin",
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if adjust_lr not in LR_ADJUSTMENTS:
            raise ValueError(f"adjust_lr must be one of {LR_ADJUSTMENTS}, got {adjust_lr!r}")
        if distributed_ns not in ("round_robin", "redundant"):
            raise ValueError(f"distributed_ns must be 'round_robin' or 'redundant', got {distributed_ns!r}")
        # Kept as a string in the param groups: distributed state-dict helpers
        # only accept tensors, numbers, strings and containers of them.
        ns_dtype = _dtype_name(ns_dtype)
        defaults = dict(
            kind="adamw", lr=lr, weight_decay=weight_decay, momentum=momentum,
            nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
            adjust_lr=adjust_lr, ns_dtype=ns_dtype, betas=tuple(betas), eps=eps,
            distributed_ns=distributed_ns,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["kind"] not in ("muon", "adamw"):
                raise ValueError(f"param group kind must be 'muon' or 'adamw', got {group['kind']!r}")
            if group["kind"] == "muon":
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(
                            f"Muon groups take 2-D matrices only; got a parameter of shape {tuple(p.shape)}"
                        )
            group["ns_dtype"] = _dtype_name(group["ns_dtype"])
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("initial_weight_decay", group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        ns_dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else None
        ns = (group["ns_steps"], group["ns_coefficients"], 1e-7, ns_dtype)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        # Element-wise work runs on the local shards with foreach kernels: under FSDP2 a DTensor
        # op costs far more host time than the kernel it launches.
        grads = [_local(p.grad) for p in params]
        bufs = [_local(self.state[p]["momentum_buffer"]) for p in params]
        # buf = mu*buf + (1-mu)*g; Nesterov looks one step ahead along it.
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        if not any(_is_dtensor(p) for p in params):
            updates = _newtonschulz_grouped(updates, *ns)
        elif self._all_row_sharded(params):
            updates = _orthogonalise_row_sharded([p.shape for p in params], updates, params[0].device_mesh, *ns,
                                                 mode=group.get("distributed_ns", "round_robin"))
        else:  # other layouts, or sharded and plain matrices mixed: one matrix at a time
            from torch.distributed.tensor import DTensor

            updates = [_local(_orthogonalise(DTensor.from_local(u, p.device_mesh, p.placements, run_check=False,
                                                                shape=p.shape, stride=p.stride()), *ns))
                       if _is_dtensor(p) else zeropower_via_newtonschulz(u, *ns)
                       for u, p in zip(updates, params)]
        local_params = [_local(p) for p in params]
        torch._foreach_mul_(local_params, 1 - lr * wd)
        # One add per distinct learning-rate scale (one per matrix shape class), each exactly p + alpha * u.
        by_alpha: dict[float, list[int]] = {}
        for i, p in enumerate(params):
            by_alpha.setdefault(-adjusted_lr(lr, p.shape, group["adjust_lr"]), []).append(i)
        for alpha, idx in by_alpha.items():
            torch._foreach_add_([local_params[i] for i in idx],
                                [updates[i].to(local_params[i].dtype) for i in idx], alpha=alpha)

    def _all_row_sharded(self, params: list[Tensor]) -> bool:
        # Layouts do not change between steps; checking DTensor properties costs host time each step.
        key = tuple(id(p) for p in params)
        cache = self.__dict__.setdefault("_layout_cache", {})
        if key not in cache:
            cache[key] = all(_is_dtensor(p) and _row_sharded(p) and p.device_mesh == params[0].device_mesh
                             for p in params)
        return cache[key]

    def _adamw_group(self, group) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        steps = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # A tensor step (as torch's AdamW keeps it) round-trips through
                # distributed state-dict helpers.
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            # Out of place: Optimizer.load_state_dict does not copy "step", so an
            # in-place += would also advance the optimizer it was loaded from.
            state["step"] = state["step"] + 1
            steps.append(float(state["step"]))
        ps = [_local(p) for p in params]
        gs = [_local(p.grad) for p in params]
        ms = [_local(self.state[p]["exp_avg"]) for p in params]
        vs = [_local(self.state[p]["exp_avg_sq"]) for p in params]
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - beta1**t) for t in steps])


# Parameter roles. Name fragments of the hidden matrices that Muon takes; the
# rest (embeddings, output head, norms, gates, biases) go to AdamW.
MUON_NAME_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "r_proj", "gate_proj", "up_proj", "down_proj")
NO_DECAY_NAME_PARTS = ("norm", "bias", "gate")  # probe gate: "probe_gate"/"r_gate"; not "gate_proj"


def classify_parameter(name: str, p: Tensor) -> str:
    """'muon', 'adamw' (embedding/output head: decayed) or 'adamw_no_wd' (norms, gates, biases)."""
    leaf = name.rsplit(".", 1)[-1]
    if p.ndim == 2 and leaf == "weight" and any(part in name for part in MUON_NAME_PARTS):
        return "muon"
    if p.ndim < 2 or leaf == "bias":
        return "adamw_no_wd"
    if any(part in name for part in NO_DECAY_NAME_PARTS) and not any(part in name for part in MUON_NAME_PARTS):
        return "adamw_no_wd"
    return "adamw"


def build_param_groups(
    model: torch.nn.Module,
    optimizer: str = "muon",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
) -> list[dict]:
    """Named parameter groups for :class:`MuonAdamW`.

    ``optimizer="muon"``: hidden matrices -> group "muon"; embeddings and output
    head -> "adamw"; norms, gates, biases -> "adamw_no_wd" (weight decay 0).
    ``optimizer="adamw"``: the hidden matrices join the decayed AdamW group
    ("adamw_hidden"), the paper's AdamW-only baseline. Tied parameters appear once.
    """
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    adamw_lr = lr if adamw_lr is None else adamw_lr
    buckets: dict[str, list] = {"muon": [], "adamw": [], "adamw_no_wd": []}
    names: dict[str, list[str]] = {k: [] for k in buckets}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = classify_parameter(name, p)
        buckets[role].append(p)
        names[role].append(name)
    groups = []
    if buckets["muon"]:
        if optimizer == "muon":
            groups.append(dict(name="muon", kind="muon", params=buckets["muon"], param_names=names["muon"],
                               lr=lr, weight_decay=weight_decay))
        else:
            groups.append(dict(name="adamw_hidden", kind="adamw", params=buckets["muon"],
                               param_names=names["muon"], lr=adamw_lr, weight_decay=weight_decay))
    if buckets["adamw"]:
        groups.append(dict(name="adamw", kind="adamw", params=buckets["adamw"], param_names=names["adamw"],
                           lr=adamw_lr, weight_decay=weight_decay))
    if buckets["adamw_no_wd"]:
        groups.append(dict(name="adamw_no_wd", kind="adamw", params=buckets["adamw_no_wd"],
                           param_names=names["adamw_no_wd"], lr=adamw_lr, weight_decay=0.0))
    return groups


def build_optimizer(
    model: torch.nn.Module,
    optimizer: str = "muon",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    adjust_lr: str = "match_rms_adamw",
    momentum: float = 0.95,
    betas: tuple[float, float] = (0.9, 0.95),
    ns_dtype: torch.dtype | None = None,
) -> MuonAdamW:
    """The training recipe's optimizer for ``model`` (see :func:`build_param_groups`).

    ``ns_dtype=None`` picks bf16 Newton-Schulz on CUDA (as the reference does)
    and fp32 elsewhere, where bf16 matmuls are slow and gain nothing.
    """
    if ns_dtype is None:
        first = next(model.parameters())
        ns_dtype = torch.bfloat16 if first.device.type == "cuda" else torch.float32
    groups = build_param_groups(model, optimizer, lr, weight_decay, adamw_lr)
    return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                     adjust_lr=adjust_lr, ns_dtype=ns_dtype, betas=betas)
