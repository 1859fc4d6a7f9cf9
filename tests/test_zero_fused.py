"""Issue 25: FusedLISA itself as DeepSpeed ZeRO 1, 2 and 3's client optimizer (lisa_fused/zero_client.py on
lisa_fused/zero.py), 2 CPU processes (gloo), one launch (tests/_zero_fused.py).

Per stage: the loss falls; the always-trained params and every block FusedLISA reported active changed,
never-active blocks are bitwise unchanged, both ranks hold bitwise the same model; the run equals
torch.optim.AdamW (foreach=False) in one process over the whole batches with the freezing FusedLISA
reported (rtol 1e-5, atol 1e-6: the two ranks' gradient average differs from the one-process mean by
rounding, and the native kernel's fused multiply-adds from torch's two roundings); a DeepSpeed checkpoint
saved mid-interval resumes in a fresh model, FusedLISA and engine bitwise; each rank's moments cover only
its partition of the active set (about half the trained elements on each of the 2 ranks); the fp32 masters of
params trained across a switch, and of blocks that come back, are carried bitwise. With DeepSpeed's
`bf16: {enabled: true}` and a bf16 model at stages 1, 2, 3: the same checks, the three stages bitwise equal
to each other, and within 3% of the mean update (mean absolute deviation, plus 2**-12 for one bf16
rounding) of torch AdamW on fp32 masters with bf16 forward/backward (the two ranks' bf16 gradient average
differs from one process's bf16 gradient)."""
from __future__ import annotations

import os

import pytest
import torch

import _zero_fused as Z
from helpers import MLPStack, run_two_processes

if os.environ.get("CI") == "true":
    import deepspeed  # noqa: F401
pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_two_processes("_zero_fused.py", tmp_path_factory.mktemp("zero_fused"), 900, {"OMP_NUM_THREADS": "1"})


