"""`lisa-fused` command line (also `python -m lisa_fused`).

    lisa-fused bench [options]   fine-tune one model with full AdamW, LoRA and FusedLISA; table + JSON + PNG
    lisa-fused plan MODEL [...]  predicted peak memory per method and state setting; what fits --gpu-mem

Arguments are parsed before torch is imported (names come from torch-free modules: lisa_fused.presets,
lisa_fused.bench's METHODS, SAMPLER_NAMES below), so --help and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import presets
from .bench import DEFAULT_METHODS, GROUPS, METHODS, PEERS

# = lisa_fused.sampling.SAMPLER_NAMES, which imports torch (tests/test_cli_fast.py keeps them equal)
SAMPLER_NAMES = ("uniform", "weight_norm", "grad_norm", "outlier", "loss_feedback")


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


def _name_list(kind: str, allowed):
    """An argparse type for a comma-separated list of distinct `kind` names from `allowed`."""

    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {kind} {name!r}; choose from {','.join(allowed)}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a {kind} is listed twice: {text!r}")
        return names

    return parse


_samplers = _name_list("sampler", SAMPLER_NAMES)


def _methods(text: str) -> list[str]:
    """--methods: a comma list of METHODS and GROUPS names ("peers", "default"), groups expanded in place;
    a method a group brings twice is kept once, a name written twice is an error."""
    names = _name_list("method", (*METHODS, *GROUPS))(text)
    out: list[str] = []
    for name in names:
        out += [m for m in GROUPS.get(name, (name,)) if m not in out]
    return out


class _Parser(argparse.ArgumentParser):
    """Errors are one line naming the bad value (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where there is a default to show and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        default = ",".join(action.default) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


PLAN_METHODS = ("full", "lora", "lisa", "badam")


def _plan_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [n for n in names if n not in PLAN_METHODS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct methods from {','.join(PLAN_METHODS)}")
    return names


def _size(text: str) -> int:
    from .plan.report import parse_size  # torch-free (plan/__init__ imports the planner lazily)

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--gpu-mem ")) from None


PLAN_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="predict peak memory per method and state setting; what fits --gpu-mem",
        description="Predict the peak memory of one training step (weights, trainable state, activations "
                    "and temporaries, logits and loss included) for full AdamW, LoRA, each FusedLISA "
                    "setting and BAdam, without downloading or allocating the model: it is built on the meta "
                    "device, the optimizers run on it and one step is traced with fake tensors.",
        formatter_class=_HelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help=f"a preset ({', '.join(presets.names())}), a config.json or a local model folder")
    p.add_argument("--gpu-mem", type=_size, default=None, metavar="SIZE",
                   help="device memory to fit, e.g. 24GiB, 80GB (G = GiB); without it no fit columns")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="sequences per step")
    p.add_argument("--seq-len", type=_int_at_least(2), default=1024, help="tokens per sequence")
    p.add_argument("--dtype", choices=sorted(PLAN_DTYPES), default="bf16", help="parameter dtype")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="trace with transformers' gradient checkpointing (non-reentrant)")
    p.add_argument("--methods", type=_plan_methods, default=list(PLAN_METHODS),
                   help="comma list of full,lora,lisa,badam (lisa: one row per FusedLISA setting; badam: BAdam's "
                        "BlockOptimizer, traced when pip badam is installed, else listed as skipped)")
    p.add_argument("--lora-rank", type=_int_at_least(1), default=128, help="LoRA rank on every projection")
    p.add_argument("--gamma", type=_int_at_least(1), default=2, help="FusedLISA active blocks")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="whose memory to predict (cpu: the host store counts in the peak)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the plan as JSON (fields: "
                   "lisa_fused/plan/__init__.py)")
    p.set_defaults(subparser=p)


