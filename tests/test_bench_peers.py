"""The bench's peers (lisa_fused/bench/peers.py): each builds and steps on a tiny Llama, trains what its own
project trains and leaves frozen what it freezes, and its optimizer bytes count what it really keeps; a
missing package is a skipped row with its install line, never a crash. A test whose peer package is not
installed is skipped, naming the install line."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import tiny_llama

from lisa_fused.bench import PEER_PACKAGES, bench, install_line, methods, peers, run

CFG = dict(lr=1e-2, lora_lr=1e-2, lora_rank=4, gamma=1, switch_every=2, seed=0, run_seed=0, weight_decay=0.0)
N_BLOCKS = 4


def _need(method):
    module, pin = PEER_PACKAGES[method]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{method} needs {module}: {install_line(method)}")


def _train(setup, steps=4):
    """The bench's loop by hand: on_step_begin, forward/backward, grads read, step, state read."""
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    trace = []
    for i in range(steps):
        if setup.on_step_begin is not None:
            setup.on_step_begin(i)
        setup.model(input_ids=x, labels=x).loss.backward()
        grads = setup.grad_bytes()
        setup.optimizer.step()
        trace.append((grads, *setup.state_bytes()))
        setup.optimizer.zero_grad()
    return trace


def _build(method, hidden=32):
    model = tiny_llama(N_BLOCKS, hidden=hidden)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = methods.build(method, model, CFG)
    return setup, before


def _block_names(indices):
    """Parameter names of the tiny Llama's blocks `indices` (find_layout lists trainable params only)."""
    names = [n for n, _ in tiny_llama(N_BLOCKS).named_parameters()]
    return {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in indices)}


def _changed(setup, before):
    return {n for n, p in setup.model.named_parameters() if not torch.equal(before[n], p)}


def test_lisa_published_flips_requires_grad_and_keeps_every_drawn_blocks_state():
    setup, before = _build("lisa-published")
    switch = setup.on_step_begin.__self__
    assert isinstance(setup.optimizer, torch.optim.AdamW)
    assert len(setup.optimizer.param_groups[0]["params"]) == len(before)  # built over every parameter
    trace = _train(setup, steps=6)  # switches at steps 0, 2, 4
    drawn = _block_names(switch.drawn)
    always = {n for n in before if not n.startswith("model.layers.")}
    assert 1 <= len(switch.drawn) <= 3 and len(switch.drawn) < N_BLOCKS, "the seed draws too many blocks for the test"
    assert _changed(setup, before) == drawn | always, "trained: the drawn blocks and everything outside the stack"
    now = _block_names(switch.active_layers_indices)
    assert {n for n, p in setup.model.named_parameters() if p.requires_grad} == now | always
    # AdamW's state: exp_avg + exp_avg_sq (8 bytes per element) and a 4-byte step for every parameter it ever
    # stepped; it never shrinks, while the grads are those of the current blocks only
    stepped = [p for n, p in setup.model.named_parameters() if n in drawn | always]
    assert trace[-1][1] == 8 * sum(p.numel() for p in stepped) + 4 * len(stepped) and trace[-1][2] == 0
    assert [t[1] for t in trace] == sorted(t[1] for t in trace)
    assert trace[-1][0] == 4 * setup.trainable_params()
    # the same draws as numpy's global generator after np.random.seed(seed), as LMFlow's callback makes them
    import numpy as np

    np.random.seed(CFG["seed"])
    first = [int(i) for i in np.random.choice(range(N_BLOCKS), CFG["gamma"], replace=False)]
    assert first == peers.PublishedLISASwitch(tiny_llama(N_BLOCKS), CFG["gamma"], 2, CFG["seed"]).rng.choice(
        range(N_BLOCKS), CFG["gamma"], replace=False).tolist()


def test_badam_trains_one_block_with_an_fp32_master_and_freezes_embedding_and_head():
    _need("badam")
    setup, before = _build("badam")
    trace = _train(setup)
    block0 = _block_names([0])
    assert _changed(setup, before) == block0  # BAdam's default: block 0 first, 50 steps per block
    numel = setup.trainable_params()
    assert numel == sum(p.numel() for n, p in setup.model.named_parameters() if n in block0)
    grads, dev, host = trace[-1]
    assert grads == 4 * numel and host == 0  # read before step(): BAdam frees them inside it
    assert dev == 12 * numel + 4 * len(block0)  # fp32 master + exp_avg + exp_avg_sq, one step per tensor


