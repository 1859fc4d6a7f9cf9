"""FusedLISA inside the Hugging Face Trainer (CPU, tiny Llama from a config, in-memory data):
LR scheduler, gradient accumulation, clipping, model.zero_grad(), logging, checkpoints and resume."""
from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch

from lisa_fused import FusedLISA
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lisa_fused.hf import LISACallback, unwrap_optimizer  # noqa: E402

VOCAB, SEQ = 97, 12
N_LAYERS, N_ACTIVE, K = 4, 2, 2
LR, EPS, WD = 1e-2, 1e-3, 0.05  # eps ~ |grad|: Adam's update then depends on the clipping factor


def dataset(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x.clone()} for x in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def expected_draws(seed, n_draws):
    """The active sets a uniform FusedLISA draws, re-derived from its documented rule (randperm of the
    blocks with a generator seeded with `seed`, first n_active, sorted)."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(sorted(torch.randperm(N_LAYERS, generator=g)[:N_ACTIVE].tolist())) for _ in range(n_draws)]


class RecordingTrainer(Trainer):
    """Records every micro-batch the Trainer feeds the model, with the token count it normalises by."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.micro_batches.append((inputs["input_ids"].clone(), num_items_in_batch,
                                   self.current_gradient_accumulation_steps))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class StepRecorder(TrainerCallback):
    """Per optimizer step, just before it: lr, active layers, and whether every trained param has a grad of
    its own (autograd's tensor, not the optimizer's state, no two sharing storage)."""

    def __init__(self):
        self.lrs, self.active, self.own_grads, self.snapshots = [], [], [], {}
        self.snapshot_at = set()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
        opt = unwrap_optimizer(optimizer)
        self.lrs.append(opt.param_groups[0]["lr"])
        self.active.append(opt.active_layers)
        state = {t.untyped_storage().data_ptr() for b in opt._packed_state.bufs for t in (b.exp_avg, b.exp_avg_sq)}
        ptrs = [p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad and p.grad is not None]
        n_trained = sum(p.requires_grad for p in model.parameters())
        self.own_grads.append(len(ptrs) == n_trained and len(set(ptrs)) == len(ptrs) and not set(ptrs) & state)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.snapshot_at:
            self.snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def training_args(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=6, learning_rate=LR, lr_scheduler_type="linear",
                warmup_steps=2, max_grad_norm=0.05, logging_steps=100, save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def make_opt(model, seed=3, backend="torch"):
    """backend="torch" (the reference kernel) makes the comparison with torch's AdamW exact."""
    return FusedLISA(model, lr=LR, eps=EPS, weight_decay=WD, n_active_layers=N_ACTIVE, switch_every=K,
                     seed=seed, backend=backend)


def reference_run(model0, micro_batches, lrs, active, ga, max_norm, clip=True):
    """torch AdamW over all params, blocks frozen as recorded, same micro-batches, clipping and lrs."""
    ref = copy.deepcopy(model0)
    ropt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    stack = ref.model.layers
    norms = []
    for t, (lr, act) in enumerate(zip(lrs, active)):
        for b, blk in enumerate(stack):
            blk.requires_grad_(b in act)
        for x, n_items, cur_ga in micro_batches[t * ga:(t + 1) * ga]:
            loss = ref(input_ids=x, labels=x, num_items_in_batch=n_items).loss
            (loss if n_items is not None else loss / cur_ga).backward()
        params = [p for p in ref.parameters() if p.grad is not None]
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm if clip else math.inf).item())
        for g in ropt.param_groups:
            g["lr"] = lr
        ropt.step()
        ropt.zero_grad()
    return ref, norms


def max_rel_diff(model, ref):
    rp = dict(ref.named_parameters())
    return max(((p.detach() - rp[n].detach()).abs().max() / rp[n].detach().abs().max().clamp_min(1e-12)).item()
               for n, p in model.named_parameters())


