"""The whole benchmark: prepare data and one base checkpoint, run each method in its own process on
identical data, order and seeds, then write the table, JSON and PNG."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import lisa_fused

from . import (DETERMINISTIC, FUSED_LISA_METHODS, PEER_PACKAGES, data, install_line, preflight, report, summary,
               this_package_code)
from .models import DTYPES, build_model, load_tokenizer, model_config
from .run import evaluate, train

BASE_LR = 1e-3
BASE_WARMUP = 10


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_data(args, cache: Path) -> tuple[Path, dict]:
    """Token streams for base training, fine-tuning and held-out eval, saved once for every process."""
    tokenizer = load_tokenizer(args.model)
    try:
        ft = data.finetune_corpus(args.data)
    except (ValueError, UnicodeDecodeError) as exc:
        args.subparser.error(f"--data {args.data!r}: {exc}")
    source = f"--data {args.data!r}" if args.data else f"the built-in data ({ft.name})"
    tokens = {"ft_train": data.encode_documents(ft.train, tokenizer),
              "ft_eval": data.encode_documents(ft.eval, tokenizer)}
    for split, need in (("ft_train", args.seq_len + 1), ("ft_eval", args.seq_len)):
        if len(tokens[split]) < need:
            args.subparser.error(f"{source}: its {split.removeprefix('ft_')} split has "
                                 f"{len(tokens[split])} tokens, fewer than --seq-len {args.seq_len} needs ({need})")
    info = {"finetune_text": ft.name, "tokens": "bytes (vocab 256 + BOS/EOS/PAD)" if tokenizer is None
            else f"tokenizer of {args.model}"}
    if args.base_steps > 0:
        tokens["base_train"] = data.encode_documents(data.base_corpus(), tokenizer)
        info["base_text"] = "stdlib source: " + ",".join(data.BASE_MODULES)
    info.update({f"{k}_tokens": len(v) for k, v in tokens.items()})
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tokens.values())).hexdigest()[:12]
    info["tokens_sha256"] = digest
    path = cache / f"data-{digest}.pt"
    if not path.exists():
        torch.save(tokens, path)
    return path, info


def base_checkpoint(args, config, data_path: Path, cache: Path) -> tuple[str | None, dict]:
    """Train the base model once (full AdamW, warmup + cosine) and cache it; None when --base-steps 0."""
    if args.base_steps == 0:
        return None, {}
    key = _key([config.to_dict(), args.base_steps, args.batch_size, args.seq_len, args.seed, args.dtype,
                data_path.name, BASE_LR])
    path = cache / f"base-{key}.pt"
    info = {"base_steps": args.base_steps, "base_lr": BASE_LR, "base_schedule": f"{BASE_WARMUP} warmup, cosine",
            "base_checkpoint": str(path)}
    if path.exists():
        return str(path), info
    device = torch.device(args.device)
    tokens = torch.load(data_path, weights_only=True)["base_train"]
    model = build_model(config, model_path=args.model, dtype=DTYPES[args.dtype], device=device, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    total = args.base_steps

    def lr_at(step):
        if step < BASE_WARMUP:
            return (step + 1) / BASE_WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - BASE_WARMUP) / max(1, total - BASE_WARMUP)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    starts = data.batch_starts(len(tokens), total, args.batch_size, args.seq_len, args.seed + 1)
    trace = train(model, opt, tokens, starts, args.seq_len, device, desc="base training (once, cached)", scheduler=sched)
    info["base_final_train_loss"] = sum(trace["loss"][-5:]) / len(trace["loss"][-5:])
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return str(path), info


def run_one(spec: dict, cache: Path) -> tuple[dict | None, str | None]:
    """Run one method in a fresh Python process; (row, None) or (None, why it failed)."""
    name = spec.get("label", spec["method"]).replace(" ", "_").replace(":", "-")
    spec_path = cache / f"spec-{name}.json"
    result_path = cache / f"result-{name}.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    # The child must import the lisa_fused this process imported (the installed one, with its compiled
    # extension), not a source tree in the working directory: `python -m` would put the cwd first on
    # sys.path. So it runs from the cache folder with the parent's package root first; run.main checks it.
    code = this_package_code(f"from lisa_fused.bench.run import main; "
                             f"sys.exit(main([{str(spec_path)!r}, {str(result_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cache)
    if proc.returncode != 0 or not result_path.exists():
        return None, f"exit code {proc.returncode} (its traceback is above, on stderr)"
    return json.loads(result_path.read_text()), None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} torch threads)"


def versions() -> dict:
    import peft
    import transformers

    import lisa_fused

    root = Path(lisa_fused.__file__).resolve().parent
    try:
        git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = git.stdout.strip() if git.returncode == 0 else "not a git checkout"
    except OSError:
        commit = "git not found"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "lisa_fused": f"{lisa_fused.__version__} ({commit})",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


def missing_package(method: str) -> dict | None:
    """{"method", "reason", "install"} when a peer's package is not installed (found without importing it)."""
    if method not in PEER_PACKAGES:
        return None
    module, _ = PEER_PACKAGES[method]
    if importlib.util.find_spec(module) is not None:
        return None
    return {"method": method, "reason": f"{module} is not installed", "install": install_line(method)}


