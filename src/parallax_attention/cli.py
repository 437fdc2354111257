"""`plx`: the command-line entry point.

Each subcommand lives in the module that owns its concept and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them up,
importing a module when its subcommand is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (name, module, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("convert", "parallax_attention.models.convert",
     "convert a Hugging Face Qwen3/Qwen2/Llama checkpoint to parallax_qwen3 (zero probe)"),
    ("prepare", "parallax_attention.data.prepare",
     "tokenise text files, the embedded corpus or a HF dataset into token shards"),
    ("train", "parallax_attention.train.cli",
     "train a Parallax or softmax model (Muon recipe; torchrun for DDP/FSDP2)"),
    ("export", "parallax_attention.train.export",
     "write a training run's checkpoint as a Hugging Face model directory (with its tokenizer)"),
    ("generate", "parallax_attention.models.generation",
     "generate text from a model directory (static cache; CUDA-graph decoding on a GPU)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plx",
        description="Parallax attention: kernels, models, conversion and training.",
    )
    parser.add_argument("--version", action="version", version=f"parallax-attention {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Argument definitions are cheap to import; heavy imports stay inside run().
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
