"""benchmarks/sm90_registers.py compiles the training kernels for Hopper on a machine without a GPU."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sm90_registers.py"


ROW = re.compile(r"^\| (_\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| (\d+) / (\d+) \| (\d+) \| "
                 r"(yes|no) \| (.*) \|$", re.M)


def _report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "1,4,2,256,64", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(out.stdout)}
    assert set(rows) == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_tma_kernel"}, out.stdout
    return rows


def _wgmma(cell: str) -> dict:
    """'m64n64k16 RS x 16, m64n64k16 SS x 16' -> {('m64n64k16', 'RS'): 16, ...}"""
    out = {}
    for part in cell.split(", "):
        shape, src, _, n = part.split()
        out[(shape, src)] = int(n)
    return out


def test_reports_each_kernel():
    for warps, stages, regs, stack, ldl, stl, loop_ldl, loop_stl, smem, _, wgmma in _report().values():
        # a compiled kernel: registers within the hardware's per-thread limit, shared memory used,
        # warp-group MMAs in the PTX, spill loads and stores only with a spill frame, and those in
        # the MMA loops a part of all of them
        assert 0 < int(regs) <= 255 and int(smem) > 0
        assert sum(_wgmma(wgmma).values()) > 0
        assert (int(ldl) + int(stl) > 0) <= (int(stack) > 0)
        assert int(loop_ldl) <= int(ldl) and int(loop_stl) <= int(stl)


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "TRITON_INTERPRET" in out.stderr