def run_plan(args) -> int:
    import torch

    from . import __version__
    from .plan import load_config, plan, to_json
    from .plan.report import format_plan

    parser = args.subparser
    try:
        config = load_config(args.model)
        rows, skipped, planner = plan(
            config, dtype=getattr(torch, PLAN_DTYPES[args.dtype]), batch_size=args.batch_size,
            seq_len=args.seq_len, target=args.device, gradient_checkpointing=args.gradient_checkpointing,
            methods=args.methods, lora_rank=args.lora_rank, gamma=args.gamma, gpu_mem=args.gpu_mem)
    except ValueError as exc:
        parser.error(str(exc).splitlines()[0])
    header = {"model": args.model, "model_type": config.model_type, "dtype": PLAN_DTYPES[args.dtype],
              "batch_size": args.batch_size, "seq_len": args.seq_len,
              "gradient_checkpointing": args.gradient_checkpointing, "lora_rank": args.lora_rank,
              "gamma": args.gamma, "target": args.device, "traced_on": planner.trace_device,
              "gpu_mem_bytes": args.gpu_mem, "n_blocks": planner.n_blocks, "lisa_fused_version": __version__}
    title = (f"{args.model} ({config.model_type}, {planner.n_blocks} blocks), {header['dtype']}, batch "
             f"{args.batch_size} x seq {args.seq_len}" + (", gradient checkpointing" if args.gradient_checkpointing
                                                          else "") + f"; predicted for {args.device}")
    print(format_plan(title, rows, skipped, args.gpu_mem, args.device))
    if args.gpu_mem and rows and not any(r.fits for r in rows):
        act = min(rows, key=lambda r: r.peak_bytes)
        print(f"nothing fits {args.gpu_mem / 2**30:.1f} GiB (the leanest row needs {act.peak_bytes / 2**30:.2f} GiB, "
              f"{act.activation_bytes / 2**30:.2f} of it activations): "
              + ("try --gradient-checkpointing, " if not args.gradient_checkpointing else "")
              + "a shorter --seq-len or a smaller --batch-size, or more memory")
    if planner.trace_device != args.device:
        print(f"note: traced on {planner.trace_device} fake tensors (this torch has no {args.device}); "
              f"temporaries follow {planner.trace_device} kernels")
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(header, rows, skipped))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `lisa-fused` parser; building it and parsing with it import no torch."""
    from . import __version__

    parser = _Parser(prog="lisa-fused", description="FusedLISA tools.")
    parser.add_argument("--version", action="version", version=f"lisa-fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "bench", help="fine-tune a model with full AdamW, LoRA and FusedLISA and compare them",
        description="Fine-tune one model with each method on identical data, order and seeds, each in its "
                    "own process; print a table and write results.json, results.md and bench.png to --out. "
                    "The default (tiny preset) runs offline in about three minutes on a quiet 2-core CPU "
                    "(base training once, then each method twice: a memory pass and a timed pass).",
        formatter_class=_HelpFormatter)
    b.add_argument("--preset", choices=(*presets.BENCH_NAMES, *presets.ALIASES), default="tiny", metavar="PRESET",
                   help="model shape, random init, no download: " + ", ".join(presets.BENCH_NAMES) + " (the same as "
                        "`lisa-fused plan`'s; llama-1b = llama-3.2-1b); all but tiny are meant for a GPU")
    b.add_argument("--model", metavar="PATH", help="local Hugging Face checkpoint directory (overrides --preset)")
    b.add_argument("--data", metavar="PATH", help="fine-tuning text: a .txt file, or .jsonl with a \"text\" field "
                   "(default: the Python reference docs in pydoc_data, part of the standard library)")
    b.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                   help="comma list of " + ",".join(METHODS) + " (lora-fa: LoRA with A frozen, peft's LoRA-FA "
                        "optimizer), or peers (= " + ",".join(PEERS) + ": FusedLISA against BAdam, LISA as the "
                        "published callbacks run it, GaLore and 8-bit AdamW from torchao and bitsandbytes; "
                        'pip install "lisa_fused[peers]"; a peer whose package is missing is reported as skipped)')
    b.add_argument("--samplers", type=_samplers, default=["uniform"],
                   help=f"comma list of FusedLISA samplers ({','.join(SAMPLER_NAMES)}): "
                        "each lisa method runs once per sampler")
    b.add_argument("--seeds", type=_int_at_least(1), default=1,
                   help="repeat each method (but full, which is deterministic) with seeds seed..seed+N-1 of the "
                        "LISA draws and the LoRA init, on the same data; the report adds eval loss mean ± std")
    b.add_argument("--steps", type=_int_at_least(1), default=40, help="fine-tuning steps per method")
    b.add_argument("--base-steps", type=_int_at_least(0), default=None,
                   help="base-training steps before fine-tuning (default: 100 for tiny, 0 otherwise)")
    b.add_argument("--batch-size", type=_int_at_least(1), default=4, help="sequences per step")
    b.add_argument("--seq-len", type=_int_at_least(2), default=128, help="tokens per sequence")
    b.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    b.add_argument("--dtype", type=lambda t: PLAN_DTYPES.get(t, t), choices=sorted(set(PLAN_DTYPES.values())),
                   default=None,
                   help="parameter dtype, also bf16/fp16/fp32 as in `plan` (default: float32 for tiny, bfloat16 "
                        "for the large presets)")
    b.add_argument("--gamma", type=_int_at_least(1), default=2, help="FusedLISA active blocks")
    b.add_argument("--switch-every", type=_int_at_least(1), default=8, help="FusedLISA K: steps per interval")
    b.add_argument("--lora-rank", type=_int_at_least(1), default=16, help="LoRA rank (alpha = 2 x rank)")
    b.add_argument("--lr", type=_positive_float, default=3e-4, help="learning rate of full, lisa, lisa-device")
    b.add_argument("--lora-lr", type=_positive_float, default=1e-3, help="learning rate of lora")
    b.add_argument("--eval-windows", type=_int_at_least(1), default=64, help="held-out windows of --seq-len")
    b.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and LISA's sampler")
    b.add_argument("--out", default="lisa_fused_bench", help="output folder")
    b.add_argument("--cache-dir", default=None, help="data, base checkpoint and per-method files (default: OUT/cache)")
    b.add_argument("--force", action="store_true",
                   help="run even when the planner says a method will not fit or the run will take hours")
    b.set_defaults(subparser=b)
    _add_plan(sub)
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
    if "lisa-4bit-sr" in args.methods and args.dtype != "bfloat16":
        parser.error(f"--methods lisa-4bit-sr: master_weights='stochastic' needs bf16 params, --dtype is "
                     f"{args.dtype}: add --dtype bfloat16")
    if args.gamma > n and any(m.startswith("lisa") for m in args.methods):  # lisa-published too
        parser.error(f"--gamma {args.gamma}: larger than the model's {n} layers")
    return args


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--gpu-mem -3GiB` -> `--gpu-mem=-3GiB`: argparse would take '-3GiB' for an option and say only
    "expected one argument"; joined, the value reaches its parser, which names what is wrong with it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--gpu-mem" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--gpu-mem={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _passive_openmp(argv: list[str]) -> None:
    """Re-run this bench with OMP_WAIT_POLICY=PASSIVE unless the user set it: on small shared CPUs,
    OpenMP threads that spin while waiting slow torch's per-tensor kernels down ~10x (README). It must
    be set before libgomp loads, i.e. in a fresh process; the children inherit it."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    from .bench import this_package_code

    print("lisa-fused bench: running with OMP_WAIT_POLICY=PASSIVE (set OMP_WAIT_POLICY yourself to choose)",
          file=sys.stderr, flush=True)
    code = this_package_code("from lisa_fused.cli import main; sys.exit(main())")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-c", code, *argv], dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))


def main(argv=None) -> int:
    command_line = argv is None  # the `lisa-fused` command, not a call from Python (tests, notebooks)
    argv = _join_dash_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        return run_plan(args)
    args = resolve_bench_args(args)
    if command_line and args.device.startswith("cpu"):
        _passive_openmp(argv)
    from .bench.bench import run_bench

    try:
        return run_bench(args, argv)
    except KeyboardInterrupt:
        print("\nlisa-fused bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
