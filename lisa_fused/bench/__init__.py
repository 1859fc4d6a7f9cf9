"""`lisa-fused bench`: full AdamW, LoRA and FusedLISA fine-tuning the same model on the same data.

data.py (offline text, byte tokens), models.py (presets, loading), methods.py (one optimizer setup per
method), memory.py (peak-memory meters), run.py (one method in its own process), report.py (table,
JSON, PNG), bench.py (the whole benchmark, driven by cli.py).
"""

import os as _os

# The methods (methods.py builds each) and those run without --methods; here, torch-free, so that the
# CLI validates --methods before it imports torch.
METHODS = ("full", "lora", "lora-fa", "lisa", "lisa-device", "lisa-8bit", "lisa-4bit", "lisa-4bit-sr")
DEFAULT_METHODS = ("full", "lora", "lisa", "lisa-device")


def this_package_code(call: str) -> str:
    """`python -c` code that imports the lisa_fused this process imported (its package root first on
    sys.path: `-c` would otherwise put the working directory, perhaps a source tree without the compiled
    extension, first), then runs `call`, e.g. "from lisa_fused.cli import main; sys.exit(main())"."""
    import lisa_fused

    root = _os.path.dirname(_os.path.dirname(_os.path.realpath(lisa_fused.__file__)))
    return f"import sys; sys.path.insert(0, {root!r}); {call}"
