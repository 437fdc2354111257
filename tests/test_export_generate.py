"""`plx export` (training run -> Hugging Face model directory) and `plx generate` on the result."""

import pytest
import torch

pytest.importorskip("transformers")
from parallax_attention.cli import main as plx_main  # noqa: E402
from parallax_attention.data import prepare  # noqa: E402
from parallax_attention.data.tokenizer import BPETokenizer  # noqa: E402
from parallax_attention.train import checkpoint as ckpt  # noqa: E402
from parallax_attention.train import load_config, train  # noqa: E402

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(2000))
SMALL = ["seq_len=32", "batch_size=4", "model.num_hidden_layers=1", "progress=false", "warmup=1", "eval_batches=1",
         "steps=3", "ckpt_every=3"]


def _run(tmp_path_factory, tokenizer):
    src = tmp_path_factory.mktemp("src")
    for i in range(4):
        (src / f"part{i}.py").write_text(TEXT[i * 20000:(i + 1) * 20000])
    data = tmp_path_factory.mktemp("data") / tokenizer
    prepare(str(src), data, tokenizer=tokenizer, vocab_size=300, val_fraction=0.25, progress=False)
    out = tmp_path_factory.mktemp("run")
    train(load_config(None, {}, [f"data={data}", f"out={out}", *SMALL]))
    return data, out


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    return _run(tmp_path_factory, "bpe")


def test_export_loads_with_auto_classes_and_matches_the_checkpoint(bpe_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallax_attention.models import ParallaxForCausalLM
    from parallax_attention.train.config import TrainConfig
    from parallax_attention.train.loop import build_model

    data, run = bpe_run
    dst = tmp_path / "model"
    assert plx_main(["export", str(run), str(dst)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, ParallaxForCausalLM)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    ref = build_model(TrainConfig(**state["config"]), model.config.vocab_size, torch.device("cpu")).eval()
    ref.load_state_dict(state["model"])
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(dst)
    ours = BPETokenizer.load(data / "tokenizer.json")
    text = "def f12(x):\n    return x * 12"
    assert tok(text)["input_ids"] == ours.encode(text).tolist()
    assert tok.eos_token_id == ours.eos_id == model.config.eos_token_id
    # a non-empty destination needs --overwrite
    assert plx_main(["export", str(run), str(dst)]) == 2
    assert plx_main(["export", str(run), str(dst), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(dst).dtype == torch.bfloat16


def test_generate_cli_matches_the_generator(bpe_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from parallax_attention.models import ParallaxForCausalLM, StaticGenerator

    _, run = bpe_run
    dst = tmp_path / "model"
    assert plx_main(["export", str(run), str(dst)]) == 0
    capsys.readouterr()
    prompts = ["def f3(x):\n    return", "def f1"]
    argv = ["generate", str(dst), "--max-new-tokens", "7", "--device", "cpu"]
    for p in prompts:
        argv += ["--prompt", p]
    assert plx_main(argv) == 0
    lines = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(dst)
    model = ParallaxForCausalLM.from_pretrained(dst).eval()
    expected = []
    for p in prompts:  # one by one: the CLI's padded batch must give the same continuations
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = StaticGenerator(model, 1, ids.shape[1] + 7).generate(ids, 7, eos_token_id=tok.eos_token_id)
        row = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        expected.append(p + tok.decode(row))
    assert lines == "".join(e + "\n" for e in expected)


def test_export_and_generate_errors(tmp_path_factory, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert plx_main(["export", str(empty), str(tmp_path / "dst")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    # a byte-level run exports the model only; generate says why it cannot decode text
    _, run = _run(tmp_path_factory, "bytes")
    assert plx_main(["export", str(run), str(tmp_path / "bytes_model"), "--step", "7"]) == 2
    assert "step" in capsys.readouterr().err
    assert plx_main(["export", str(run), str(tmp_path / "bytes_model")]) == 0
    assert (tmp_path / "bytes_model" / "config.json").is_file()
    assert not (tmp_path / "bytes_model" / "tokenizer.json").exists()
    assert plx_main(["generate", str(tmp_path / "bytes_model"), "--prompt", "x", "--device", "cpu"]) == 2
    assert "tokenizer" in capsys.readouterr().err
