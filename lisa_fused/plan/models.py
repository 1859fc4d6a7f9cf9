"""Model configs for the planner: presets written in code (no download), a config.json, or a local model
folder; and the model built on the `meta` device (no memory) from one.

The presets (published shapes and the bench's `tiny`) are `lisa_fused.presets`.
"""
from __future__ import annotations

import json
import os

import torch

from .. import presets

PRESETS = presets.PUBLISHED  # name -> (config class in transformers, its kwargs); "tiny" is presets.TINY
preset_names = presets.names


def load_config(model: str):
    """A transformers config from a preset name, a config.json path, or a local model folder.

    Raises ValueError with one line naming `model` when it is none of these or cannot be read.
    """
    if model in presets.names():
        return presets.make_config(model)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.exists(path):
        if os.sep in model or model.endswith(".json") or os.path.isdir(model):  # meant as a path
            missing = "has no config.json" if os.path.isdir(model) else "no such file or folder"
            raise ValueError(f"MODEL {model!r}: {missing}; give a config.json, a model folder with one, or a "
                             f"preset ({', '.join(preset_names())})")
        raise ValueError(f"MODEL {model!r}: not a preset ({', '.join(preset_names())}), a config.json or a "
                         f"folder with one")
    import transformers

    try:
        with open(path) as f:
            raw = json.load(f)
        model_type = raw["model_type"]
        return transformers.AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"MODEL {model!r}: cannot read {path}: {type(exc).__name__}: {exc}") from None


def meta_model(config, dtype: torch.dtype, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The causal LM of `config` on the meta device in `dtype`, in train mode. ValueError names a model
    type transformers cannot build as a causal LM."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r}: no causal LM to build: "
                         f"{str(exc).splitlines()[0]}") from None
    if gradient_checkpointing:
        # transformers 5 renamed it (gradient_checkpointing_enable warns: removed in v6); older ones lack the new name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()
