"""Model presets (Llama architecture from a LlamaConfig, nothing downloaded) and model loading.

`tiny` is sized for a 2-core CPU and byte tokens. `llama-1b` (Llama-3.2-1B shape) and `llama-2-7b`
keep the real vocabulary size so that memory matches the real model; byte ids use the first 259 rows.
They are meant for a GPU in bf16 and start from a seeded random init (no base training).
"""
from __future__ import annotations

import os

import torch

from .data import BYTE_VOCAB, EOS, PAD, BOS

PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=BYTE_VOCAB, max_position_embeddings=2048,
                 tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
}
# What each preset runs with unless told otherwise.
PRESET_DEFAULTS = {
    "tiny": dict(dtype="float32", base_steps=100),
    "llama-1b": dict(dtype="bfloat16", base_steps=0),
    "llama-2-7b": dict(dtype="bfloat16", base_steps=0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(preset: str | None, model_path: str | None):
    """The config of the model to benchmark: a preset's LlamaConfig or a local checkpoint's config."""
    if model_path is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path, local_files_only=True)
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[preset], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


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
