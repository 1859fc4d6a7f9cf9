"""Model presets (nothing downloaded) and model loading.

The presets live in `lisa_fused.presets` (shared with the planner): `tiny`, sized for a 2-core CPU and
byte tokens, and the published Llama-2-7B, Llama-3-8B, Llama-3.2-1B, Qwen2.5-7B, Mistral-7B, Gemma-2-9B
shapes with their real vocabulary sizes, so memory matches the real model; byte ids use their first 259
rows. Those are meant for a GPU in bf16 and start from a seeded random init (no base training).
"""
from __future__ import annotations

import os

import torch

from .. import presets
from ..presets import ALIASES, BYTE_TOKEN_IDS, TINY  # noqa: F401  (TINY, ALIASES: importable from here too)

PRESETS = presets.BENCH_NAMES
# What each preset runs with unless told otherwise.
PRESET_DEFAULTS = {name: dict(dtype="bfloat16", base_steps=0) for name in (*PRESETS, *ALIASES)}
PRESET_DEFAULTS["tiny"] = dict(dtype="float32", base_steps=100)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(preset: str | None, model_path: str | None):
    """The config of the model to benchmark: a preset's config (`tiny`: a LlamaConfig) or a local
    checkpoint's config. KeyError for a preset name not in PRESETS or ALIASES."""
    if model_path is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path, local_files_only=True)
    return presets.make_config(preset, **BYTE_TOKEN_IDS)


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def load_tokenizer(model_path: str | None):
    """The checkpoint's own tokenizer when it ships one; None means byte tokens."""
    if model_path is None:
        return None
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.exists(os.path.join(model_path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, local_files_only=True)


def build_model(config, *, model_path: str | None, dtype: torch.dtype, device: torch.device, seed: int,
                state_path: str | None = None):
    """Identical weights in every process: a checkpoint, a cached base state, or a seeded init."""
    from transformers import AutoModelForCausalLM

    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        model.to(device)
    else:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))
    return model


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
