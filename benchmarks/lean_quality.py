"""Quality of lean optimizer state on the bench task: torch AdamW, FusedLISA (fp32 / bf16 / 8-bit / 4-bit
moments, all blocks active and gamma=2), torchao AdamW8bit / AdamW4bit and bitsandbytes AdamW8bit train
the same model on the same batches, over several seeds; it prints mean +- std of the final loss per row.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lean_quality.py --seeds 5 --steps 80 --out DIR

The task is `lisa-fused bench`'s (lisa_fused.bench): the `tiny` Llama, base-trained on stdlib source
(bench.base_checkpoint, cached), fine-tuned on the Python reference docs with the bench's batches
(data.batch_starts), train loop (run.train) and held-out eval (run.evaluate). Seed s fixes the init, the
base training, the fine-tuning batches and the LISA draws, identically for every row. Per row and seed:
final train loss (mean of the last --tail steps) and eval loss. Every row then checks that its trained
params changed and (gamma < blocks) that the blocks never active did not: a failed check is a FAILED row.

ROWS is data: (label, FusedLISA kwargs or a builder, reference row). A row the installed FusedLISA
rejects (TypeError/ValueError at construction) or whose library is missing is SKIPPED with the reason.
GOALS (project issue 19): each lean FusedLISA row within one std of the torchao row of the same bits,
and 8-bit within 1% of fp32 FusedLISA. Writes DIR/results.json and DIR/results.md.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

import lisa_fused
from lisa_fused.bench import bench, methods
from lisa_fused.bench.data import batch_starts
from lisa_fused.bench.models import build_model, model_config
from lisa_fused.bench.run import TAIL, evaluate, train
from lisa_fused.layers import find_layout

ALL = "all"  # n_active_layers = every block: FusedLISA is then plain AdamW (comparable to torchao)
EMBED_HEAD = ["model.embed_tokens", "lm_head"]  # name patterns of the Llama embedding and head


class Skip(Exception):
    """The row cannot run here (library missing, kwargs the installed FusedLISA rejects)."""


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Skip(f"ImportError: {exc}") from exc


def _torch_adamw(model, hp):
    return torch.optim.AdamW(model.parameters(), **hp)


def _torchao(name):
    def build(model, hp):
        return getattr(_import("torchao.optim"), name)(model.parameters(), **hp)
    build.__name__ = f"torchao.optim.{name}"
    return build


def _bnb_adamw8bit(model, hp):
    bnb = _import("bitsandbytes")
    probe = torch.nn.Parameter(torch.ones(4096))  # one step on a throwaway param: does bnb's CPU path run?
    probe.grad = torch.ones(4096)
    try:
        bnb.optim.AdamW8bit([probe], **hp).step()
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError) as exc:
        raise Skip(f"bitsandbytes {bnb.__version__} AdamW8bit on CPU: {type(exc).__name__}: {exc}") from exc
    return bnb.optim.AdamW8bit(model.parameters(), **hp)


def _lisa(moments, n_active, **extra):
    return dict(moments=moments, n_active_layers=n_active, **extra)


ROWS = (  # (label, builder(model, hp) or FusedLISA kwargs, reference row for the gap columns)
    ("torch AdamW", _torch_adamw, None),
    ("FusedLISA fp32 all", _lisa("fp32", ALL), "torch AdamW"),
    ("FusedLISA bf16 all", _lisa("bf16", ALL), "FusedLISA fp32 all"),
    ("FusedLISA 8bit all", _lisa("8bit", ALL), "torchao AdamW8bit"),
    ("FusedLISA 4bit all", _lisa("4bit", ALL), "torchao AdamW4bit"),
    ("FusedLISA fp32 g2", _lisa("fp32", 2), "torch AdamW"),
    ("FusedLISA bf16 g2", _lisa("bf16", 2), "FusedLISA fp32 g2"),
    ("FusedLISA 8bit g2", _lisa("8bit", 2), "FusedLISA fp32 g2"),
    ("FusedLISA 4bit g2", _lisa("4bit", 2), "FusedLISA fp32 g2"),
    ("torchao AdamW8bit", _torchao("AdamW8bit"), "torch AdamW"),
    ("torchao AdamW4bit", _torchao("AdamW4bit"), "torch AdamW"),
    ("bnb AdamW8bit", _bnb_adamw8bit, "torchao AdamW8bit"),
    ("FusedLISA 8bit all minq=0", _lisa("8bit", ALL, min_quantized_size=0), "torchao AdamW8bit"),
    ("FusedLISA 8bit all minq=4096", _lisa("8bit", ALL, min_quantized_size=4096), "torchao AdamW8bit"),
    ("FusedLISA 8bit all emb+head fp32", _lisa("8bit", ALL, min_quantized_size=4096,
                                               param_groups=[{"params": EMBED_HEAD, "moments": "fp32"}]),
     "torchao AdamW8bit"),
    ("FusedLISA 4bit all minq=0", _lisa("4bit", ALL, min_quantized_size=0), "torchao AdamW4bit"),
    ("FusedLISA 4bit all minq=4096", _lisa("4bit", ALL, min_quantized_size=4096), "torchao AdamW4bit"),
    ("FusedLISA 4bit all emb+head fp32", _lisa("4bit", ALL, min_quantized_size=4096,
                                               param_groups=[{"params": EMBED_HEAD, "moments": "fp32"}]),
     "torchao AdamW4bit"),
)
# (row, reference row, goal): "std" = |mean gap| <= the reference's std; "1%" = |mean gap| <= 1% of its mean
GOALS = tuple((label, ref, "std") for label, b, ref in ROWS if isinstance(b, dict) and ref.startswith("torchao")) + (
    ("FusedLISA 8bit all", "FusedLISA fp32 all", "1%"),
    ("FusedLISA 8bit g2", "FusedLISA fp32 g2", "1%"),
    ("FusedLISA 8bit all minq=0", "FusedLISA fp32 all", "1%"),
    ("FusedLISA 8bit all minq=4096", "FusedLISA fp32 all", "1%"),
    ("FusedLISA 8bit all emb+head fp32", "FusedLISA fp32 all", "1%"),
)


def fp32_state(opt, model) -> list[str]:
    """Params whose torch.optim-style state holds a plain fp32 tensor of the param's shape (not quantized:
    torchao's quantized state is a tensor subclass, bitsandbytes' uint8)."""
    return [n for n, p in model.named_parameters() if any(
        type(t) is torch.Tensor and t.dtype == torch.float32 and t.shape == p.shape
        for t in opt.state.get(p, {}).values())]


def run_one(label, builder, run, seed, hp, args) -> dict:
    """Fine-tune fresh base weights of `seed` with one row; losses, checks, backend. Skip, AssertionError."""
    model = build_model(run.config, model_path=None, dtype=torch.float32, device=run.device, seed=seed,
                        state_path=run.base[seed])
    layout = find_layout(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if isinstance(builder, dict):
        kw = dict(builder, n_active_layers=len(layout.blocks) if builder["n_active_layers"] == ALL
                  else builder["n_active_layers"])
        try:
            opt = methods.fused_lisa_class()(model, switch_every=args.switch_every, seed=seed, **hp, **kw)
        except (TypeError, ValueError) as exc:
            raise Skip(f"the installed FusedLISA rejects {kw}: {type(exc).__name__}: {exc}") from exc
        backend = methods.lisa_backend(opt)
        history = [opt.active_layers]
    else:
        opt, history = builder(model, hp), None
        backend = f"{type(opt).__module__}.{type(opt).__qualname__}"
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    trace = train(model, opt, run.tokens["ft_train"], run.starts[seed], args.seq_len, run.device,
                  desc=f"{label} s{seed}", on_step=None if history is None else
                  (lambda: history.append(opt.active_layers)))
    wall = time.perf_counter() - t0
    eval_loss = evaluate(model, run.tokens["ft_eval"], args.seq_len, args.batch_size, args.eval_windows,
                         run.device)
    out = {"seed": seed, "train_loss": statistics.fmean(trace["loss"][-args.tail:]), "eval_loss": eval_loss,
           "loss_curve": [round(x, 5) for x in trace["loss"]], "backend": backend, "wall_s": wall,
           "load_avg": [load0, os.getloadavg()[0]]}
    if history is None:
        out.update(fp32_state=fp32_state(opt, model), n_params=len(before))
        ever = set(range(len(layout.blocks)))
    else:
        if hasattr(opt, "state_formats"):  # {name: "moments/master_weights"} (FusedLISA with state formats)
            out.update(fp32_state=[n for n, f in opt.state_formats().items() if f.startswith("fp32/")],
                       n_params=len(before))
        opt.release()  # own storage back before the comparison
        history = history[:len(trace["loss"])]  # the set drawn after the last step never trained
        ever = {b for active in history for b in active}
        out["intervals"] = [[i, list(a)] for i, a in enumerate(history) if i == 0 or a != history[i - 1]]
    after = dict(model.named_parameters())
    trained = [n for n, _ in layout.always] + [n for b in sorted(ever) for n, _ in layout.blocks[b]]
    frozen = [n for b in range(len(layout.blocks)) if b not in ever for n, _ in layout.blocks[b]]
    unchanged = [n for n in trained if torch.equal(before[n], after[n].detach())]
    moved = [n for n in frozen if not torch.equal(before[n], after[n].detach())]
    if unchanged or moved:  # not `assert`: the check must hold under python -O too
        raise AssertionError(f"{label} seed {seed}: trained params unchanged {unchanged}; "
                             f"never-active params changed {moved}")
    out.update(checked_changed=len(trained), checked_frozen=len(frozen),
               never_active_blocks=sorted(set(range(len(layout.blocks))) - ever))
    return out


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(rows: dict) -> None:
    """Adds per-row mean/std and, against the reference row, the gap and per-seed wins/losses."""
    done = {label: r for label, r in rows.items() if r["status"] == "ok"}
    for r in done.values():
        for key in ("train_loss", "eval_loss"):
            r[key] = dict(zip(("mean", "std"), mean_std([s[key] for s in r["seeds"]])))
    for r in done.values():
        ref = done.get(r["ref"])
        if ref is None:
            continue
        for key in ("train_loss", "eval_loss"):
            diffs = [a[key] - b[key] for a, b in zip(r["seeds"], ref["seeds"])]
            r[f"{key}_vs_ref"] = {"gap": r[key]["mean"] - ref[key]["mean"],
                                  "gap_pct": 100 * (r[key]["mean"] / ref[key]["mean"] - 1),
                                  "paired": dict(zip(("mean", "std"), mean_std(diffs))),
                                  "beats": sum(d < 0 for d in diffs), "loses": sum(d > 0 for d in diffs)}


def check_goals(rows: dict) -> list[dict]:
    out = []
    for label, ref, kind in GOALS:
        a, b = rows.get(label), rows.get(ref)
        if a is None or b is None:
            continue
        g = {"row": label, "ref": ref, "goal": "within one std of ref" if kind == "std" else "within 1% of ref"}
        if a["status"] != "ok" or b["status"] != "ok":
            g["holds"] = f"not run ({label}: {a['status']}, {ref}: {b['status']})"
        else:
            for key in ("train_loss", "eval_loss"):
                gap = a[key]["mean"] - b[key]["mean"]
                bound = b[key]["std"] if kind == "std" else 0.01 * b[key]["mean"]
                g[key] = {"gap": gap, "bound": bound, "holds": None if math.isnan(bound) else bool(abs(gap) <= bound)}
            g["holds"] = ", ".join(f"{k.split('_')[0]} {({True: 'yes', False: 'NO'}).get(g[k]['holds'], 'n/a')}"
                                   for k in ("train_loss", "eval_loss"))
        out.append(g)
    return out


def _ms(d):
    return "-" if d is None else f"{d['mean']:.4f} ± {d['std']:.4f}"


def _gap(r, key):
    v = r.get(f"{key}_vs_ref")
    return "-" if v is None else (f"{v['gap']:+.4f} ({v['gap_pct']:+.2f}%, paired sd {v['paired']['std']:.4f}) "
                                  f"{v['beats']}/{v['loses']}")


def _compact(names: list[str], total: int) -> str:
    """'all N params', or the names with block indices folded: model.layers.*.input_layernorm.weight (x8)."""
    if len(names) == total:
        return f"all {total} params"
    folded: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.layers\.\d+\.", ".layers.*.", n)
        folded[key] = folded.get(key, 0) + 1
    return ", ".join(k + (f" (x{c})" if c > 1 else "") for k, c in folded.items()) or "none"


def format_markdown(res: dict) -> str:
    h = res["header"]
    lines = [f"# Lean-state quality on the bench task ({h['date']})", "", "```", h["command"], "```", "",
             f"{h['device']}; load average {h['load_avg'][0]:.1f} at the start, {h['load_avg'][1]:.1f} at the end; "
             f"{h['wall_s'] / 60:.1f} min. Versions: " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()),
             "", f"Task: {h['task']}", "", *([f"Note: {h['note']}", ""] if h["note"] else []),
             "Loss: mean ± std over seeds. Gap: the row's mean minus its reference row's (and %, and the std of "
             "the per-seed differences); w/l: seeds on which the row's loss is below / above the reference's. "
             "Rows without `minq` run the installed FusedLISA's default quantization threshold. A seed changes the "
             "init, base training and batches, so the std over seeds is mostly task spread; the paired sd "
             "(same seed, same batches) is the sharper comparison.",
             "", "| row | seeds | train loss | eval loss | reference | train gap w/l | eval gap w/l | backend | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for label, r in res["rows"].items():
        if r["status"] != "ok":
            skipped.append(f"- {label}: {r['status']}: {r['reason']}")
            lines.append(f"| {label} | {r['status']} (below) | | | | | | | |")
            continue
        backends = sorted({s["backend"] for s in r["seeds"]})
        lines.append(f"| {label} | {len(r['seeds'])} | {_ms(r['train_loss'])} | {_ms(r['eval_loss'])} | "
                     f"{r['ref'] or '-'} | {_gap(r, 'train_loss')} | {_gap(r, 'eval_loss')} | {', '.join(backends)} | "
                     f"{statistics.fmean(s['wall_s'] for s in r['seeds']):.1f} |")
    lines += ["", *skipped, "", "## Goals", "", "| row | goal | train gap / bound | eval gap / bound | holds |", "|---|---|---|---|---|"]
    for g in res["goals"]:
        cell = [f"{g[k]['gap']:+.4f} / {g[k]['bound']:.4f}" if k in g else "-" for k in ("train_loss", "eval_loss")]
        lines.append(f"| {g['row']} | {g['goal']} ({g['ref']}) | {cell[0]} | {cell[1]} | {g['holds']} |")
    lines += ["", "## Params whose Adam moments stay fp32 (not quantized, not bf16)", ""]
    for label, r in res["rows"].items():
        if "fp32_state" in r:
            lines.append(f"- {label}: {_compact(r['fp32_state'], r['n_params'])}"
                         + ("" if r["fp32_state_same_every_seed"] else " (seed 0; OTHER SEEDS DIFFER)"))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds seed, seed+1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps")
    p.add_argument("--base-steps", type=int, default=100, help="base training steps (the bench's tiny default)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--switch-every", type=int, default=20, help="FusedLISA K (gamma=2 rows)")
    p.add_argument("--tail", type=int, default=TAIL, help="final train loss = mean of the last TAIL steps")
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all): " +
                   "; ".join(label for label, _, _ in ROWS))
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default=None, help="data and base checkpoints (default: OUT/cache)")
    p.add_argument("--note", default="", help="a line for results.md (e.g. which lisa_fused tree ran)")
    args = p.parse_args(argv)
    args.parser = p
    names = [label for label, _, _ in ROWS]
    args.rows = names if args.rows is None else [s.strip() for s in args.rows.split(",")]
    bad = [r for r in args.rows if r not in names]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {names}")
    return args


def prepare(args, seeds):
    """The bench's own data, and its base checkpoint per seed (cached): bench.prepare_data/base_checkpoint
    read these fields of the bench's args."""
    cache = Path(args.cache_dir or Path(args.out) / "cache")
    cache.mkdir(parents=True, exist_ok=True)
    bargs = SimpleNamespace(model=None, data=None, preset="tiny", seq_len=args.seq_len, batch_size=args.batch_size,
                            base_steps=args.base_steps, dtype="float32", device="cpu", subparser=args.parser)
    data_path, data_info = bench.prepare_data(bargs, cache)
    config = model_config("tiny", None)
    run = SimpleNamespace(config=config, device=torch.device("cpu"), tokens=torch.load(data_path, weights_only=True),
                          data=data_info, base={s: bench.base_checkpoint(SimpleNamespace(**vars(bargs), seed=s),
                                                                         config, data_path, cache)[0] for s in seeds})
    run.starts = {s: batch_starts(len(run.tokens["ft_train"]), args.steps, args.batch_size, args.seq_len, s)
                  for s in seeds}
    return run


