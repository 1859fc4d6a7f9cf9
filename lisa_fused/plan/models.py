"""Model configs for the planner: presets written in code (no download), a config.json, or a local model
folder; and the model built on the `meta` device (no memory) from one.

Preset shapes are copied from each model's published config.json on the Hugging Face hub.
"""
from __future__ import annotations

import json
import os

import torch

# name -> (config class in transformers, its kwargs)
PRESETS = {
    "llama-2-7b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=None, rms_norm_eps=1e-5)),
    "gemma-2-9b": ("Gemma2Config", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0)),
}


def _bench_tiny():
    from ..bench.data import BOS, EOS, PAD
    from ..bench.models import TINY

    return "LlamaConfig", dict(TINY, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def preset_names() -> list[str]:
    return sorted(PRESETS) + ["tiny"]


def load_config(model: str):
    """A transformers config from a preset name, a config.json path, or a local model folder.

    Raises ValueError with one line naming `model` when it is none of these or cannot be read.
    """
    import transformers

    if model in PRESETS or model == "tiny":
        cls, kwargs = PRESETS[model] if model != "tiny" else _bench_tiny()
        return getattr(transformers, cls)(**kwargs)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.exists(path):
        if os.sep in model or model.endswith(".json") or os.path.isdir(model):  # meant as a path
            missing = "has no config.json" if os.path.isdir(model) else "no such file or folder"
            raise ValueError(f"MODEL {model!r}: {missing}; give a config.json, a model folder with one, or a "
                             f"preset ({', '.join(preset_names())})")
        raise ValueError(f"MODEL {model!r}: not a preset ({', '.join(preset_names())}), a config.json or a "
                         f"folder with one")
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()
