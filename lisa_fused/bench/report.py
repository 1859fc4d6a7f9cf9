"""results.md (the first screen of summary.py, then the details: every run's wide table, the planner, the
seeds), results.json and bench.png for `lisa-fused bench`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import summary
from .plot import plot

# Row fields every method fills; written into the JSON header so the file explains itself.
FIELDS = {
    "method": "the row's label: the --methods name (full, lora, lisa, lisa-published, badam, ...), with ':sampler' "
              "when --samplers was given and ' sN' (run seed) with --seeds > 1",
    "base_method": "the --methods name (lisa_fused/bench/__init__.py METHODS)",
    "run_seed": "seed of the LISA draws (FusedLISA's and the published callbacks') and the LoRA init (data order "
                "and base weights use --seed)",
    "describe": "what exactly ran: optimizer, rank/targets or gamma/K/policy, lr",
    "backend": "kernel that ran the update (torch for torch.optim); 'X FALLBACK (why)' when FusedLISA could not "
               "use the first choice for the device",
    "lisa_fused_file": "the lisa_fused/__init__.py the method's process imported (the parent's)",
    "load_avg": "1-min load average when the method's process started training / finished",
    "cpu_share": "CPU only: process CPU time / (wall time x torch threads) while training; low when other "
                 "processes took the CPUs, or when the model is too small to keep every thread busy",
    "threads": "CPU only: torch threads of the method's process (its own share of the load average)",
    "others_share": "share of the machine's CPU time other processes (and, on a VM, other guests: steal) used "
                    "while the method trained (Linux /proc/stat minus the method's own CPU time); None elsewhere",
    "busy": "why this row's times are not trustworthy: other processes used over a quarter of the machine's "
            "CPU time while it trained (others_share; where that is unknown, a CPU share under 75% or a load "
            "average beyond the method's own threads above half the CPUs); else 'ok'",
    "lr": "learning rate of this method",
    "trainable_params": "parameters trained at one time (LISA: gamma blocks + embeddings, head, norms)",
    "peak_mem_bytes": "peak memory above the baseline taken after model load, before the method's setup. CPU: "
                      "anonymous memory (peak RSS minus the file-backed pages, i.e. library code, added during "
                      "the pass; tensors plus what malloc keeps plus Python objects); CUDA: "
                      "torch.cuda.max_memory_allocated minus allocated at the baseline",
    "peak_tensor_bytes": "peak of live torch tensor bytes above the baseline. CPU: an allocation tracker "
                         "(lisa_fused.plan.trace.AllocationTracker, the planner's counter) on the real tensors of "
                         "the memory pass, storages alive at the baseline not counted and subtracted when freed; "
                         "CUDA: equal to peak_mem_bytes (max_memory_allocated counts the same live blocks)",
    "peak_total_bytes": "peak memory including the baseline (CPU: VmHWM, the raw resident set)",
    "baseline_bytes": "memory at the baseline (CPU: VmRSS)",
    "memory_how": "how peak_mem_bytes was measured",
    "tensor_how": "how peak_tensor_bytes was measured",
    "opt_device_bytes": "optimizer bytes on the model's device, max over steps: opt_state_device_bytes + "
                        "grad_bytes of the same step",
    "opt_device_end_bytes": "the same after the last step",
    "opt_state_device_bytes": "max over steps of what the optimizer keeps on the device, read after step(): "
                              "FusedLISA: memory_stats()['device_bytes']; every other optimizer: the distinct "
                              "storages of the tensors in its state (moments, step counts, quantization codes and "
                              "scales, GaLore's projections, BAdam's fp32 masters; lisa_fused.plan.kept)",
    "grad_bytes": "max over steps of the .grad storages of the model's parameters, read after backward and before "
                  "step() (the same walk for every method)",
    "opt_host_bytes": "max over steps of what the optimizer keeps off the device (FusedLISA: "
                      "memory_stats()['host_bytes'], its paged state)",
    "opt_host_end_bytes": "the same after the last step",
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
    "opt_device_bytes_trace": "per step", "opt_host_bytes_trace": "per step", "grad_bytes_trace": "per step",
    "opt_state_device_bytes_trace": "per step",
    "mem_trace": "memory above baseline after each step (anonymous RSS on CPU, allocated on CUDA)",
}
# Filled only where they apply (null otherwise).
OPTIONAL_FIELDS = {
    "sampler": "FusedLISA's sampler (lisa methods)",
    "sampler_probabilities": "FusedLISA's first-pick probability per block after the last step",
    "optimizer_memory_stats": "FusedLISA rows: its memory_stats() after the last step, every key as it reports "
                              "them (a record; the byte columns read only device_bytes and host_bytes)",
    "peak_rss_bytes": "CPU: raw peak RSS above the baseline (VmHWM minus VmRSS at the baseline), file-backed "
                      "pages included; null on CUDA",
    "file_pages_added_bytes": "CPU: file-backed and shared pages (RssFile + RssShmem) added during the memory "
                              "pass, peak_rss_bytes - peak_mem_bytes; null on CUDA",
    "tensor_mem_trace": "CPU memory pass: live tensor bytes above the baseline after each step",
    "planned_peak_bytes": "the planner's (lisa-fused plan, same method, dtype, batch, seq, rank, gamma, device "
                          "type) predicted peak minus the model's parameter bytes (what the baseline holds); "
                          "FusedLISA: its steady state (every block paged once); null where the planner skipped "
                          "the setting or failed",
    "planned_tensor_bytes": "planned_peak_bytes as held against peak_tensor_bytes: FusedLISA's device state "
                            "taken at this run's opt_device_bytes ('device' policy allocates resident moments "
                            "as blocks leave; a short run has paged fewer blocks); the CPU 'host' store stays "
                            "whole (reserved up front, so the tensor count sees it all)",
    "planned_mem_bytes": "planned_tensor_bytes as held against peak_mem_bytes: on CPU the host store taken at "
                         "this run's opt_host_bytes (the RSS holds only written pages)",
}

MIB = 1024 * 1024
COLUMNS = (
    ("method", "method", "{}"),
    ("backend", "backend", "{}"),
    ("lr", "lr", "{:g}"),
    ("trainable", "trainable_params", "{:,}"),
    ("peak mem MiB", "peak_mem_bytes", "{:.1f}", MIB),
    ("tensors MiB", "peak_tensor_bytes", "{:.1f}", MIB),
    ("planned MiB", "planned_tensor_bytes", lambda r: _vs(r["planned_tensor_bytes"], r.get("peak_tensor_bytes"),
                                                          r["planned_tensor_bytes"] != r.get("planned_peak_bytes"))),
    ("opt dev MiB", "opt_device_bytes", "{:.2f}", MIB),
    ("opt dev end MiB", "opt_device_end_bytes", "{:.2f}", MIB),
    ("state MiB", "opt_state_device_bytes", "{:.2f}", MIB),
    ("grads MiB", "grad_bytes", "{:.2f}", MIB),
    ("opt host MiB", "opt_host_bytes", "{:.2f}", MIB),
    ("opt step ms", "opt_step_ms", "{:.2f}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("switch step ms", "switch_step_ms", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("load", "busy", "{}"),
)
BUSY_OTHERS = 0.25   # share of the machine's CPU time used by other processes above which a row is flagged
BUSY_LOAD = 0.5      # without others_share: load average per CPU above which a row is flagged
BUSY_SHARE = 0.75    # without others_share: CPU share below which a row is flagged


def busy_reason(row: dict, cpus: int) -> str:
    """'ok' when the method ran on a quiet machine, else 'BUSY: ' and what made its times unreliable.
    others_share (measured: what other processes ran meanwhile) decides where it is known; the load average
    and cpu_share are the fallback: a model too small to keep every thread busy also has a low cpu_share."""
    if row.get("others_share") is not None:
        if row["others_share"] > BUSY_OTHERS:
            return f"BUSY: other processes used {row['others_share']:.0%} of the {cpus} CPUs"
        return "ok"
    why = []
    load = max(row["load_avg"])
    # The load average counts this method's own threads (and the one-minute average lags behind the
    # previous method's): what others put on the CPUs is the load beyond them.
    others = load - min(row.get("threads") or cpus, cpus)
    if others > BUSY_LOAD * cpus:
        why.append(f"load {load:.1f}/{cpus} CPUs, {others:.1f} beyond its own threads")
    if row.get("cpu_share") is not None and row["cpu_share"] < BUSY_SHARE:
        why.append(f"got {row['cpu_share']:.0%} of its CPUs")
    return "BUSY: " + ", ".join(why) if why else "ok"


def _vs(planned: int | None, measured: int | None, star: bool = False) -> str:
    """'57.2 (-0.3%)': planned MiB and its relative difference to the measured bytes; '*' after the
    number marks a planner number taken at the run's paged state (see planner_note)."""
    if planned is None:
        return "-"
    text = f"{planned / MIB:.1f}" + ("*" if star else "")
    if not measured:
        return text
    return f"{text} ({(planned / measured - 1) * 100:+.1f}%)"


