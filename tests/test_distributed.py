"""Two CPU processes (gloo) under torchrun: DDP and FSDP2 match one process; Muon under FSDP2."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from parallax_attention.data import prepare
from parallax_attention.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "a.py").write_text("".join(f"x{i} = {i} * y + {i % 5}\n" for i in range(4000)))
    (src / "b.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 600)
    out = tmp_path_factory.mktemp("data") / "bytes"
    prepare(str(src), out, tokenizer="bytes", val_fraction=0.0, progress=False)
    return out


ARGS = ["--seq-len", "32", "--batch-size", "2", "--steps", "3", "--no-progress", "grad_accum=2",
        "model.num_hidden_layers=1", "warmup=1", "eval_every=0", "ckpt_every=3"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_keep_gathered"])
def test_two_processes_match_one_and_resume_in_one(data_dir, tmp_path, mode):
    extra = ["fsdp_reshard_after_forward=false"] if mode == "fsdp_keep_gathered" else []
    # One process with the same global batch: micro-batch 2 x accumulation 4.
    one_proc = [f"data={data_dir}", "seq_len=32", "batch_size=2", "steps=3", "progress=false", "grad_accum=4",
                "model.num_hidden_layers=1", "warmup=1", "eval_every=0", "ckpt_every=3"]
    train(load_config(None, {}, one_proc + [f"out={tmp_path / 'one'}"]))
    # Two processes (micro-batch 2 x accumulation 2 each), interrupted after step 2 ...
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "parallax_attention.cli", "train", "--data", str(data_dir),
           "--out", str(tmp_path / mode), "--parallel", mode.split("_")[0], "--device", "cpu", "--stop-after", "2",
           *ARGS, *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from parallax_attention.train import checkpoint as ckpt

    # ... leaving a checkpoint of full (unsharded) tensors ...
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / mode))
    assert state["step"] == 2
    q = [v for k, v in state["model"].items() if k.endswith("layers.0.self_attn.q_proj.weight")][0]
    assert type(q).__name__ == "Tensor" and q.shape[0] == q.shape[1]
    # ... that a single process resumes for step 3.
    train(load_config(None, {}, one_proc + [f"out={tmp_path / mode}", "resume=true"]))
    read = lambda d, key: [json.loads(ln)[key] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                           if "\"loss\"" in ln]
    one, two = read("one", "loss"), read(mode, "loss")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)
    # The gradient norm (summed over the ranks' shards under FSDP2) is the one process's, and
    # above grad_clip=1, so the clipped updates behind the equal losses were clipped.
    gn_one, gn_two = read("one", "grad_norm"), read(mode, "grad_norm")
    for a, b in zip(gn_one[:2], gn_two[:2]):
        assert a > 1.0 and abs(a - b) < 1e-4 * a, (gn_one, gn_two)


@pytest.mark.parametrize("nproc", [2, 3])
def test_muon_under_fsdp2_orthogonalises_full_matrices(nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "benchmarks" / "multi_gpu.py"), "--check-muon", "--cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("MUON_CHECK ")][-1].split(" ", 1)[1])
    assert res["world_size"] == nproc
    assert res["max_rel_err_fsdp"] < 1e-4
    assert all(set(p["rel_err_by_mode"]) == {"round_robin", "redundant", "round_robin, small buckets",
                                             "round_robin, hybrid mesh"} for p in res["params"])
    # 75 rows split unevenly over 2 ranks, 40 over 3; the one-row matrix leaves the other ranks empty
    # shards; the two 40 x 40 matrices share one owner under 3 ranks (one batched Newton-Schulz).
    assert sorted(p["shape"][0] for p in res["params"]) == [1, 40, 40, 40, 75]
    # The check can tell the right update from orthogonalising each shard separately.
    assert res["min_rel_err_shardwise"] > 0.1


def _driver(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--smoke", "--gpus", "1,2", "--out",
           str(tmp_path), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_scaling_driver_compares_two_processes_with_one(tmp_path):
    # The benchmark's own bookkeeping, on 1 and 2 gloo processes: both runs finish, the 2-process
    # losses follow the 1-process run to float32 rounding, the scaling row is computed, and the
    # Muon check it runs last holds; --reuse then takes the 1-process run from the JSON.
    _driver(tmp_path / "a", "--no-noise-ref")
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    runs = {r["n"]: r for r in res["runs"]}
    assert set(runs) == {1, 2} and not any("error" in r for r in runs.values())
    assert len(runs[2]["losses"]) == res["steps"] and runs[2]["compare_k"] == res["steps"]
    assert runs[2]["max_abs_loss_diff_first_k"] < 1e-4
    assert runs[2]["scaling_efficiency"] == pytest.approx(runs[2]["tokens_per_s_per_gpu"] / runs[1]["tokens_per_s"])
    assert res["muon_check"]["world_size"] == 2 and res["muon_check"]["max_rel_err_fsdp"] < 1e-4
    out = _driver(tmp_path / "b", "--no-noise-ref", "--reuse", str(tmp_path / "a" / "results.json")).stdout
    assert "taken from" in out
    reused = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    assert reused[0]["losses"] == runs[1]["losses"] and "reused_from" in reused[0]


def test_step_phases_driver(tmp_path):
    # --phases --smoke times the tiny preset's step parts with 1 and 2 processes (it once ignored
    # --smoke and built the 0.6b model at L=4096)
    out = _driver(tmp_path, "--phases", "--no-reshard").stdout
    assert "tiny parallax, L=64" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(rows) == 2
