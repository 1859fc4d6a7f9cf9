"""Offline text for the benchmark and byte-level tokens.

Base training reads the Python source of a fixed set of standard-library modules; fine-tuning reads a
different text that every CPython install also carries: the English reference documentation that
`help()` serves (`pydoc_data.topics`). Code then prose gives the fine-tuning a real distribution
shift. The held-out eval split is every tenth fine-tuning document, never trained on.

Tokens are bytes (ids 0..255) plus specials, so no tokenizer is downloaded. A `--model` checkpoint that
ships its own tokenizer uses that instead (see `encode_documents`).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from ..presets import BOS, BYTE_VOCAB, EOS, PAD  # noqa: F401  (byte-token ids, defined with the presets)

# Base-training text: source files of these modules (a package means its __init__.py).
BASE_MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "csv", "dataclasses", "difflib",
    "enum", "functools", "inspect", "logging", "pathlib", "pickle", "random", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "zipfile",
)
# Fine-tuning text when pydoc_data is missing (some distributions split it out): other modules' source.
FALLBACK_FT_MODULES = (
    "email", "http", "json", "urllib", "xml", "sqlite3", "unittest", "asyncio", "concurrent", "html",
    "importlib", "multiprocessing", "wsgiref", "xmlrpc", "ctypes", "curses", "dbm", "venv", "zoneinfo",
)
HELD_OUT_EVERY = 10


@dataclass
class Corpus:
    name: str          # what the text is, for the report
    train: list[str]
    eval: list[str]


def module_sources(names) -> list[str]:
    texts = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py") and os.path.exists(spec.origin):
            with open(spec.origin, encoding="utf-8") as f:
                texts.append(f.read())
    return texts


def base_corpus() -> list[str]:
    return module_sources(BASE_MODULES)


def split_documents(name: str, docs: list[str]) -> Corpus:
    """Every HELD_OUT_EVERY-th document (from the first) goes to eval; a single document is cut at 90%."""
    if len(docs) == 1:
        cut = int(len(docs[0]) * 0.9)
        return Corpus(name, [docs[0][:cut]], [docs[0][cut:]])
    return Corpus(name,
                  [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != 0],
                  [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0])


def finetune_corpus(path: str | None = None) -> Corpus:
    if path is not None:
        return split_documents(os.path.basename(path), read_text_file(path))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return split_documents("stdlib source: " + ",".join(FALLBACK_FT_MODULES), module_sources(FALLBACK_FT_MODULES))
    return split_documents("pydoc_data.topics (Python reference docs)", [topics[k] for k in sorted(topics)])


def read_text_file(path: str) -> list[str]:
    """A .txt file is one document; a .jsonl file is one document per line's "text" field."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        docs = []
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field \"text\"")
                docs.append(record["text"])
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def encode_documents(docs: list[str], tokenizer=None) -> torch.Tensor:
    """One flat int32 stream: BOS doc EOS BOS doc EOS ... (bytes, or the tokenizer's ids and EOS)."""
    ids: list[int] = []
    for doc in docs:
        if tokenizer is None:
            ids.append(BOS)
            ids.extend(doc.encode("utf-8"))
            ids.append(EOS)
        else:
            ids.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def batch_starts(n_tokens: int, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] window starts, drawn from their own generator: identical for every method."""
    if n_tokens < seq_len + 1:
        raise ValueError(f"the training text has {n_tokens} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (steps, batch_size), generator=g)


def eval_starts(n_tokens: int, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows from the start of the held-out stream, at most `max_windows`."""
    n = min(max_windows, n_tokens // seq_len)
    if n < 1:
        raise ValueError(f"the held-out text has {n_tokens} tokens, fewer than --seq-len = {seq_len}")
    return torch.arange(n) * seq_len


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = starts.view(-1, 1) + torch.arange(seq_len).view(1, -1)
    return tokens[idx].long()
