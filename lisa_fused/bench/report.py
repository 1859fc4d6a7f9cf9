"""Table, JSON and PNG for `lisa-fused bench`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Row fields every method fills; written into the JSON header so the file explains itself.
FIELDS = {
    "method": "full | lora | lisa | lisa-device",
    "describe": "what exactly ran: optimizer, rank/targets or gamma/K/policy, lr",
    "lr": "learning rate of this method",
    "trainable_params": "parameters trained at one time (LISA: gamma blocks + embeddings, head, norms)",
    "peak_mem_bytes": "peak memory above the baseline taken after model load, before the method's setup",
    "peak_total_bytes": "peak memory including the baseline",
    "baseline_bytes": "memory at the baseline",
    "memory_how": "how peak memory was measured",
    "opt_device_bytes": "max over steps of optimizer-owned bytes on the model's device (FusedLISA: "
                        "memory_stats; AdamW: state tensors + grads of trained params)",
    "opt_host_bytes": "max over steps of optimizer-owned bytes paged to the host",
    "opt_step_ms": "median optimizer.step() time, first step excluded",
    "step_ms": "median forward + backward + step + zero_grad time, first step excluded",
    "tokens_per_s": "trained tokens / summed step time, first step excluded",
    "train_loss": "mean train loss over the last 5 steps",
    "eval_loss": "held-out eval loss after fine-tuning",
    "eval_loss_start": "held-out eval loss before fine-tuning (equal for all methods: same weights)",
    "steps": "optimizer steps", "wall_s": "training wall time",
    "loss_curve": "train loss per step", "opt_step_ms_trace": "per step", "step_ms_trace": "per step",
    "opt_device_bytes_trace": "per step", "opt_host_bytes_trace": "per step",
    "mem_trace": "memory above baseline after each step (RSS on CPU, allocated on CUDA)",
}

MB = 1024 * 1024
COLUMNS = (
    ("method", "method", "{}"),
    ("lr", "lr", "{:g}"),
    ("trainable", "trainable_params", "{:,}"),
    ("peak mem MB", "peak_mem_bytes", "{:.1f}", MB),
    ("opt dev MB", "opt_device_bytes", "{:.2f}", MB),
    ("opt host MB", "opt_host_bytes", "{:.2f}", MB),
    ("opt step ms", "opt_step_ms", "{:.2f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
)


def format_table(rows: list[dict]) -> str:
    head = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for title, key, fmt, *scale in COLUMNS:
            v = r[key]
            cells.append(fmt.format(v / scale[0] if scale else v))
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


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
    lines += [f"- FAILED {f['method']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem, ax_opt) = plt.subplots(1, 3, figsize=(16, 4.5))
    style = {"lisa-device": "--"}  # same math as lisa, so its curve would hide lisa's
    for r in rows:
        curve = r["loss_curve"]
        k = max(1, len(curve) // 10)
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        (ln,) = ax_loss.plot(range(1, len(curve) + 1), smooth, style.get(r["method"], "-"),
                             label=f"{r['method']} (lr {r['lr']:g})")
        ax_loss.scatter([len(curve)], [r["eval_loss"]], color=ln.get_color(), marker="*", s=80, zorder=3)
    ax_loss.set(xlabel="step", ylabel=f"train loss (mean of last {k} steps); * held-out eval", title="loss")
    ax_loss.legend(fontsize=8)

    names = [r["method"] for r in rows]
    x = range(len(rows))
    bars = (("peak_mem_bytes", "peak above baseline"), ("opt_device_bytes", "optimizer on device"),
            ("opt_host_bytes", "optimizer paged to host"))
    for j, (key, label) in enumerate(bars):
        ax_mem.bar([i + (j - 1) * 0.27 for i in x], [r[key] / 2**20 for r in rows], 0.27, label=label)
    ax_mem.set_xticks(list(x), names)
    ax_mem.set(ylabel="MiB", title=f"memory ({rows[0]['memory_how'].split(' (')[0] if rows else ''})")
    ax_mem.legend(fontsize=8)

    for r in rows:
        ax_opt.plot(range(1, len(r["opt_device_bytes_trace"]) + 1), [b / 2**20 for b in r["opt_device_bytes_trace"]],
                    style.get(r["method"], "-"), label=r["method"])
    ax_opt.set(xlabel="step", ylabel="MiB", title="optimizer bytes on device, per step")
    ax_opt.set_ylim(bottom=0)
    ax_opt.legend(fontsize=8)
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
