"""torch.compile with FusedLISA on CPU. The switch flips requires_grad on the leaving and arriving blocks'
params, and Dynamo guards on every parameter's requires_grad: a compiled *model* recompiles once for each
new active set (until torch._dynamo.config.recompile_limit, 8, after which that frame runs eagerly); a
compiled *block* (each decoder layer compiled on its own) compiles two graphs, trainable and frozen, and
never again at a switch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters, guard_failures

from lisa_fused import FusedLISA
from helpers import MLPStack, assert_trained_changed_frozen_kept, lm_batch, params_of, tiny_llama

N_ACTIVE, K, STEPS = 2, 2, 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    yield
    torch._dynamo.reset()


def mse_step(model, opt, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def lm_step(model, opt, t):
    x = lm_batch(t)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def run(model, call, step, seed):
    opt = FusedLISA(model, lr=1e-2, n_active_layers=N_ACTIVE, switch_every=K, seed=seed, backend="torch")
    seen, before = [], params_of(model)
    for t in range(STEPS):
        if opt.active_layers not in seen:
            seen.append(opt.active_layers)
        step(call, opt, t)
    assert_trained_changed_frozen_kept(model, before, set().union(*seen))
    return seen


@pytest.mark.slow
def test_compiled_model_recompiles_once_per_new_active_set():
    """torch.compile(model) with the default backend (inductor): trains like eager, and each active set
    not met before costs one recompile, triggered by a requires_grad guard on a parameter."""
    eager = MLPStack(37, 4, seed=0)
    model = copy.deepcopy(eager)
    seen = run(model, torch.compile(model), mse_step, seed=0)
    assert run(eager, eager, mse_step, seed=0) == seen
    assert len(seen) == 3, "seed 0 draws three different sets in three intervals"
    assert counters["stats"]["unique_graphs"] == len(seen)
    # (a lookup that misses lists one failure per cached graph it tried)
    reasons = [r for rs in guard_failures.values() for r in rs]
    assert reasons and all("requires_grad mismatch" in r for r in reasons), reasons
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_compile_twice_and_not_at_a_switch():
    """Each decoder layer of a tiny Llama compiled on its own (use_cache=False: a KV cache would add guards
    per layer): two graphs in all, whatever the active sets; trains like eager. aot_eager keeps CI fast;
    inductor behaves the same (checked by hand, ~60 s to build its kernels on 2 cores)."""
    eager = tiny_llama(4, seed=0)
    eager.config.use_cache = False
    model = copy.deepcopy(eager)
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    seen = run(model, model, lm_step, seed=0)
    assert run(eager, eager, lm_step, seed=0) == seen
    assert len(seen) == 3
    assert counters["stats"]["unique_graphs"] == 2
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
