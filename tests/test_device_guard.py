"""The Triton entry points launch on their inputs' GPU, not on whichever device is current."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")
from parallax_attention.ops.triton import decode, norm_rope, train  # noqa: E402
from parallax_attention.ops.triton._device import on_input_device  # noqa: E402


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:1 (no GPU needed)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def _record_switches(monkeypatch, current):
    switched = []

    @contextlib.contextmanager
    def device(d):
        switched.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    return switched


def test_switches_to_the_inputs_gpu(monkeypatch):
    switched = _record_switches(monkeypatch, current=0)
    seen = []
    f = on_input_device(lambda x, *rest, **kw: seen.append((rest, kw)) or "result")
    x = torch.zeros(2).as_subclass(_OnSecondGpu)
    assert f(x, 3, key=4) == "result"
    assert switched == [torch.device("cuda", 1)] and seen == [((3,), {"key": 4})]


def test_stays_when_already_current_or_on_cpu(monkeypatch):
    switched = _record_switches(monkeypatch, current=1)
    f = on_input_device(lambda *a: "ok")
    assert f(None, torch.zeros(2).as_subclass(_OnSecondGpu)) == "ok"   # first tensor argument decides
    assert f(torch.zeros(2)) == "ok"
    assert switched == []


def test_entry_points_are_guarded():
    # the functions that launch kernels from the caller's thread (backward runs on autograd's
    # per-device thread, which already has the tensors' device current)
    for fn in (train.fwd, train.bwd, norm_rope._forward, decode.decode_triton):
        assert fn.__wrapped__ is not None, fn