@pytest.mark.parametrize("with_callback", [True, False], ids=["LISACallback", "no-callback"])
def test_trainer_drives_fused_lisa_like_a_manual_loop(tmp_path, caplog, with_callback):
    """LR schedule, gradient accumulation (K counts optimizer steps), clipping of the packed grads and the
    Trainer's model.zero_grad(): the Trainer's run equals a manual AdamW loop with the same schedule."""
    model = tiny_llama(N_LAYERS, seed=0)
    model0 = copy.deepcopy(model)
    opt = make_opt(model)
    rec = StepRecorder()
    callbacks = [rec] + ([LISACallback()] if with_callback else [])
    args = training_args(tmp_path)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None),
                               callbacks=callbacks)
    trainer.micro_batches = []
    with caplog.at_level(logging.INFO, logger="lisa_fused"):
        trainer.train()
    steps, ga = args.max_steps, args.gradient_accumulation_steps

    # The Trainer's scheduler (linear, 2 warmup steps) drives FusedLISA's lr.
    expected_lr = [LR * (t / 2 if t < 2 else max(0.0, (steps - t) / (steps - 2))) for t in range(steps)]
    assert rec.lrs == pytest.approx(expected_lr, rel=1e-12, abs=0)
    # K counts optimizer steps (2 micro-batches each): a new draw after every K optimizer steps.
    assert len(trainer.micro_batches) == steps * ga
    draws = expected_draws(3, steps // K + 1)
    assert rec.active == [draws[t // K] for t in range(steps)]
    assert opt.active_layers == draws[steps // K]
    # The logging module reports each switch (after optimizer steps K, 2K, ...).
    switches = [r.getMessage() for r in caplog.records if r.name == "lisa_fused" and "active layers" in r.getMessage()]
    assert switches == [f"FusedLISA step {s}: active layers {draws[s // K]}" for s in range(K, steps + 1, K)]
    # Backward wrote into the packed buffer even after the Trainer's model.zero_grad() (set_to_none): the
    # grad views are re-pointed just before autograd accumulates, callback or not.
    assert rec.own_grads == [True] * steps

    ref, ref_norms = reference_run(model0, trainer.micro_batches, rec.lrs, rec.active, ga, args.max_grad_norm)
    logged_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert all(n > 2 * args.max_grad_norm for n in ref_norms), "clipping must bite for this test to mean anything"
    assert max_rel_diff(model, ref) == 0.0  # bitwise: same batches, same normalisation, same kernel math

    if not with_callback:
        # Sensitivity: without clipping the reference lands elsewhere, so the match above checks clipping.
        unclipped, _ = reference_run(model0, trainer.micro_batches, rec.lrs, rec.active, ga,
                                     args.max_grad_norm, clip=False)
        assert max_rel_diff(model, unclipped) > 1e-3

    else:  # logging_steps=100, so every log below is one the callback asked for at a switch
        logged = [(e["step"], tuple(e["lisa_active_layers"])) for e in trainer.state.log_history if "loss" in e]
        assert logged == [(s, draws[s // K]) for s in range(K, steps + 1, K)]
        assert len(logged_norms) == len(logged)
        for (s, _), n in zip(logged, logged_norms):
            assert n == pytest.approx(ref_norms[s - 1], rel=1e-5)


def test_trainer_resume_mid_interval_is_bitwise(tmp_path):
    """Checkpoint at step 3 (inside an interval of K=2), resume in a fresh Trainer with a fresh model and
    optimizer (other init, other seed): same active layers, bitwise the same final params."""
    data = dataset()
    base = dict(gradient_accumulation_steps=1, max_steps=6, save_strategy="steps", save_steps=3)

    model = tiny_llama(N_LAYERS, seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_opt(model, backend="auto")  # the default kernel: resume must be exact on any backend
    rec = StepRecorder()
    rec.snapshot_at = {3}
    Trainer(model=model, args=training_args(tmp_path / "a", **base), train_dataset=data, optimizers=(opt, None),
            callbacks=[rec, LISACallback()]).train()
    final_a = {n: p.detach().clone() for n, p in model.named_parameters()}
    from helpers import assert_trained_changed_frozen_kept
    assert_trained_changed_frozen_kept(model, init, set().union(*rec.active))  # the run trained
    ckpt = tmp_path / "a" / "checkpoint-3"

    # The saved weights are the params at step 3, though every packed param shares one storage.
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved.keys() == rec.snapshots[3].keys()
    for n, p in rec.snapshots[3].items():
        assert torch.equal(saved[n], p), n
    # The optimizer file loads under weights_only=True (what the Trainer uses), sampler state included.
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert osd["lisa"]["global_step"] == 3 and osd["lisa"]["generator"].dtype == torch.uint8
    assert tuple(osd["lisa"]["active_layers"]) == rec.active[3]  # the set that trains step 4

    model_b = tiny_llama(N_LAYERS, seed=7)
    opt_b = make_opt(model_b, seed=11, backend="auto")
    rec_b = StepRecorder()
    Trainer(model=model_b, args=training_args(tmp_path / "b", **base), train_dataset=data,
            optimizers=(opt_b, None), callbacks=[rec_b, LISACallback()]).train(resume_from_checkpoint=str(ckpt))
    assert rec_b.active == rec.active[3:]
    assert opt_b.active_layers == opt.active_layers
    for n, p in model_b.named_parameters():
        assert torch.equal(p.detach(), final_a[n]), n
    assert os.path.isdir(tmp_path / "b" / "checkpoint-6")


@pytest.mark.gpu
def test_state_dict_moved_to_the_device_by_accelerate_loads():
    """When the Trainer prepares the optimizer, accelerate's AcceleratedOptimizer moves every tensor of its
    state_dict to the device and loads it back: the sampler state (a ByteTensor) must go back to the CPU."""
    from accelerate.optimizer import move_to_device

    model = tiny_llama(N_LAYERS).cuda()
    opt = make_opt(model, backend="auto")
    x = dataset(1)[0]["input_ids"][None].cuda()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(move_to_device(sd, torch.device("cuda")))
    assert torch.equal(opt._generator.get_state(), sd["lisa"]["generator"])
    assert opt.active_layers == tuple(sd["lisa"]["active_layers"])


def test_accelerate_prepare_then_train_like_adamw():
    """accelerate's prepare() places the model (and round-trips the optimizer's state_dict) after FusedLISA
    exists; the wrapped optimizer then trains exactly like torch's AdamW with the same active sets."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    from helpers import assert_trained_changed_frozen_kept, freeze_like, params_of, stack_of

    model = tiny_llama(N_LAYERS, seed=0)
    ref = copy.deepcopy(model)
    opt = make_opt(model)
    ropt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    acc = accelerate.Accelerator(cpu=True)
    try:
        pmodel, popt = acc.prepare(model, opt)
        assert unwrap_optimizer(popt) is opt
        init, ever = params_of(model), set()
        for t, ex in enumerate(dataset(6)):
            ever.update(opt.active_layers)
            freeze_like(stack_of(ref), opt.active_layers)
            x = ex["input_ids"][None]
            acc.backward(pmodel(input_ids=x, labels=x).loss)
            popt.step()
            popt.zero_grad()
            ref(input_ids=x, labels=x).loss.backward()
            ropt.step()
            ropt.zero_grad()
        assert len(ever) > N_ACTIVE, "the run must span a switch"
        assert_trained_changed_frozen_kept(model, init, ever)
        rp = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), rp[n].detach()), n
    finally:
        AcceleratorState._reset_state(True)