def reference(seq, drop=False, dtype=torch.float32, bias_group=False):
    """torch AdamW (foreach=False), one process, whole batches, the blocks of `seq[step]` trainable at each
    step (plus everything outside the stack). drop: a block's state is reset when it re-enters. bf16: AdamW
    on fp32 masters (from the bf16 weights, as ZeRO's), forward/backward in a bf16 copy rounded from them."""
    model = MLPStack(Z.WIDTH, Z.N_LAYERS, seed=0).to(dtype)
    master = MLPStack(Z.WIDTH, Z.N_LAYERS, seed=0)
    master.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    params = list(master.parameters())
    if bias_group:  # (FusedLISA's param_groups=[{"params": ["*.bias"], "weight_decay": 0.0}])
        biases = [p for n, p in master.named_parameters() if n.endswith(".bias")]
        params = [{"params": [p for p in params if all(p is not q for q in biases)]},
                  {"params": biases, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=Z.LR, weight_decay=Z.WD, foreach=False)
    prev = ()
    for step, (x, y) in enumerate(Z.batches()):
        for m in (model, master):
            for b, blk in enumerate(m.blocks):
                for p in blk.parameters():
                    p.requires_grad_(b in seq[step])
                    if drop and b in seq[step] and b not in prev:
                        opt.state.pop(p, None)
        prev = seq[step]
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        for p, q in zip(master.parameters(), model.parameters()):
            p.grad = None if q.grad is None else q.grad.float()
        opt.step()
        model.zero_grad()
        with torch.no_grad():
            for p, q in zip(master.parameters(), model.parameters()):
                q.copy_(p)
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def expected_seq():
    return [a for a in Z.SCHEDULE for _ in range(Z.SWITCH_EVERY)]


def check_trained(r0, r1, stage, seq=None):
    """The schedule (`seq`, default the fixed one) ran on the ZeRO object the engine holds, the loss fell,
    ranks agree bitwise, the always-trained params and ever-active blocks moved and the never-active ones
    did not, masters carried."""
    for r in (r0, r1):
        assert "error" not in r, r.get("error")
        assert r["stage"] == stage and r["same_zero_object"]
        assert r["seq"] == (seq or expected_seq()), r["seq"]
        # (a switch call every SWITCH_EVERY steps: 3 changes of the active set, the last draw keeps it)
        assert r["masters_lost"] == [[]] * (Z.STEPS // Z.SWITCH_EVERY), r["masters_lost"]
    losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses
    ever = {b for a in r0["seq"] for b in a}
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
        block = int(n.split(".")[1]) if n.startswith("blocks.") else None
        moved = not torch.equal(r0["params"][n], r0["before"][n])
        assert moved == (block is None or block in ever), (n, moved)


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero2_drop", 2)])
def test_fused_lisa_trains_under_zero_like_adamw(results, name, stage):
    r0, r1 = results[name]
    check_trained(r0, r1, stage)
    ref = reference(r0["seq"], drop=name.endswith("drop"))
    for n, p in ref.items():
        torch.testing.assert_close(r0["params"][n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name, stage, zero_groups", [("zero2_groups", 2, 2), ("zero3_subgroups", 3, 3),
                                                      ("zero2_accum", 2, 1)])
def test_two_param_groups_zero3_sub_groups_and_accumulation(results, name, stage, zero_groups):
    """ZeRO-2 with a second FusedLISA group (biases, weight_decay 0): two ZeRO groups, so ZeRO calls step()
    per group; ZeRO-3 with sub_group_size=500: the trained set in 3 sub-groups; ZeRO-2 with
    gradient_accumulation_steps=2 (two micro-batches per optimizer step, the switch counted per optimizer
    step). Each equals torch AdamW with the same groups and freezing (tolerance as above)."""
    r0, r1 = results[name]
    check_trained(r0, r1, stage)
    assert r0["zero_groups"] == zero_groups, r0["zero_groups"]
    for n, p in reference(r0["seq"], bias_group=name == "zero2_groups").items():
        torch.testing.assert_close(r0["params"][n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name, says", [
    ("zero3_weight_norm", "sampler='weight_norm' at stage 3, where each rank holds a partition of every param"),
    ("zero2_grad_norm", "sampler='grad_norm' (use 'uniform', 'loss_feedback' or a callable)")])
def test_samplers_that_need_what_zero_partitions_are_refused(results, name, says):
    for r in results["refused"]:
        assert r[name].startswith("FusedLISA under DeepSpeed ZeRO stage") and says in r[name], r[name]


def test_ranks_that_drew_different_blocks_are_refused_on_every_rank(results):
    """A rank-dependent draw at construction: every rank raises at deepspeed.initialize (no hang)."""
    for rank, r in enumerate(results["refused"]):
        text = r["zero2_rank_dependent_draw"]
        assert text.startswith(f"FusedLISA under ZeRO: rank {rank} drew blocks [{rank}, {rank + 1}]"), text
        assert "build FusedLISA after torch.distributed is initialized" in text


def test_add_param_group_under_zero_is_refused(results):
    for r in results["zero2"]:
        assert r["add_param_group"].startswith("FusedLISA.add_param_group under DeepSpeed ZeRO 1-3"), r["add_param_group"]
        assert "param_groups=[...]" in r["add_param_group"]


def test_uniform_draw_with_a_seed_per_rank_takes_rank_0s_blocks(results):
    """FusedLISA's own uniform sampler, seed=rank on each rank, inactive_moments="device": both ranks train
    rank 0's draws (the generator is rank 0's), the run spans switches, and equals torch AdamW with that
    freezing (tolerance as above); the mid-interval resume is bitwise (next test)."""
    r0, r1 = results["zero2_uniform"]
    assert "error" not in r0, r0.get("error")
    seq = r0["seq"]
    assert len(set(seq)) > 1 and all(len(a) == 2 for a in seq), seq
    check_trained(r0, r1, 2, seq)
    for n, p in reference(seq).items():
        torch.testing.assert_close(r0["params"][n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name, stage", [("zero1_bf16", 1), ("zero2_bf16", 2), ("zero3_bf16", 3)])
def test_fused_lisa_trains_under_zero_with_deepspeed_bf16(results, name, stage):
    r0, r1 = results[name]
    check_trained(r0, r1, stage)
    for n, p in results["zero2_bf16"][0]["params"].items():
        assert torch.equal(r0["params"][n], p), n  # (stages 1, 2, 3: the same arithmetic, bitwise)
    ref = reference(r0["seq"], dtype=torch.bfloat16)
    for n, p in ref.items():
        update = (p - r0["before"][n]).abs().mean().item()
        deviation = (r0["params"][n] - p).abs().mean().item()
        assert deviation <= 0.03 * update + 2 ** -12, (n, deviation, update)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_drop", "zero2_uniform", "zero2_groups",
                                  "zero3_subgroups", "zero2_accum", "zero1_bf16", "zero2_bf16", "zero3_bf16"])
def test_mid_interval_checkpoint_resumes_bitwise_in_a_fresh_engine(results, name):
    r0, r1 = results[name]
    for r in (r0, r1):
        assert "error" not in r, r.get("error")
        assert r["resumed_step"] == Z.SAVE_AT and r["resumed_active"] == r["seq"][Z.SAVE_AT]
        assert r["resumed_seq"] == r["seq"][Z.SAVE_AT:]
        for n in r["params"]:
            assert torch.equal(r["resumed_params"][n], r["params"][n]), n


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_each_rank_holds_moments_of_its_partition_only(results, name):
    """Two fp32 moments per element of this rank's ZeRO partitions (the active set / world, with ZeRO's
    padding), plus the paged pieces of inactive blocks (host: the last interval's leaving block 1)."""
    r0, r1 = results[name]
    model = MLPStack(Z.WIDTH, Z.N_LAYERS)
    active = Z.SCHEDULE[-1]
    trained = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith("blocks.") or int(n.split(".")[1]) in active)
    for r in (r0, r1):
        assert r["memory"]["moment_bytes"] - r["memory"]["host_bytes"] == 8 * r["partition_elements"]
        assert r["partition_elements"] <= trained // 2 + 64
    block1 = sum(p.numel() for p in model.blocks[1].parameters())
    assert r0["memory"]["host_bytes"] + r1["memory"]["host_bytes"] == 8 * block1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_zero_bf16_gradient_checkpointing_trains_and_resumes(results, stage):
    """TrainingArguments(deepspeed=ZeRO-1/2/3 + bf16, gradient_checkpointing=True, reentrant) with
    optimizer_cls_and_kwargs=(FusedLISAFactory, ...) (LlamaFactory PR #3103's combination) and LISACallback
    (which logs the active layers after each step's switch): the drawn
    layers, the embedding, the final norm and the head train, the never-drawn layer 3 stays bitwise, ranks
    agree, and resume_from_checkpoint at step 3 (mid-interval) continues bitwise to step 8. (The loss is
    not checked: 8 steps on random tokens.)"""
    r0, r1 = results[f"trainer_zero{stage}"]
    for r in (r0, r1):
        assert "error" not in r, r.get("error")
        for run in ("full", "resumed"):
            assert r[run]["stage"] == stage and r[run]["global_step"] == Z.STEPS
        assert r["full"]["seq"] == [a for a in Z.LLAMA_SCHEDULE for _ in range(Z.SWITCH_EVERY)], r["full"]["seq"]
        assert r["resumed"]["seq"] == r["full"]["seq"][Z.SAVE_AT:]
        logged = r["full"]["logged_active"][:Z.STEPS]  # (per step; then the end-of-training log)
        assert logged == r["full"]["seq"][1:] + [r["full"]["active"]], r["full"]["logged_active"]
    ever = {b for a in Z.LLAMA_SCHEDULE for b in a}
    for n, p in r0["full"]["params"].items():
        assert torch.equal(p, r1["full"]["params"][n]), n
        assert torch.equal(r0["resumed"]["params"][n], p) and torch.equal(r1["resumed"]["params"][n], p), n
        layer = int(n.split(".")[2]) if n.startswith("model.layers.") else None
        moved = not torch.equal(p, r0["before"][n])
        assert moved == (layer is None or layer in ever), (n, moved)
