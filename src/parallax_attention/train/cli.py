"""`plx train`: train a Parallax (or softmax) model with the Muon recipe.

    plx train --preset tiny --attention parallax --optimizer muon --steps 300 --out runs/p
    torchrun --nproc_per_node 2 $(command -v plx) train ... --parallel fsdp

Settings resolve as: defaults < --config FILE.yaml < flags < KEY=VALUE overrides
(``model.NAME=VALUE`` sets a model-config field, e.g. model.num_hidden_layers=4).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that only flags given on the command line override --config.
    p.add_argument("--preset", choices=("tiny", "0.6b", "1.7b"), default=None, help="model size (default tiny)")
    p.add_argument("--attention", choices=("parallax", "softmax"), default=None, help="default parallax")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default=None,
                   help="muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW only (default muon)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 200)")
    p.add_argument("--out", default=None, help="run directory: metrics.jsonl, checkpoints/, summary.json")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--config", default=None, help="YAML file of settings (keys as in KEY=VALUE)")
    p.add_argument("--data", default=None, help="prepared directory (plx prepare) or 'embedded' (default)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default=None,
                   help="with torchrun: ddp or fsdp (FSDP2)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None)
    p.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                   help="end this invocation after N steps (resume later with --resume)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to DIR/tensorboard")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any TrainConfig field, or model.FIELD")


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .loop import EXIT_NONFINITE, train

    cli = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "command", "_module")}
    cfg = load_config(args.config, cli, args.overrides)
    summary = train(cfg)
    if summary["status"] == "nonfinite":
        return EXIT_NONFINITE
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        vl = summary["val_loss"]
        print(f"done: step {summary['step']}/{summary['steps']}, loss {summary['final_loss']:.4f}"
              + (f", val_loss {vl:.4f}, val_ppl {summary['val_ppl']:.2f}" if vl is not None else "")
              + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""))
    return 0
