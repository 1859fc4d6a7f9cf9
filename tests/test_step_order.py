"""What step() does in which order, where a CPU can see it (issue 29, items 2 and 4):

* the fp32 masters of bf16 params are re-read from params written since (step 0: DeepSpeed's / DDP's
  broadcast) only after the page-in of the last switch is waited for (MomentStore.wait_ready), so on CUDA
  the compute stream never reads masters the page-in stream is still writing;
* with param groups that differ in betas (one launch per distinct triple) and the grad_norm sampler, the
  index tensor that scatters each launch's grad sums is built once per active set, not every step (a
  torch.tensor(..., device=cuda) per step is a host sync).
"""
from __future__ import annotations

import torch

from lisa_fused import FusedLISA

from helpers import MLPStack, lm_batch, tiny_llama


def test_masters_are_adopted_after_the_page_in_is_waited_for(monkeypatch):
    model = tiny_llama(n_layers=4, dtype=torch.bfloat16)
    opt = FusedLISA(model, lr=1e-2, n_active_layers=1, switch_every=1, backend="cpu")
    calls = []
    wait, adopt = opt._store.wait_ready, type(opt._binding).adopt_written

    def record_wait():
        calls.append("wait_ready")
        wait()

    def record_adopt(binding):
        calls.append(f"adopt({len(binding.dirty)})")
        adopt(binding)

    monkeypatch.setattr(opt._store, "wait_ready", record_wait)
    monkeypatch.setattr(type(opt._binding), "adopt_written", record_adopt)
    emb = model.model.embed_tokens.weight
    for t in range(3):  # step 0 (every master dirty), then switches: the arriving blocks' masters
        with torch.no_grad():
            emb[0, 0] = 100.0 + t  # a write through the param: its master must take it
        model(lm_batch(t), labels=lm_batch(t)).loss.backward()
        opt.step()
        opt.zero_grad()
        # the step started from the written value (lr 1e-2 moves it by ~0.01): the master re-read it
        assert abs(emb[0, 0].item() - (100.0 + t)) < 1.0, (t, emb[0, 0].item())
    adopts = [k for k, c in enumerate(calls) if c.startswith("adopt")]
    assert len(adopts) == 3, calls
    for k in adopts:  # every adopt comes right after a wait of the same step
        assert calls[k - 1] == "wait_ready", calls


def test_grad_sum_scatter_index_is_built_once_per_active_set():
    model = MLPStack(n_layers=4)
    opt = FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=50, sampler="grad_norm", backend="torch",
                    param_groups=[{"params": ["out.*"], "betas": (0.8, 0.99)}])
    x = torch.randn(8, 3)
    seen = []
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        segments = opt._slots.segments()[0][0]
        seen.append({k: v for k, v in segments.cache.items() if isinstance(k, tuple) and k[0] == "positions"})
    assert seen[0], "the grad_norm meter over two launches uses no cached positions"
    for later in seen[1:]:  # the same tensors, not rebuilt (no host->device copy per step)
        assert later.keys() == seen[0].keys() and all(later[k] is seen[0][k] for k in later)
    assert opt._meter.kernel_buffer().abs().sum() > 0  # the sums were scattered