def format_table(rows: list[dict]) -> str:
    """One line per row; COLUMNS: (title, key, format string [, scale]) or (title, key, row -> cell)."""
    head = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for title, key, fmt, *scale in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif callable(fmt):
                cells.append(fmt(r))
            else:
                cells.append(fmt.format(v / scale[0] if scale else v))
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


def planner_header(planned: dict | None, error: str | None, args) -> dict:
    """results.json's "planner": the settings, the planner's rows (lisa_fused.plan fields, bytes) and the
    weights subtracted to put them above the bench's baseline; or the error."""
    from ..plan.planner import as_dict

    settings = {k: getattr(args, k, None) for k in ("dtype", "batch_size", "seq_len", "lora_rank", "gamma", "device")}
    if planned is None:
        return {"settings": settings, "error": error, "rows": [], "skipped": []}
    return {"settings": settings, "error": None, "weights_bytes": planned["weights_bytes"],
            "rows": [as_dict(r) for r in planned["rows"]], "skipped": [as_dict(k) for k in planned["skipped"]]}


def planner_note(planner: dict | None, rows: list[dict]) -> str:
    """Below the table: what "planned MiB" is, the planner's steady state where the column is not it,
    and the planner against peak mem MiB."""
    if not planner or not any(r.get("planned_peak_bytes") is not None for r in rows):
        if planner and planner.get("error"):
            return f"planned MiB: the planner failed ({planner['error']})"
        return ""
    s = planner["settings"]
    text = (f"planned MiB: `lisa-fused plan` for the same settings (--dtype {s['dtype']} --batch-size "
            f"{s['batch_size']} --seq-len {s['seq_len']} --lora-rank {s['lora_rank']} --gamma {s['gamma']}, "
            f"device type of {s['device']}), its peak minus the model's weights "
            f"({planner['weights_bytes'] / MIB:.2f} MiB, held by the baseline); in parentheses vs tensors MiB "
            f"(both count live tensor bytes). The planner's FusedLISA rows are the steady state (every block "
            f"paged once); the 'host' store is reserved up front, so tensors MiB counts all of it.")
    starred = [r for r in rows if r.get("planned_tensor_bytes") != r.get("planned_peak_bytes")]
    if starred:
        text += (" * = with FusedLISA's resident moments at what this run had paged (opt dev MiB) instead of "
                 "the steady state (" + ", ".join(f"{r['method']} {r['planned_peak_bytes'] / MIB:.1f} MiB"
                                                  for r in starred) + ").")
    vs_mem = [f"{r['method']} {_vs(r['planned_mem_bytes'], r['peak_mem_bytes'])}" for r in rows
              if r.get("planned_mem_bytes") is not None and r.get("peak_mem_bytes") is not None]
    if vs_mem:
        text += " Planner vs peak mem MiB"
        if any(r.get("planned_mem_bytes") != r.get("planned_tensor_bytes") for r in rows):
            text += (" (a CPU RSS holds only the host pages written so far, so there the host store is taken at "
                     "this run's opt host MiB)")
        text += ": " + "; ".join(vs_mem) + "."
    return text