def test_galore_trains_everything_and_counts_its_projections():
    _need("galore")
    setup, before = _build("galore")
    trace = _train(setup)
    assert _changed(setup, before) == set(before)
    state = setup.optimizer.state
    projectors = [st["projector"].ortho_matrix for st in state.values() if "projector" in st]
    assert len(projectors) == 7 * N_BLOCKS  # every nn.Linear of attention and MLP
    moments = sum(t.numel() * t.element_size() for st in state.values() for k, t in st.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    held = sum({p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in projectors}.values())
    assert trace[-1][1] == moments + held  # GaLore's step count is an int, not a tensor
    assert "no compression at this width" in setup.describe  # rank 128 >= the tiny model's widths


@pytest.mark.slow  # torchao compiles its step with torch.compile (tens of seconds on a 2-core CPU)
@pytest.mark.parametrize("method", ["adamw-8bit", "adamw-8bit-bnb"])
def test_8bit_adamw_trains_everything_and_counts_its_codes_not_fp32(method):
    _need(method)
    try:
        setup, before = _build(method, hidden=128)  # tensors of 4096+ elements: quantized
    except peers.Unavailable as exc:  # bitsandbytes without a CPU path
        pytest.skip(str(exc))
    trace = _train(setup, steps=2)
    assert _changed(setup, before) == set(before)
    big = sum(p.numel() for p in setup.model.parameters() if p.numel() >= 4096)
    small = sum(p.numel() for p in setup.model.parameters() if p.numel() < 4096)
    assert big > 10 * small
    # 8-bit codes for both moments of the large tensors (2 bytes per element, plus block scales and code maps),
    # fp32 for the small ones (8 bytes): far under fp32 moments for everything
    dev = trace[-1][1]
    assert 2 * big + 8 * small <= dev < 0.5 * 8 * (big + small), dev


def test_a_missing_package_is_unavailable_with_its_install_line(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "badam":
            raise ImportError("No module named 'badam'")
        return real(name, *a, **k)

    monkeypatch.setattr(peers.importlib, "import_module", fake)
    with pytest.raises(peers.Unavailable) as exc:
        methods.build("badam", tiny_llama(2), CFG)
    assert exc.value.install == install_line("badam") and 'pip install "badam==1.4"' in exc.value.install
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    missing = bench.missing_package("galore")
    assert missing == {"method": "galore", "reason": "galore_torch is not installed", "install": install_line("galore")}
    assert bench.missing_package("lisa-published") is None  # torch only


def test_the_bench_reports_skipped_peers_and_runs_the_rest(monkeypatch, tmp_path):
    """run_all: a package missing in the parent skips the method without a process, one that cannot run in
    the child comes back as skipped; neither is a failure, and their other seeds are not tried."""
    monkeypatch.setattr(bench, "missing_package",
                        lambda m: {"method": m, "reason": "x is not installed", "install": "pip install x"}
                        if m == "galore" else None)
    ran = []

    def fake_run_one(spec, cache):
        ran.append(spec["label"])
        if spec["method"] == "adamw-8bit-bnb":
            return {"skipped": {"method": spec["label"], "reason": "no CPU path", "install": "pip install y"}}, None
        return {"method": spec["label"], "base_method": spec["method"], "load_avg": [0, 0], "cpu_share": 1.0}, None

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    specs = [dict(method=m, label=f"{m} s{k}") for m in ("lisa", "galore", "adamw-8bit-bnb") for k in (0, 1)]
    rows, failures, skipped = bench.run_all(specs, tmp_path, None, "cpu")
    assert ran == ["lisa s0", "lisa s1", "adamw-8bit-bnb s0"]
    assert [r["method"] for r in rows] == ["lisa s0", "lisa s1"] and failures == []
    assert [(s["method"], s["reason"]) for s in skipped] == [("galore", "x is not installed"),
                                                             ("adamw-8bit-bnb", "no CPU path")]


def test_the_child_writes_a_skipped_row_for_an_unavailable_peer(monkeypatch, tmp_path):
    import lisa_fused

    def unavailable(spec):
        raise peers.Unavailable("badam", "badam is not installed", install_line("badam"))

    monkeypatch.setattr(run, "run_method", unavailable)
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"method": "badam", "label": "badam", "lisa_fused_file": lisa_fused.__file__}))
    assert run.main([str(spec), str(result)]) == 0
    assert json.loads(result.read_text()) == {"skipped": {"method": "badam", "reason": "badam is not installed",
                                                          "install": install_line("badam")}}


def test_deterministic_peers_run_once_and_seeded_ones_once_per_seed():
    import argparse

    args = argparse.Namespace(methods=["lisa", "lisa-published", "badam", "galore", "adamw-8bit"],
                              samplers=["uniform"], seeds=3, seed=0)
    labels = [s["label"] for s in bench.run_specs(args, {"seed": 0})]
    assert labels == ["lisa s0", "lisa s1", "lisa s2", "lisa-published s0", "lisa-published s1",
                      "lisa-published s2", "badam", "galore", "adamw-8bit"]
