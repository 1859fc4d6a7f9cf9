"""Table, JSON and PNG for `lisa-fused bench`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Row fields every method fills; written into the JSON header so the file explains itself.
FIELDS = {
    "method": "the row's label: full | lora | lora-fa | lisa | lisa-device, with ':sampler' when --samplers "
              "was given and ' sN' (run seed) with --seeds > 1",
    "base_method": "full | lora | lora-fa | lisa | lisa-device",
    "run_seed": "seed of the LISA draws and the LoRA init (data order and base weights use --seed)",
    "describe": "what exactly ran: optimizer, rank/targets or gamma/K/policy, lr",
    "backend": "kernel that ran the update (torch for torch.optim); 'X FALLBACK (why)' when FusedLISA could not "
               "use the first choice for the device",
    "lisa_fused_file": "the lisa_fused/__init__.py the method's process imported (the parent's)",
    "load_avg": "1-min load average when the method's process started training / finished",
    "cpu_share": "CPU only: process CPU time / (wall time x torch threads) while training; low means other "
                 "processes took the CPUs",
    "busy": "why this row's times are not trustworthy (load), or empty",
    "lr": "learning rate of this method",
    "trainable_params": "parameters trained at one time (LISA: gamma blocks + embeddings, head, norms)",
    "peak_mem_bytes": "peak memory above the baseline taken after model load, before the method's setup",
    "peak_total_bytes": "peak memory including the baseline",
    "baseline_bytes": "memory at the baseline",
    "memory_how": "how peak memory was measured",
    "opt_device_bytes": "max over steps of optimizer-owned bytes on the model's device (FusedLISA: "
                        "memory_stats; AdamW: state tensors + grads of trained params)",
    "opt_host_bytes": "max over steps of optimizer-owned bytes paged to the host",
    "opt_step_ms": "median optimizer.step() time, first step excluded (CUDA: events on the compute stream)",
    "step_ms": "median time from one step's forward to the next's, first step excluded; no device sync in "
               "the loop, so paging copies overlap as in training",
    "tokens_per_s": "batch x seq / step_ms (the same median: one statistic for speed)",
    "normal_step_ms": "median step time over steps away from a switch (and not the first)",
    "switch_step_ms": "median over switches of the slower of the switching step and the next one (where "
                      "the compute stream waits for the page-in); null without switches",
    "switches": "switches that entered switch_step_ms",
    "train_loss": "mean train loss over the last 5 steps",
    "eval_loss": "held-out eval loss after fine-tuning",
    "eval_loss_start": "held-out eval loss before fine-tuning (equal for all methods: same weights)",
    "steps": "optimizer steps", "wall_s": "training wall time",
    "loss_curve": "train loss per step", "opt_step_ms_trace": "per step", "step_ms_trace": "per step",
    "opt_device_bytes_trace": "per step", "opt_host_bytes_trace": "per step",
    "mem_trace": "memory above baseline after each step (RSS on CPU, allocated on CUDA)",
}
# Filled only where they apply (null otherwise).
OPTIONAL_FIELDS = {
    "sampler": "FusedLISA's sampler (lisa methods)",
    "sampler_probabilities": "FusedLISA's first-pick probability per block after the last step",
}

MIB = 1024 * 1024
COLUMNS = (
    ("method", "method", "{}"),
    ("backend", "backend", "{}"),
    ("lr", "lr", "{:g}"),
    ("trainable", "trainable_params", "{:,}"),
    ("peak mem MiB", "peak_mem_bytes", "{:.1f}", MIB),
    ("opt dev MiB", "opt_device_bytes", "{:.2f}", MIB),
    ("opt host MiB", "opt_host_bytes", "{:.2f}", MIB),
    ("opt step ms", "opt_step_ms", "{:.2f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("switch step ms", "switch_step_ms", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("load", "busy", "{}"),
)
BUSY_LOAD = 0.5      # load average per CPU above which a row is flagged
BUSY_SHARE = 0.75    # CPU share below which a row is flagged


def busy_reason(row: dict, cpus: int) -> str:
    """'' when the method ran on a quiet machine, else what made its times unreliable."""
    why = []
    load = max(row["load_avg"])
    if load > BUSY_LOAD * cpus:
        why.append(f"load {load:.1f}/{cpus} CPUs")
    if row.get("cpu_share") is not None and row["cpu_share"] < BUSY_SHARE:
        why.append(f"got {row['cpu_share']:.0%} of its CPUs")
    return "BUSY: " + ", ".join(why) if why else "ok"


def format_table(rows: list[dict]) -> str:
    head = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for title, key, fmt, *scale in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v / scale[0] if scale else v))
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def format_seed_summary(rows: list[dict]) -> str:
    """Eval and train loss mean ± sample std over the seeds of each method / sampler ('' when every
    method ran once with one sampler)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"].removesuffix(f" s{r.get('run_seed')}"), []).append(r)
    if all(len(g) == 1 for g in groups.values()) and not any(":" in k for k in groups):
        return ""

    def mean_std(xs):
        m = sum(xs) / len(xs)
        sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
        return f"{m:.4f} ± {sd:.4f}"

    out = ["| method | seeds | eval loss (mean ± std) | train loss (mean ± std) | peak mem MiB | opt dev MiB |",
           "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        peak = next((r["peak_mem_bytes"] for r in rows if r["base_method"] == g[0]["base_method"]
                     and r["peak_mem_bytes"] is not None), None)
        out.append(f"| {name} | {len(g)} | {mean_std([r['eval_loss'] for r in g])} | "
                   f"{mean_std([r['train_loss'] for r in g])} | {'-' if peak is None else f'{peak / MIB:.1f}'} | "
                   f"{g[0]['opt_device_bytes'] / MIB:.2f} |")
    return "\n".join(out)


