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


def test_reports_each_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--shape", "1,4,2,256,64"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m.group(1): m.groups()[1:] for m in
            re.finditer(r"^\| (_\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (yes|no) \|$", out.stdout, re.M)}
    assert set(rows) == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_tma_kernel"}, out.stdout
    for warps, stages, regs, stack, smem, _ in rows.values():
        # a compiled kernel: registers within the hardware's per-thread limit, shared memory used
        assert 0 < int(regs) <= 255 and int(smem) > 0


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "TRITON_INTERPRET" in out.stderr
