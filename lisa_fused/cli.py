"""`lisa-fused` command line (also `python -m lisa_fused`).

    lisa-fused bench [options]   fine-tune one model with full AdamW, LoRA and FusedLISA; table + JSON + PNG
"""
from __future__ import annotations

import argparse
import os
import sys


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _methods(text: str) -> list[str]:
    from .bench.methods import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {','.join(METHODS)}")
    if not names:
        raise argparse.ArgumentTypeError("no method given")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice: {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from .bench.methods import METHODS
    from .bench.models import DTYPES, PRESETS

    parser = argparse.ArgumentParser(prog="lisa-fused", description="FusedLISA tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "bench", help="fine-tune a model with full AdamW, LoRA and FusedLISA and compare them",
        description="Fine-tune one model with each method on identical data, order and seeds, each in its "
                    "own process; print a table and write results.json, results.md and bench.png to --out. "
                    "The default (tiny preset) runs offline on a CPU in about two minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="Llama-architecture model built from a LlamaConfig (random init, no download); "
                        "llama-1b and llama-2-7b are meant for a GPU")
    b.add_argument("--model", metavar="PATH", help="local Hugging Face checkpoint directory (overrides --preset)")
    b.add_argument("--data", metavar="PATH", help="fine-tuning text: a .txt file, or .jsonl with a \"text\" field "
                   "(default: the Python reference docs in pydoc_data, part of the standard library)")
    b.add_argument("--methods", type=_methods, default=list(METHODS), help="comma list of " + ",".join(METHODS))
    b.add_argument("--steps", type=_int_at_least(1), default=40, help="fine-tuning steps per method")
    b.add_argument("--base-steps", type=_int_at_least(0), default=None,
                   help="base-training steps before fine-tuning (default: 100 for tiny, 0 otherwise)")
    b.add_argument("--batch-size", type=_int_at_least(1), default=4)
    b.add_argument("--seq-len", type=_int_at_least(2), default=128)
    b.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: float32 for tiny, bfloat16 for the large presets)")
    b.add_argument("--gamma", type=_int_at_least(1), default=2, help="FusedLISA active blocks")
    b.add_argument("--switch-every", type=_int_at_least(1), default=8, help="FusedLISA K: steps per interval")
    b.add_argument("--lora-rank", type=_int_at_least(1), default=16, help="LoRA rank (alpha = 2 x rank)")
    b.add_argument("--lr", type=_positive_float, default=3e-4, help="learning rate of full, lisa, lisa-device")
    b.add_argument("--lora-lr", type=_positive_float, default=1e-3, help="learning rate of lora")
    b.add_argument("--eval-windows", type=_int_at_least(1), default=64, help="held-out windows of --seq-len")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="lisa_fused_bench", help="output folder")
    b.add_argument("--cache-dir", default=None, help="data, base checkpoint and per-method files (default: OUT/cache)")
    b.set_defaults(subparser=b)
    return parser


def resolve_bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill preset-dependent defaults and check what needs more than one argument; parser.error names the value."""
    import torch

    parser = args.subparser
    from .bench.models import PRESET_DEFAULTS, model_config, num_layers

    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r}: no such directory")
    if args.data is not None:
        if not os.path.isfile(args.data):
            parser.error(f"--data {args.data!r}: no such file")
        if not args.data.endswith((".txt", ".jsonl")):
            parser.error(f"--data {args.data!r}: expected a .txt or .jsonl file")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: not a torch device (use cpu or cuda[:N])")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.model is None:
        defaults = PRESET_DEFAULTS[args.preset]
    else:
        defaults = {"dtype": "float32" if device.type == "cpu" else "bfloat16", "base_steps": 0}
    args.dtype = args.dtype or defaults["dtype"]
    args.base_steps = defaults["base_steps"] if args.base_steps is None else args.base_steps
    if args.model is not None and args.base_steps > 0:
        parser.error(f"--base-steps {args.base_steps}: a --model checkpoint is already trained; use 0")
    try:
        config = model_config(args.preset, args.model)
    except (OSError, ValueError) as exc:
        parser.error(f"--model {args.model!r}: cannot read its config: {exc}")
    n = num_layers(config)
    if args.gamma > n and any(m.startswith("lisa") for m in args.methods):
        parser.error(f"--gamma {args.gamma}: larger than the model's {n} layers")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # "bench" is the only command so far
    args = resolve_bench_args(args)
    from .bench.bench import run_bench

    return run_bench(args, argv)


if __name__ == "__main__":
    sys.exit(main())
