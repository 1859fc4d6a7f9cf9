"""Table and JSON of a plan (the JSON fields are documented in lisa_fused/plan/__init__.py)."""
from __future__ import annotations

import json
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


def format_table(rows: list[Row], gpu_mem: int | None) -> str:
    name, unit = unit_for(rows)
    fit = f"fits {gpu_mem / unit:.1f} {name}" if gpu_mem else "fits"
    head = ["method", "setting", f"weights {name}", f"state {name}", f"act+temp {name}", "act+temp peaks in",
            f"peak {name}", fit, "max batch", "max gamma", f"host {name}"]
    body = []
    for r in rows:
        gib = lambda n: f"{n / unit:.2f}"  # noqa: E731
        body.append([r.method, r.setting, gib(r.weights_bytes), gib(r.state_bytes), gib(r.activation_bytes),
                     r.peak_at, gib(r.peak_bytes), "-" if r.fits is None else ("yes" if r.fits else "NO"),
                     _count(r.max_batch_size), _count(r.max_gamma), gib(r.host_bytes)])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def to_json(header: dict, rows: list[Row], skipped: list[Skipped]) -> str:
    from .planner import as_dict

    return json.dumps({**header, "rows": [as_dict(r) for r in rows], "skipped": [as_dict(s) for s in skipped]},
                      indent=1)
