"""The bench report's first screen: one line per method against `lisa`, then one table row per method
(its seeds aggregated) that fits 120 columns, then the legend of the columns, printed once. Everything
else (each run, the memory probes, the planner, the backends) is in results.md and results.json.

Aggregation over a method's runs (its --seeds): eval loss mean and sample std; optimizer bytes, step
and optimizer-step times as the mean over runs of each run's value (a run's times are its medians);
peak memory from the run that measured it (the first). "Same eval loss" means the difference of the
means is within the larger of the two methods' seed std; with one run each there is no spread to judge
by, and the line says so.
"""
from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass

MIB = 1024 * 1024
WIDTH = 120
REFERENCE = "lisa"


@dataclass
class Method:
    """One method's runs, aggregated (bytes as ints, times in ms)."""
    name: str
    base_method: str
    runs: int
    eval_mean: float
    eval_std: float | None          # None with one run
    dev_end: float
    dev_peak: float
    host_end: float
    host_peak: float
    step_ms: float
    opt_step_ms: float
    trainable: int
    peak_mem: int | None
    busy: bool


def _name(row: dict) -> str:
    return row["method"].removesuffix(f" s{row.get('run_seed')}")


def aggregate(rows: list[dict]) -> list[Method]:
    """One Method per name (a row's label without its ' sN' seed suffix), in the order rows came."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_name(r), []).append(r)
    out = []
    for name, g in groups.items():
        mean = lambda key: statistics.fmean(r[key] for r in g)  # noqa: E731
        evals = [r["eval_loss"] for r in g]
        out.append(Method(
            name=name, base_method=g[0].get("base_method", name), runs=len(g), eval_mean=statistics.fmean(evals),
            eval_std=statistics.stdev(evals) if len(g) > 1 else None,
            dev_end=mean("opt_device_end_bytes"), dev_peak=mean("opt_device_bytes"),
            host_end=mean("opt_host_end_bytes"), host_peak=mean("opt_host_bytes"),
            step_ms=mean("step_ms"), opt_step_ms=mean("opt_step_ms"), trainable=g[0]["trainable_params"],
            peak_mem=next((r["peak_mem_bytes"] for r in g if r.get("peak_mem_bytes") is not None), None),
            busy=any(r.get("busy", "ok") != "ok" for r in g)))
    return out


def reference(methods: list[Method]) -> Method | None:
    """The `lisa` method (the first FusedLISA 'host' one when --samplers renamed it), or None."""
    named = [m for m in methods if m.name == REFERENCE]
    return (named or [m for m in methods if m.base_method == REFERENCE] or [None])[0]


def ratio(a: float, b: float) -> str:
    """'2.1x', '0.95x', '12x': two significant digits (three under 1), or 'n/a' against zero."""
    if not b:
        return "n/a"
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"


def _mib(n: float) -> str:
    """Bytes as MiB with three significant digits ('19.2', '6.14', '312', '0')."""
    v = n / MIB
    if v == 0:
        return "0"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _loss(m: Method) -> str:
    return f"{m.eval_mean:.4f}" + ("" if m.eval_std is None else f" ± {m.eval_std:.4f}")


def summary_line(m: Method, ref: Method) -> str:
    """'lisa-published: same eval loss (+0.2%), 2.1x the optimizer bytes on the device, 0.95x the step time'."""
    if m is ref:
        host = f" (+ {_mib(m.host_peak)} MiB paged to the host)" if m.host_peak else ""
        return (f"{m.name} (the reference): eval loss {_loss(m)} over {m.runs} run{'s' * (m.runs > 1)}, "
                f"{_mib(m.dev_peak)} MiB of optimizer bytes on the device{host}, {m.step_ms:.1f} ms a step")
    delta = m.eval_mean / ref.eval_mean - 1
    spreads = [s for s in (m.eval_std, ref.eval_std) if s is not None]
    if not spreads:
        loss = f"eval loss {delta:+.1%} (one run each: no spread to judge by)"
    elif abs(m.eval_mean - ref.eval_mean) <= max(spreads):
        loss = f"same eval loss ({delta:+.1%})"
    else:
        loss = f"{'worse' if delta > 0 else 'better'} eval loss ({delta:+.1%})"
    host = f" (+ {_mib(m.host_peak)} MiB on the host)" if m.host_peak else ""
    busy = " (BUSY: times not the methods' own)" if m.busy or ref.busy else ""
    return (f"{m.name}: {loss}, {ratio(m.dev_peak, ref.dev_peak)} the optimizer bytes on the device{host}, "
            f"{ratio(m.step_ms, ref.step_ms)} the step time{busy}")


COLUMNS = ("method", "runs", "eval loss", "dev MiB", "host MiB", "peak MiB", "step ms", "opt ms", "trained", "load")
LEGEND = (
    ("method", "the --methods name; what exactly each ran: results.md"),
    ("runs", "runs aggregated: one per --seeds seed (seeds move the LISA draws and the LoRA init; data and base "
             "weights stay), one for the deterministic methods (full, badam, galore, adamw-8bit*)"),
    ("eval loss", "held-out loss after fine-tuning, mean ± sample std over the runs"),
    ("dev MiB", "optimizer bytes on the model's device, at the end / at the peak over the steps: what the optimizer "
                "keeps (moments, fp32 masters, quantization scales, projections) + the .grad of the trained "
                "parameters (read before each step)"),
    ("host MiB", "optimizer bytes kept off the device (FusedLISA's paged moments), end / peak"),
    ("peak MiB", "peak memory above the loaded model while training (CPU: anonymous RSS, in the memory pass; "
                 "CUDA: max_memory_allocated), from the first run"),
    ("step ms", "median step, from one forward to the next"),
    ("opt ms", "median optimizer.step() alone"),
    ("trained", "parameters trained at one time (at the end of the run)"),
    ("load", "ok, or BUSY: other processes took the CPUs, so the times are not the method's own"),
)


def table_rows(methods: list[Method]) -> list[list[str]]:
    return [[m.name, str(m.runs), _loss(m), f"{_mib(m.dev_end)}/{_mib(m.dev_peak)}",
             f"{_mib(m.host_end)}/{_mib(m.host_peak)}", "-" if m.peak_mem is None else _mib(m.peak_mem),
             f"{m.step_ms:.1f}", f"{m.opt_step_ms:.2f}", f"{m.trainable:,}", "BUSY" if m.busy else "ok"]
            for m in methods]


def format_table(methods: list[Method]) -> str:
    """Markdown table, one row per method (text left, numbers right)."""
    body = table_rows(methods)
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    left = {0, len(COLUMNS) - 1}

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def format_legend(width: int = WIDTH) -> str:
    return "\n".join(textwrap.fill(f"{name}: {text}", width, subsequent_indent="  ") for name, text in LEGEND)


def format_summary(rows: list[dict], skipped: list[dict] = (), failures: list[dict] = ()) -> str:
    """The first screen: summary lines, skipped and failed methods, the table, its legend."""
    methods = aggregate(rows)
    ref = reference(methods)
    lines = []
    if ref is None:
        lines.append(f"(no `{REFERENCE}` row, so no line against it: add lisa to --methods)")
    else:
        lines += [textwrap.fill(summary_line(m, ref), WIDTH, subsequent_indent="  ")
                  for m in [ref] + [m for m in methods if m is not ref]]
    lines += [textwrap.fill(f"skipped {s['method']}: {s['reason']}; {s['install']}", WIDTH, subsequent_indent="  ")
              for s in skipped]
    lines += [f"FAILED {f['method']}: {f['error']}" for f in failures]
    if methods:
        lines += ["", format_table(methods), "", format_legend()]
    return "\n".join(lines) + "\n"
