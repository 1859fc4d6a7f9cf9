"""`lisa-fused plan`: predicted peak memory of one training step per method and state setting, without
allocating the model (it is built on the `meta` device, traced with fake tensors).

    lisa-fused plan llama-3-8b --gpu-mem 24GiB --batch-size 1 --seq-len 1024 --json plan.json

MODEL is a preset (models.PRESETS, plus the bench's `tiny`), a config.json or a local model folder.
Each row splits the peak into weights, trainable state (grads, moments, masters, scales), activations
and temporaries (logits and loss included); planner.py says where each number comes from.
Units: bytes in the JSON, GiB (2**30 bytes) in the table.

JSON (`--json PATH`), one object:
    model, model_type, dtype ("bfloat16" ...), batch_size, seq_len, gradient_checkpointing, lora_rank,
    gamma, target ("cuda" | "cpu": whose memory is predicted), traced_on ("cuda" | "cpu": the fake
    device the step was traced on; "cpu" for a cuda target means CPU kernels' temporaries),
    gpu_mem_bytes (int or null), n_blocks, lisa_fused_version,
    rows: list of {method ("full" | "lora" | "lisa"), setting (str), kwargs (FusedLISA keywords, {} for
        full/lora), weights_bytes, state_bytes, activation_bytes, host_bytes, peak_bytes (weights + state
        + activations, + host on a cpu target), fits (bool, null without gpu_mem), max_batch_size (int or
        null), max_gamma (int, lisa only, else null), peak_at (where in the step activations + temporaries
        peak: "optimizer step", "LM head + loss", "backward, top trainable block"...)},
    skipped: list of {method, setting, reason}: LISA settings the installed FusedLISA does not accept.
"""
from __future__ import annotations

import importlib

# Public name -> the submodule that defines it. Imported on first use (PEP 562), so that `lisa-fused`
# can parse a --gpu-mem size (report.parse_size) without importing torch.
_EXPORTS = {**dict.fromkeys(("PRESETS", "load_config", "meta_model", "preset_names"), "models"),
            **dict.fromkeys(("LISA_SETTINGS", "Planner", "Row", "Skipped", "plan"), "planner"),
            **dict.fromkeys(("format_table", "parse_size", "to_json"), "report")}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
