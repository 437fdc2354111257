import json
from pathlib import Path

import pytest
import torch

from parallax_attention.cli import main as plx_main
from parallax_attention.data import prepare
from parallax_attention.train import load_config, train
from parallax_attention.train import checkpoint as ckpt

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(3000))

# A one-layer tiny model on short windows: seconds per run on a laptop CPU.
SMALL = ["seq_len=32", "batch_size=4", "model.num_hidden_layers=1", "progress=false", "warmup=2",
         "eval_batches=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for i in range(8):
        (src / f"part{i}.py").write_text(TEXT[i * 10000:(i + 1) * 10000])
    out = tmp_path_factory.mktemp("data") / "bytes"
    prepare(str(src), out, tokenizer="bytes", val_fraction=0.25, progress=False)
    return out


def _cfg(data_dir, out, *extra):
    return load_config(None, {}, [f"data={data_dir}", f"out={out}", *SMALL, *extra])


def _lines(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    common = ["steps=6", "grad_accum=2", "eval_every=3", "ckpt_every=2", "keep_last=2"]
    full = train(_cfg(data_dir, tmp_path / "full", *common))
    first = train(_cfg(data_dir, tmp_path / "cut", *common, "stop_after=3"))
    assert first["step"] == 3
    # The interrupted run wrote checkpoints at 2 and (on stopping) 3.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut")] == [2, 3]
    second = train(_cfg(data_dir, tmp_path / "cut", *common, "resume=true"))
    assert second["resumed_from"].endswith("step_00000003.pt") and second["step"] == 6
    a, b = _lines(tmp_path / "full"), _lines(tmp_path / "cut")
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if "loss" in ra else "val_loss"
        assert abs(ra[key] - rb[key]) <= 1e-4, (ra, rb)
    assert abs(full["val_loss"] - second["val_loss"]) <= 1e-4
    assert a[-1]["val_loss"] < a[0]["loss"]  # it learns
    # keep_last=2 pruned the oldest, and no temporary file was left behind.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut")] == [4, 6]
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if "tmp" in p.name]


def test_metrics_lines_and_summary(data_dir, tmp_path):
    out = tmp_path / "m"
    s = train(_cfg(data_dir, out, "steps=4", "eval_every=2", "optimizer=adamw", "attention=softmax"))
    lines = _lines(out)
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_lines] == [2, 4]
    assert all(r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6) for r in eval_lines)
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in train_lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["optimizer"] == "adamw" and s["step"] == 4
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert {"model", "optimizer", "data", "rng", "step", "schedule"} <= set(state)
    assert {g["kind"] for g in state["optimizer"]["param_groups"]} == {"adamw"}


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import parallax_attention.train.loop as loop

    calls = {"n": 0}
    real = loop.lm_loss

    def poisoned(model, window, reduction="mean"):
        calls["n"] += 1
        loss = real(model, window, reduction)
        return loss * float("nan") if calls["n"] == 4 else loss  # 4th training forward = step 4

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    out = tmp_path / "nan"
    rc = plx_main(["train", "--data", str(data_dir), "--out", str(out), "--steps", "6", *SMALL,
                   "ckpt_every=2", "eval_every=0"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err and "step_00000002.pt" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    lines = _lines(out)
    assert lines[-1]["step"] == 4 and "error" in lines[-1]
    assert max(r["step"] for r in lines if "loss" in r) == 3


def test_config_precedence_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 50\nlr: 0.01\nmodel:\n  num_hidden_layers: 3\n")
    cfg = load_config(y, {"steps": 70, "lr": None}, ["seed=5", "model.hidden_size=96"])
    assert cfg.steps == 70 and cfg.lr == 0.01 and cfg.seed == 5
    assert cfg.model == {"num_hidden_layers": 3, "hidden_size": 96}
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        load_config(None, {}, ["stepz=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, {}, ["steps"])
    with pytest.raises(ValueError, match="optimizer"):
        load_config(None, {}, ["optimizer=sgd"])
    # Values are converted to the field's type ("3e-3" is a string to YAML 1.1).
    cfg = load_config(None, {}, ["lr=3e-3", "steps=10", "resume=true"])
    assert cfg.lr == 0.003 and cfg.steps == 10 and cfg.resume is True
    with pytest.raises(ValueError, match="steps: expected int"):
        load_config(None, {}, ["steps=ten"])
    y.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_config(y)


def test_checkpoint_atomic_save_and_prune(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint({"step": step, "x": torch.arange(3)}, tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    # A half-written temporary file is never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".step_00000009.pt.tmp123").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 3


def test_compare_tiny_example_prints_table_and_writes_plot(data_dir, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, str(root / "examples" / "compare_tiny.py"), "--steps", "4",
                           "--data", str(data_dir), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("final train loss", "final val loss", "val perplexity", "train tokens/s"):
        assert row in proc.stdout
    assert (out / "loss_curves.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert res["runs"]["parallax"]["attention"] == "parallax" and res["runs"]["softmax"]["step"] == 4
