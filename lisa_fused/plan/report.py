"""Table and JSON of a plan (the JSON fields are documented in lisa_fused/plan/__init__.py)."""
from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # planner imports torch; parse_size (the CLI's --gpu-mem) must not
    from .planner import Row, Skipped

GIB = 2**30


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G' (G = GiB), '512MiB', '1e9B' -> bytes. ValueError names the text; a bare number
    is refused (a unit forgotten: '24' would be 24 bytes, which nothing fits)."""
    units = {"B": 1, "K": 2**10, "KIB": 2**10, "KB": 10**3, "M": 2**20, "MIB": 2**20, "MB": 10**6,
             "G": GIB, "GIB": GIB, "GB": 10**9, "T": 2**40, "TIB": 2**40, "TB": 10**12}
    s = text.strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--gpu-mem {text!r}: not a size; write e.g. 24GiB, 80GB or 16G") from None
    if not unit:
        raise ValueError(f"--gpu-mem {text!r}: give a unit, e.g. {number}GiB (GiB, GB, MiB, MB, G = GiB; B for bytes)")
    if unit not in units:
        raise ValueError(f"--gpu-mem {text!r}: unknown unit {unit!r}; use GiB, GB, MiB, MB or G (= GiB)")
    if not value > 0:
        raise ValueError(f"--gpu-mem {text!r}: must be > 0")
    return int(value * units[unit])


def unit_for(rows: list[Row]) -> tuple[str, int]:
    """GiB, or MiB when every peak is under 1 GiB."""
    return ("GiB", GIB) if any(r.peak_bytes >= GIB for r in rows) else ("MiB", 2**20)


def _count(n: int | None) -> str:
    """A largest batch or gamma: '-' where it does not apply, 'none' where not even 1 fits."""
    return "-" if n is None else ("none" if n == 0 else str(n))


WIDTH = 120
_MASTER = {"kahan": "kahan", "stochastic": "sr"}


def row_name(row: Row) -> str:
    """A short name per row, the bench's method names where they exist: full, lora r=128, badam, lisa,
    lisa-device, lisa-drop, lisa-bf16, lisa-8bit, lisa-8bit-kahan, lisa-4bit-sr, lisa-4bit-sr+groups."""
    if row.method == "lora":
        return f"lora r={row.setting.split('r=')[1].split(',')[0]}" if "r=" in row.setting else "lora"
    if row.method != "lisa":
        return row.method
    kw = row.kwargs
    parts = ["lisa"]
    if kw.get("inactive_moments", "host") != "host":
        parts.append(kw["inactive_moments"])
    if kw.get("moments", "fp32") != "fp32":
        parts.append(kw["moments"])
    if kw.get("master_weights") in _MASTER:
        parts.append(_MASTER[kw["master_weights"]])
    return "-".join(parts) + ("+groups" if kw.get("param_groups") else "")


def row_note(row: Row) -> str:
    """What the row runs and which published setting it matches, then its exact keywords in brackets."""
    if row.method != "lisa":
        return row.setting
    kw = row.kwargs
    policy = kw.get("inactive_moments", "host")
    text = [{"host": "a leaving block's moments are paged to pinned host memory (FusedLISA's default)"
             if len(kw) == 1 else "paged like lisa",
             "device": "every block's moments stay on the device: published LISA (the axolotl, ms-swift and LMFlow "
                       "callbacks under torch AdamW) once every block has been drawn",
             "drop": "a returning block restarts from zero moments (BAdam restarts its state at every switch)",
             }.get(policy, f"inactive_moments={policy}")]
    moments = {"bf16": "bf16 moments", "8bit": "block-wise 8-bit moments (as torchao/bitsandbytes AdamW8bit)",
               "4bit": "block-wise 4-bit moments (as torchao AdamW4bit)"}
    if kw.get("moments", "fp32") in moments:
        text.append(moments[kw["moments"]])
    if kw.get("master_weights") == "kahan":
        text.append("no fp32 master: Kahan-compensated bf16/fp16 updates")
    elif kw.get("master_weights") == "stochastic":
        text.append("no fp32 master: stochastically rounded bf16 updates")
    if kw.get("param_groups"):
        text.append("the param groups in brackets")
    return ", ".join(text) + f" [{row.setting}]"


def reference(rows: list[Row]) -> Row | None:
    """The FusedLISA default row (inactive_moments="host", nothing else set), else the first lisa row."""
    lisa = [r for r in rows if r.method == "lisa"]
    return next((r for r in lisa if r.kwargs == {"inactive_moments": "host"}), lisa[0] if lisa else None)


def _ratio(a: int, b: int) -> str:
    if not b:
        return "n/a"
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"


def summary_lines(rows: list[Row], gpu_mem: int | None) -> list[str]:
    """One line per row against the reference (the default FusedLISA row)."""
    ref = reference(rows)
    name, unit = unit_for(rows)
    size = lambda n: f"{n / unit:.2f} {name}"  # noqa: E731

    def fits(r):
        if gpu_mem is None:
            return ""
        return f"; {'fits' if r.fits else 'does not fit'} {gpu_mem / unit:.1f} {name}"

    if ref is None:
        return [f"{row_name(r)}: peak {size(r.peak_bytes)}{fits(r)}" for r in rows]
    lines = [f"{row_name(ref)} (the reference): peak {size(ref.peak_bytes)} = weights {size(ref.weights_bytes)} + "
             f"state {size(ref.state_bytes)} + act+temp {size(ref.activation_bytes)}"
             + (f", {size(ref.host_bytes)} paged to host" if ref.host_bytes else "") + fits(ref)]
    for r in rows:
        if r is not ref:
            lines.append(f"{row_name(r)}: {_ratio(r.peak_bytes, ref.peak_bytes)} the peak ({size(r.peak_bytes)}), "
                         f"{_ratio(r.state_bytes, ref.state_bytes)} the state" + fits(r))
    return lines


def format_table(rows: list[Row], gpu_mem: int | None) -> str:
    """One line per row, under 120 columns; units in the line above it (`format_plan`), columns in LEGEND."""
    name, unit = unit_for(rows)
    fit = f"fits {gpu_mem / unit:.1f}" if gpu_mem else "fits"
    head = ["row", "weights", "state", "act+temp", "peak", "host", fit, "max batch", "max gamma"]
    body = []
    for r in rows:
        num = lambda n: f"{n / unit:.2f}"  # noqa: E731
        body.append([row_name(r), num(r.weights_bytes), num(r.state_bytes), num(r.activation_bytes),
                     num(r.peak_bytes), num(r.host_bytes), "-" if r.fits is None else ("yes" if r.fits else "NO"),
                     _count(r.max_batch_size), _count(r.max_gamma)])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def legend(target: str) -> list[tuple[str, str]]:
    return [
        ("weights", "the model's parameters (LoRA: + adapters; LISA: minus the params it trains, which sit in its "
                    "packed buffer and count in state)"),
        ("state", "grads + moments + masters + scales (FusedLISA: memory_stats() after every block was active once; "
                  "BAdam: its AdamW's moments and the fp32 master of its one block, + that block's grads)"),
        ("act+temp", "traced peak of forward, backward and optimizer step (logits and loss included; where it "
                     "peaks: below, per row)"),
        ("peak", "weights + state + act+temp" + (" + host (a CPU target: the same RAM)" if target == "cpu" else "")),
        ("host", "LISA's paged state, in pinned host memory"),
        ("fits", "peak <= --gpu-mem; max batch / max gamma: the largest that fit (none: not even 1; - : no "
                 "--gpu-mem, or not LISA)"),
    ]


def format_plan(title: str, rows: list[Row], skipped: list[Skipped], gpu_mem: int | None, target: str) -> str:
    """The whole printout: title, one line per row against the default FusedLISA row, the table, its
    legend (once), then each row's setting, what it matches and where its activations peak."""
    name, _ = unit_for(rows)
    fill = lambda text: textwrap.fill(text, WIDTH, subsequent_indent="  ")  # noqa: E731
    out = [title, *map(fill, summary_lines(rows, gpu_mem)), "", f"{name}:", format_table(rows, gpu_mem), ""]
    out += [fill(f"{k}: {v}") for k, v in legend(target)]
    out += ["", "rows:"] + [fill(f"{row_name(r)}: {row_note(r)}; act+temp peaks in {r.peak_at}") for r in rows]
    out += [fill(f"skipped {s.method} {s.setting}: {s.reason}") for s in skipped]
    return "\n".join(out)


def to_json(header: dict, rows: list[Row], skipped: list[Skipped]) -> str:
    from .planner import as_dict

    return json.dumps({**header, "rows": [as_dict(r) for r in rows], "skipped": [as_dict(s) for s in skipped]},
                      indent=1)
