"""Shared test helpers: tiny models from configs, readable ids, trajectory comparison."""
from __future__ import annotations

import torch
from torch import nn

TOL = {  # relative error allowed per dtype of the compared tensors (see test_kernels.py for kernels)
    torch.float32: 1e-6,
    torch.bfloat16: 2 ** -7,  # one bf16 ulp, relative
    torch.float16: 2 ** -10,
}


def describe(x) -> str:
    if isinstance(x, torch.dtype):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x, str(x))
    return str(x)


def tiny_llama(n_layers=4, seed=0, dtype=torch.float32, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(n_layers=4, seed=0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=n_layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype)


class MLPStack(nn.Module):
    """A plain model with a block stack of odd sizes, cheap enough for hundreds of steps."""

    def __init__(self, width=37, n_layers=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_layers))
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def lm_batch(seed, vocab=97, batch=2, seq=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def stack_of(model):
    from lisa_fused.layers import find_layout

    return find_layout(model).stack


def freeze_like(stack, active):
    for i, blk in enumerate(stack):
        for p in blk.parameters():
            p.requires_grad_(i in active)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_rel(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def opt_moments(opt, name_to_index=None):
    """{param index: (exp_avg, exp_avg_sq)} from FusedLISA.state_dict()."""
    sd = opt.state_dict()
    return {i: (e["exp_avg"], e["exp_avg_sq"]) for i, e in sd["state"].items()}


def params_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_trained_changed_frozen_kept(model, before: dict, ever_active):
    """After a training run: every param outside the block stack and every param of a block that was active
    at some step changed; the params of blocks never active did not. A run that trains nothing fails."""
    import re

    ever = set(ever_active)
    assert ever, "no active blocks recorded"
    for name, p in model.named_parameters():
        m = re.search(r"(?:blocks|layers)\.(\d+)\.", name)
        should = m is None or int(m.group(1)) in ever
        moved = not torch.equal(p.detach(), before[name])
        assert moved == should, f"{name}: {'unchanged' if should else 'changed'} (blocks ever active: {sorted(ever)})"


def run_two_processes(worker: str, out, timeout_s: int, env_extra=None) -> dict:
    """torchrun --standalone --nproc_per_node=2 tests/WORKER OUT; returns {scenario: (rank0, rank1)} from the
    OUT/rank{r}.pt files the worker writes. Fails the test (pytest.fail) on a timeout or a non-zero exit,
    with the log's tail; the launcher runs in its own session so a hang kills its workers too."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    here = Path(__file__).resolve().parent
    env = dict(os.environ, **(env_extra or {}),
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(here / worker), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"2-process run of {worker} timed out after {timeout_s}s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun {worker} failed ({proc.returncode}):\n{log[-4000:]}"
    ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {name: (ranks[0][name], ranks[1][name]) for name in ranks[0]}


def watch_transfers(monkeypatch) -> tuple[list, list]:
    """(staged, moved), filled from now on until the test ends (monkeypatch): shapes of the host tensors
    lisa_fused's _tables.to_device sent, and every other call that moves a tensor to a device (Tensor.to /
    .cuda with a device, torch.tensor / as_tensor with device=): the kernels' host->device tables must all
    go through pinned staging (tests/test_cuda_launch.py, tests/test_triton_segments.py)."""
    from lisa_fused.kernels import _tables, native, quant

    inside, moved, staged = [False], [], []
    to_device, tensor_to, tensor_cuda = _tables.to_device, torch.Tensor.to, torch.Tensor.cuda
    tensor, as_tensor = torch.tensor, torch.as_tensor

    def staging(host, device):
        inside[0] = True
        try:
            staged.append(tuple(host.shape))
            return to_device(host, device)
        finally:
            inside[0] = False

    def to(self, *args, **kwargs):
        if not inside[0] and ("device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)):
            moved.append(("Tensor.to", tuple(self.shape), args, kwargs))
        return tensor_to(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        if not inside[0]:
            moved.append(("Tensor.cuda", tuple(self.shape)))
        return tensor_cuda(self, *args, **kwargs)

    def make(fn, name):
        def wrapped(*args, **kwargs):
            if kwargs.get("device") is not None:
                moved.append((name, kwargs["device"]))
            return fn(*args, **kwargs)
        return wrapped

    for module in (_tables, native, quant):  # `from ._tables import to_device` binds it per module
        if hasattr(module, "to_device"):
            monkeypatch.setattr(module, "to_device", staging)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "cuda", cuda)
    monkeypatch.setattr(torch, "tensor", make(tensor, "torch.tensor"))
    monkeypatch.setattr(torch, "as_tensor", make(as_tensor, "torch.as_tensor"))
    return staged, moved