def format_markdown(header: dict, rows: list[dict], failures: list[dict], skipped: list[dict] = ()) -> str:
    """results.md: the first screen (summary.format_summary), then the details of every run."""
    cfg = header["config"]
    lines = [f"# lisa-fused bench, {header['date']}", "",
             f"`{header['command']}` on {header['device']}, load average {header['load_avg'][0]:.2f} / "
             f"{header['load_avg'][1]:.2f} (start / end) on {header['cpu_count']} CPUs", "",
             summary.format_summary(rows, skipped, failures).rstrip(), "", "## Details", "",
             f"- device: {header['device']}; python {header['python']}, torch {header['torch']}, "
             f"transformers {header['transformers']}, peft {header['peft']}, lisa_fused {header['lisa_fused']}; "
             f"OMP_WAIT_POLICY={header.get('omp_wait_policy', 'unset')}"
             + "".join(f", {k} {v}" for k, v in header.get("peer_versions", {}).items()),
             f"- model: {cfg['model'] or cfg['preset']} {cfg['model_config']}, dtype {cfg['dtype']}",
             f"- data: fine-tune on {cfg['finetune_text']} ({cfg['ft_train_tokens']:,} train / "
             f"{cfg['ft_eval_tokens']:,} held-out tokens, {cfg['tokens']})"]
    if cfg.get("base_steps"):
        lines.append(f"- base model: {cfg['base_steps']} steps of full AdamW on {cfg['base_text']}")
    lines += [f"- {cfg['steps']} steps x batch {cfg['batch_size']} x seq {cfg['seq_len']}, seed {cfg['seed']}", ""]
    if rows:
        lines += [f"- peak mem: {rows[0]['memory_how']}"]
        if rows[0].get("tensor_how"):
            lines.append(f"- tensors: {rows[0]['tensor_how']}")
        lines += [f"- eval loss before fine-tuning: {rows[0]['eval_loss_start']:.4f}", ""]
        lines += [f"- {r['method']}: {r['describe']}" for r in rows]
        lines += ["", "Every run (columns: results.json's \"fields\"):", "", format_table(rows)]
    note = planner_note(header.get("planner"), rows)
    if note:
        lines += ["", note]
    seeds = format_seed_summary(rows)
    if seeds:
        lines += ["", seeds]
    if any(r.get("busy", "ok") != "ok" for r in rows):
        lines += ["", "Rows marked BUSY ran while other processes used the CPUs: their times are not the "
                      "method's own (memory and losses are unaffected)."]
    if any("FALLBACK" in r.get("backend", "") for r in rows):
        lines += ["", "**A FusedLISA row ran a FALLBACK backend: its times are not those of the native kernel.**"]
    return "\n".join(lines) + "\n"


def plot_title(header: dict) -> str:
    return f"{header['command']}  |  {header['device']}  |  {header['date']}"


def write_all(out: Path, header: dict, rows: list[dict], failures: list[dict], skipped: list[dict] = ()) -> list[Path]:
    """results.json, results.md and, where matplotlib is installed and a row ran, bench.png (else said on
    stderr)."""
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps({"header": header, "rows": rows, "failures": failures, "skipped": list(skipped)},
                                   indent=1))
    paths[1].write_text(format_markdown(header, rows, failures, skipped))
    if not rows:
        return paths
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
