"""Model presets shared by `lisa-fused bench` and `lisa-fused plan`: nothing downloaded, no torch imported.

PUBLISHED: Llama-2-7B, Llama-3-8B, Llama-3.2-1B, Qwen2.5-7B, Mistral-7B and Gemma-2-9B shapes, copied from
each model's published config.json on the Hugging Face hub (real vocabulary sizes, so memory matches the
real model). TINY: a small Llama sized for a 2-core CPU and byte tokens (BYTE_VOCAB ids: the 256 byte
values, then BOS, EOS, PAD).

This module sits below both `lisa_fused.bench` and `lisa_fused.plan` and imports neither (nor torch, nor
transformers): the CLI validates preset names with it before anything heavy is imported.
"""
from __future__ import annotations

# Byte tokens: ids 0..255 are the bytes, then the specials (lisa_fused.bench.data encodes with them).
BOS, EOS, PAD = 256, 257, 258
BYTE_VOCAB = 259
BYTE_TOKEN_IDS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)

# name -> (config class in transformers, its kwargs)
PUBLISHED = {
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

TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=BYTE_VOCAB, max_position_embeddings=2048, tie_word_embeddings=False)
ALIASES = {"llama-1b": "llama-3.2-1b"}  # the bench's earlier name for the Llama-3.2-1B shape
BENCH_NAMES = ("tiny", *sorted(PUBLISHED))  # `lisa-fused bench --preset` choices, its default first


def names() -> list[str]:
    """Every preset name (aliases left out): the published shapes, sorted, then "tiny"."""
    return sorted(PUBLISHED) + ["tiny"]


def spec(name: str) -> tuple[str, dict]:
    """(transformers config class name, a fresh kwargs dict) of preset `name` or an alias of one. "tiny"
    carries its byte-token ids; the published shapes carry only what their config.json says.
    KeyError names `name` and the presets."""
    name = ALIASES.get(name, name)
    if name == "tiny":
        return "LlamaConfig", dict(TINY, **BYTE_TOKEN_IDS)
    if name not in PUBLISHED:
        raise KeyError(f"preset {name!r}: choose from {', '.join(names())}")
    cls, kwargs = PUBLISHED[name]
    return cls, dict(kwargs)


def make_config(name: str, **overrides):
    """The transformers config of preset `name` (imports transformers), with `overrides` on top."""
    import transformers

    cls, kwargs = spec(name)
    return getattr(transformers, cls)(**{**kwargs, **overrides})
