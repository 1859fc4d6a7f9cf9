"""`lisa-fused bench`: full AdamW, LoRA and FusedLISA fine-tuning the same model on the same data.

data.py (offline text, byte tokens), models.py (presets, loading), methods.py (one optimizer setup per
method), memory.py (peak-memory meters), run.py (one method in its own process), report.py (table,
JSON, PNG), bench.py (the whole benchmark, driven by cli.py).
"""