def header(args, argv, run, load_start, wall_s) -> dict:
    versions = {**bench.versions(), "lisa_fused_file": lisa_fused.__file__, "threads": torch.get_num_threads()}
    for dist in ("torchao", "bitsandbytes"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    env = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ]
    c = run.config
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([*env, "python benchmarks/lean_quality.py", shlex.join(argv)]),
            "device": bench.device_name(torch.device("cpu")), "versions": versions,
            "load_avg": [load_start, os.getloadavg()[0]], "wall_s": wall_s, "note": args.note,
            "task": f"tiny Llama ({c.num_hidden_layers} blocks, hidden {c.hidden_size}), {args.base_steps} base "
                    f"steps, {args.steps} fine-tuning steps x batch {args.batch_size} x {args.seq_len} tokens, lr "
                    f"{args.lr:g}, no weight decay, gamma=2 rows K={args.switch_every}, train loss over the last "
                    f"{args.tail} steps, eval over {args.eval_windows} held-out windows; {run.data['finetune_text']}",
            "config": {k: v for k, v in vars(args).items() if k != "parser"}, "data": run.data}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    seeds = list(range(args.seed, args.seed + args.seeds))
    run = prepare(args, seeds)
    hp = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rows = {}
    for label, builder, ref in ROWS:
        if label not in args.rows:
            continue
        row = rows[label] = {"status": "ok", "ref": ref, "seeds": [],
                             "kwargs": repr(builder) if isinstance(builder, dict) else builder.__name__}
        for s in seeds:
            try:
                row["seeds"].append(run_one(label, builder, run, s, hp, args))
            except Skip as exc:
                row.update(status="SKIPPED", reason=str(exc))
            except AssertionError as exc:
                row.update(status="FAILED", reason=str(exc))
            if row["status"] != "ok":
                print(f"lean_quality: {label}: {row['status']}: {row['reason']}", file=sys.stderr, flush=True)
                break
        states = [(s.pop("fp32_state", None), s.pop("n_params", None)) for s in row["seeds"]]
        if states and states[0][0] is not None:  # the same every seed unless a format depends on the data
            row.update(fp32_state=states[0][0], n_params=states[0][1],
                       fp32_state_same_every_seed=all(x == states[0] for x in states))
        for b in {s["backend"] for s in row["seeds"]}:
            if "FALLBACK" in b:
                print(f"lean_quality: WARNING {label} ran {b}", file=sys.stderr, flush=True)
    summarize(rows)
    res = {"header": header(args, argv, run, load_start, time.perf_counter() - t_start), "rows": rows,
           "goals": check_goals(rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, default=str))
    md = format_markdown(res)
    (out / "results.md").write_text(md)
    print(md, end="")
    return 1 if any(r["status"] == "FAILED" for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
