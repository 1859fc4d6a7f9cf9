"""bench.png: loss, memory, speed and optimizer bytes per step, one line or bar per method."""
from __future__ import annotations

from pathlib import Path

from . import summary

MIB = 1024 * 1024


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Four panels: loss, memory, speed, optimizer bytes per step; one line or bar per method (its first
    run; the eval loss point is the mean over its runs, with their std as an error bar). Identical
    curves (lisa and lisa-device are the same math) are drawn with distinct markers and said to coincide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary.aggregate(rows)
    firsts = [next(r for r in rows if summary._name(r) == m.name) for m in methods]
    fig, (ax_loss, ax_mem, ax_speed, ax_opt) = plt.subplots(1, 4, figsize=(22, 5.2))
    markers = ("o", "s", "^", "x", "v", "D", "P", "*")
    curves = {}
    for j, (m, r) in enumerate(zip(methods, firsts)):
        curve = r["loss_curve"]
        k = max(1, len(curve) // 10)
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        same = [name for name, c in curves.items() if c == curve]
        label = f"{m.name} (lr {r['lr']:g})" + (f", coincides with {same[0]}" if same else "")
        (ln,) = ax_loss.plot(range(1, len(curve) + 1), smooth, marker=markers[j % len(markers)],
                             markevery=(len(curves) % 4, max(4, len(curve) // 8)),  # offset: both marker sets show
                             fillstyle="none" if same else "full",
                             linestyle="--" if same else "-", label=label)
        ax_loss.errorbar([len(curve)], [m.eval_mean], yerr=[m.eval_std or 0], color=ln.get_color(), marker="*",
                         markersize=9, capsize=3, zorder=3)
        curves[m.name] = curve
    ax_loss.set(xlabel="step", ylabel="train loss (running mean, first run); * held-out eval, mean ± std",
                title="loss")
    ax_loss.legend(fontsize=7, loc="upper right", framealpha=0.6)

    names = [m.name for m in methods]
    x = range(len(methods))
    bars = (("peak_mem_bytes", "peak mem above baseline (CPU: anonymous RSS)"), ("peak_tensor_bytes", "live tensors"),
            ("planned_tensor_bytes", "planner"), ("opt_device_bytes", "optimizer on device (peak)"),
            ("opt_host_bytes", "optimizer on host (peak)"))
    w = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        ax_mem.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], [(r.get(key) or 0) / MIB for r in firsts], w,
                   label=label)
    ax_mem.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    ax_mem.set(ylabel="MiB", title="memory (MiB, first run)")
    ax_mem.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)

    ax_speed.bar([i - 0.2 for i in x], [m.step_ms for m in methods], 0.4, label="step (median)")
    ax_speed.bar([i + 0.2 for i in x], [m.opt_step_ms for m in methods], 0.4, label="optimizer.step (median)")
    for i, m in enumerate(methods):
        if m.busy:
            ax_speed.annotate("BUSY", (i, m.step_ms), ha="center", va="bottom", color="red", fontsize=8)
    ax_speed.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    ax_speed.set(ylabel="ms", title="speed (median step, mean over runs)")
    ax_speed.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)

    for j, r in enumerate(firsts):
        ax_opt.plot(range(1, len(r["opt_device_bytes_trace"]) + 1), [b / MIB for b in r["opt_device_bytes_trace"]],
                    marker=markers[j % len(markers)], markevery=max(1, len(r["opt_device_bytes_trace"]) // 8),
                    label=names[j])
    ax_opt.set(xlabel="step", ylabel="MiB", title="optimizer bytes on device (state + grads), per step")
    ax_opt.set_ylim(bottom=0)
    ax_opt.legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
