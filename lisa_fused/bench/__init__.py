"""`lisa-fused bench`: full AdamW, LoRA, FusedLISA and the peers a user would pick instead (BAdam, LISA as
published, GaLore, 8-bit AdamW) fine-tuning the same model on the same data.

data.py (offline text, byte tokens), models.py (presets, loading), methods.py (one optimizer setup per
method), peers.py (the peers' setups, as their own projects build them), memory.py (peak-memory meters),
progress.py (progress lines), run.py (one method in its own process), summary.py (the one-line summaries,
the 120-column table and its legend), report.py (results.md, JSON), plot.py (bench.png), bench.py (the
whole benchmark, driven by cli.py).
"""

import os as _os

# The methods (methods.py builds each) and those run without --methods; here, torch-free, so that the
# CLI validates --methods before it imports torch.
METHODS = ("full", "lora", "lora-fa", "lisa", "lisa-device", "lisa-8bit", "lisa-4bit", "lisa-4bit-sr",
           "lisa-published", "badam", "galore", "adamw-8bit", "adamw-8bit-bnb")
DEFAULT_METHODS = ("full", "lora", "lisa", "lisa-device")
FUSED_LISA_METHODS = ("lisa", "lisa-device", "lisa-8bit", "lisa-4bit", "lisa-4bit-sr")  # FusedLISA runs these
# one run, not one per --seeds: nothing in them depends on the run seed (no draws, no random init)
DETERMINISTIC = ("full", "badam", "galore", "adamw-8bit", "adamw-8bit-bnb")
# `--methods peers`: FusedLISA against what a user would pick instead (peers.py builds each)
PEERS = ("lisa", "lisa-published", "badam", "galore", "adamw-8bit", "adamw-8bit-bnb")
GROUPS = {"peers": PEERS, "default": DEFAULT_METHODS}  # names --methods expands in place
# method -> (module it needs, the pip requirement it was tested with); pyproject.toml's [peers] pins the same
PEER_PACKAGES = {"badam": ("badam", "badam==1.4"), "galore": ("galore_torch", "galore-torch==1.0"),
                 "adamw-8bit": ("torchao", "torchao==0.18.0"), "adamw-8bit-bnb": ("bitsandbytes", "bitsandbytes==0.50.2")}


def install_line(method: str) -> str:
    """How to install what `method` needs: its pinned package, or all peers through the extra."""
    return f'pip install "{PEER_PACKAGES[method][1]}" (or every peer: pip install "lisa_fused[peers]")'


def this_package_code(call: str) -> str:
    """`python -c` code that imports the lisa_fused this process imported (its package root first on
    sys.path: `-c` would otherwise put the working directory, perhaps a source tree without the compiled
    extension, first), then runs `call`, e.g. "from lisa_fused.cli import main; sys.exit(main())"."""
    import lisa_fused

    root = _os.path.dirname(_os.path.dirname(_os.path.realpath(lisa_fused.__file__)))
    return f"import sys; sys.path.insert(0, {root!r}); {call}"