def peer_versions(methods: list[str]) -> dict:
    """Installed versions of the peers' packages among `methods` (distribution metadata, no import)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in methods:
        if m in PEER_PACKAGES:
            dist = PEER_PACKAGES[m][1].split("==")[0]
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "not installed"
    return out


def run_specs(args, common: dict) -> list[dict]:
    """One spec per row: each method; the FusedLISA ones once per --samplers entry; every method but the
    DETERMINISTIC ones (full AdamW, BAdam, GaLore, 8-bit AdamW: no draws, no random init, fixed data)
    once per seed of --seeds (run_seed = seed + k, data and base weights fixed). Repeats of a method skip
    the CPU memory pass (their memory is the first's)."""
    specs, seen = [], set()
    for method in args.methods:
        samplers = args.samplers if method in FUSED_LISA_METHODS else [None]
        seeds = 1 if method in DETERMINISTIC else args.seeds
        for sampler in samplers:
            for k in range(seeds):
                label = method
                if sampler is not None and args.samplers != ["uniform"]:
                    label += f":{sampler}"
                if seeds > 1:
                    label += f" s{args.seed + k}"
                spec = dict(common, method=method, label=label, run_seed=args.seed + k,
                            memory_pass=method not in seen)
                if sampler is not None:
                    spec["sampler"] = sampler
                specs.append(spec)
                seen.add(method)
    return specs


def run_all(specs: list[dict], cache: Path, planned: dict | None, device_type: str) -> tuple[list, list, list]:
    """Run every spec in its own process: (rows, failures, skipped). A peer whose package is missing is
    skipped without a process (`missing_package`), one that finds it cannot run (bitsandbytes without a
    CPU path) is skipped by its process; either way its other seeds are not tried."""
    rows, failures, skipped = [], [], []
    for spec in specs:
        label, method = spec["label"], spec["method"]
        if any(s["method"] == method for s in skipped):
            continue  # its other seeds
        missing = missing_package(method)
        if missing:
            skipped.append(missing)
            print(f"lisa-fused bench: skipped {method}: {missing['reason']}; {missing['install']}", file=sys.stderr)
            continue
        print(f"== {label} ==", file=sys.stderr, flush=True)
        row, err = run_one(spec, cache)
        if err is None and "skipped" in row:
            skipped.append(dict(row["skipped"], method=method))
            print(f"lisa-fused bench: skipped {method}: {row['skipped']['reason']}", file=sys.stderr)
        elif err is None:
            row["busy"] = report.busy_reason(row, os.cpu_count() or 1)
            if planned:
                row.update(preflight.planned_above_baseline(row, planned, device_type))
            rows.append(row)
        else:
            failures.append({"method": label, "error": err})
            print(f"lisa-fused bench: method {label} failed: {err}", file=sys.stderr)
    return rows, failures, skipped


def run_bench(args, argv: list[str]) -> int:
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cache = cache.resolve()  # the method processes run with the cache as their working directory
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        print(f"lisa-fused bench: the machine is busy (load average {load_start:.1f} on {os.cpu_count()} CPUs); "
              f"step times will be noisy; rows it affected are flagged in the load column", file=sys.stderr)
    config = model_config(args.preset, args.model)
    planned, plan_error = None, None
    try:  # once, here in the parent: never inside a method's process or its timed pass
        planned = preflight.plan_bench(args, config)
    except Exception as exc:  # noqa: BLE001 - the bench runs without the planner column
        plan_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"lisa-fused bench: the planner failed ({plan_error}); no planned MiB column", file=sys.stderr)
    refusal = preflight.check(args, config, planned)
    if refusal:
        print(f"lisa-fused bench: {refusal}", file=sys.stderr)
        return 2
    data_path, data_info = prepare_data(args, cache)
    base_state, base_info = base_checkpoint(args, config, data_path, cache)

    common = {k: getattr(args, k) for k in ("preset", "model", "steps", "batch_size", "seq_len", "device",
                                            "dtype", "gamma", "switch_every", "lora_rank", "lr", "lora_lr",
                                            "seed", "eval_windows")}
    common.update(data_path=str(data_path), base_state=base_state, lisa_fused_file=lisa_fused.__file__)
    common.update(samplers=args.samplers, seeds=args.seeds)
    if torch.device(args.device).type == "cpu":
        print("lisa-fused bench: on a CPU each method runs its steps twice from the same weights: a memory "
              "pass (glibc returns freed memory, so the RSS peak is the method's) and a timed pass (glibc's "
              "fast reuse, so times are not inflated by page faults); their losses must agree",
              file=sys.stderr, flush=True)
    rows, failures, skipped = run_all(run_specs(args, common), cache, planned, torch.device(args.device).type)

    header = {
        "device": device_name(torch.device(args.device)),
        **versions(),
        "peer_versions": peer_versions(args.methods),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["lisa-fused", *map(shlex.quote, argv)]),
        "load_avg": [load_start, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "config": {**common, "methods": args.methods, "base_steps": args.base_steps,
                   "model_config": {k: getattr(config, k, None) for k in (
                       "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
                   **data_info, **base_info},
        "fields": {**report.FIELDS, **report.OPTIONAL_FIELDS},
        "planner": report.planner_header(planned, plan_error, args),
    }
    paths = report.write_all(out, header, rows, failures, skipped)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    print(summary.format_summary(rows, skipped, failures), end="")
    print(f"\nDetails (every run, what exactly each method ran, memory probes, planner):\n  {paths[1]}\n  {paths[0]}")
    return 1 if failures else 0