def format_markdown(header: dict, rows: list[dict], failures: list[dict]) -> str:
    cfg = header["config"]
    lines = [f"# lisa-fused bench, {header['date']}", "",
             f"- command: `{header['command']}`",
             f"- device: {header['device']}; python {header['python']}, torch {header['torch']}, "
             f"transformers {header['transformers']}, peft {header['peft']}, lisa_fused {header['lisa_fused']}",
             f"- model: {cfg['model'] or cfg['preset']} {cfg['model_config']}, dtype {cfg['dtype']}",
             f"- data: fine-tune on {cfg['finetune_text']} ({cfg['ft_train_tokens']:,} train / "
             f"{cfg['ft_eval_tokens']:,} held-out tokens, {cfg['tokens']})"]
    if cfg.get("base_steps"):
        lines.append(f"- base model: {cfg['base_steps']} steps of full AdamW on {cfg['base_text']}")
    lines += [f"- {cfg['steps']} steps x batch {cfg['batch_size']} x seq {cfg['seq_len']}, seed {cfg['seed']}",
              f"- load average (1 min) at start / end: {header['load_avg'][0]:.2f} / {header['load_avg'][1]:.2f} "
              f"on {header['cpu_count']} CPUs", ""]
    if rows:
        lines += [f"- memory: {rows[0]['memory_how']}",
                  f"- eval loss before fine-tuning: {rows[0]['eval_loss_start']:.4f}", ""]
        lines += [f"- {r['method']}: {r['describe']}" for r in rows]
        lines += ["", format_table(rows)]
    summary = format_seed_summary(rows)
    if summary:
        lines += ["", summary]
    if any(r.get("busy", "ok") != "ok" for r in rows):
        lines += ["", "Rows marked BUSY ran while other processes used the CPUs: their times are not the "
                      "method's own (memory and losses are unaffected)."]
    if any("FALLBACK" in r.get("backend", "") for r in rows):
        lines += ["", "**A FusedLISA row ran a FALLBACK backend: its times are not those of the native kernel.**"]
    lines += [f"- FAILED {f['method']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Four panels: loss, memory, speed, optimizer bytes per step. Identical curves (lisa and
    lisa-device are the same math) are drawn with distinct markers and said to coincide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem, ax_speed, ax_opt) = plt.subplots(1, 4, figsize=(20, 4.8))
    markers = ("o", "s", "^", "x", "v", "D")
    curves = {}
    for j, r in enumerate(rows):
        curve = r["loss_curve"]
        k = max(1, len(curve) // 10)
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        same = [m for m, c in curves.items() if c == curve]
        label = f"{r['method']} (lr {r['lr']:g})" + (f", coincides with {same[0]}" if same else "")
        (ln,) = ax_loss.plot(range(1, len(curve) + 1), smooth, marker=markers[j % len(markers)],
                             markevery=(len(curves) % 4, max(4, len(curve) // 8)),  # offset: both marker sets show
                             fillstyle="none" if same else "full",
                             linestyle="--" if same else "-", label=label)
        ax_loss.scatter([len(curve)], [r["eval_loss"]], color=ln.get_color(), marker="*", s=80, zorder=3)
        curves[r["method"]] = curve
    ax_loss.set(xlabel="step", ylabel="train loss (running mean); * held-out eval", title="loss")
    ax_loss.legend(fontsize=7, loc="upper right", framealpha=0.6)

    names = [r["method"] for r in rows]
    x = range(len(rows))
    bars = (("peak_mem_bytes", "peak above baseline"), ("opt_device_bytes", "optimizer on device"),
            ("opt_host_bytes", "optimizer paged to host"))
    for j, (key, label) in enumerate(bars):
        ax_mem.bar([i + (j - 1) * 0.27 for i in x], [(r[key] or 0) / MIB for r in rows], 0.27, label=label)
    ax_mem.set_xticks(list(x), names)
    ax_mem.set(ylabel="MiB", title="memory (MiB)")
    ax_mem.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)

    ax_speed.bar([i - 0.2 for i in x], [r["step_ms"] for r in rows], 0.4, label="step (median)")
    ax_speed.bar([i + 0.2 for i in x], [r["opt_step_ms"] for r in rows], 0.4, label="optimizer.step (median)")
    for i, r in enumerate(rows):
        if r.get("busy", "ok") != "ok":
            ax_speed.annotate("BUSY", (i, r["step_ms"]), ha="center", va="bottom", color="red", fontsize=8)
    ax_speed.set_xticks(list(x), [f"{n}\n{r['tokens_per_s']:,.0f} tok/s" for n, r in zip(names, rows)])
    ax_speed.set(ylabel="ms", title="speed (median step; tokens/s from the same median)")
    ax_speed.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)

    for j, r in enumerate(rows):
        ax_opt.plot(range(1, len(r["opt_device_bytes_trace"]) + 1), [b / MIB for b in r["opt_device_bytes_trace"]],
                    marker=markers[j % len(markers)], markevery=max(1, len(r["opt_device_bytes_trace"]) // 8),
                    label=r["method"])
    ax_opt.set(xlabel="step", ylabel="MiB", title="optimizer bytes on device, per step")
    ax_opt.set_ylim(bottom=0)
    ax_opt.legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(header: dict) -> str:
    return f"{header['command']}  |  {header['device']}  |  {header['date']}"


def write_all(out: Path, header: dict, rows: list[dict], failures: list[dict]) -> list[Path]:
    """results.json, results.md and, where matplotlib is installed, bench.png (else said on stderr)."""
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps({"header": header, "rows": rows, "failures": failures}, indent=1))
    paths[1].write_text(format_markdown(header, rows, failures))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"lisa-fused bench: matplotlib is not installed, so no bench.png; render it elsewhere with "
              f"python -m lisa_fused.bench.report {paths[0]}", file=sys.stderr)
        return paths
    paths.append(out / "bench.png")
    plot(paths[2], rows, plot_title(header))
    return paths


def main(argv=None) -> int:
    """python -m lisa_fused.bench.report RESULTS.json: redraw bench.png beside it."""
    (path,) = sys.argv[1:] if argv is None else argv
    result = json.loads(Path(path).read_text())
    png = Path(path).with_name("bench.png")
    plot(png, result["rows"], plot_title(result["header"]))
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
