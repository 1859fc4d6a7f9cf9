"""TrainingArguments' AdamW hyperparameters reach FusedLISA under the Hugging Face Trainer (issue 30, item 7):
learning_rate, weight_decay, adam_beta1/2, adam_epsilon train unless FusedLISA was given its own, and then
one log line says which values train and why; on the factory path (optimizer_cls_and_kwargs) and with
optimizers=(opt, None) / (opt, scheduler). Every run is checked against torch AdamW with the values that
should train (bitwise, backend="torch"), and against the values that should not (the run differs)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from helpers import assert_trained_changed_frozen_kept, params_of, tiny_llama
from lisa_fused import FusedLISA

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lisa_fused.hf import FusedLISAFactory, LISACallback, unwrap_optimizer  # noqa: E402

VOCAB, SEQ, N_LAYERS, STEPS = 97, 12, 4, 6
ARGS = dict(learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)
FROM_ARGS = dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
TORCH_DEFAULTS = dict(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)  # FusedLISA's = torch AdamW's
LISA = dict(n_active_layers=2, switch_every=2, seed=3, backend="torch")  # "torch": bitwise torch AdamW


def dataset(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x.clone()} for x in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def training_args(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=STEPS,
                lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.0, logging_steps=100, save_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=0, **ARGS)
    base.update(kw)
    return TrainingArguments(**base)


class RecordingTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.micro_batches.append((inputs["input_ids"].clone(), num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class Recorder(TrainerCallback):
    """Per optimizer step, just before it: every group's lr and the active blocks."""

    def __init__(self):
        self.lrs, self.active, self.opt = [], [], None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.opt = unwrap_optimizer(optimizer)
        self.lrs.append([g["lr"] for g in self.opt.param_groups])
        self.active.append(self.opt.active_layers)


def train(tmp_path, model, callback=True, **trainer_kw):
    rec = Recorder()
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(),
                               callbacks=[rec] + ([LISACallback()] if callback else []), **trainer_kw)
    trainer.micro_batches = []
    return trainer, rec


def run(trainer, caplog):
    with caplog.at_level(logging.INFO, logger="lisa_fused"):
        trainer.train()
    said = [r for r in caplog.records if r.name == "lisa_fused" and "under the Trainer" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]  # said once, callback or not
    return said[0]


def reference(model0, model, opt, trainer, rec, groups):
    """torch AdamW from model0 over the same param groups (by name) with `groups[k]` (lr: the peak, scaled as
    the recorded schedule scaled the run's), blocks frozen as recorded, the same micro-batches."""
    ref = copy.deepcopy(model0)
    names = {id(p): n for n, p in model.named_parameters()}
    rp = dict(ref.named_parameters())
    ropt = torch.optim.AdamW([dict(hp, params=[rp[names[id(p)]] for p in g["params"]])
                              for g, hp in zip(opt.param_groups, groups)])
    stack = ref.model.layers
    for t, act in enumerate(rec.active):
        for b, blk in enumerate(stack):
            blk.requires_grad_(b in act)
        x, n_items = trainer.micro_batches[t]
        ref(input_ids=x, labels=x, num_items_in_batch=n_items).loss.backward()
        for g, hp in zip(ropt.param_groups, groups):
            g["lr"] = hp["lr"] * schedule(t)
        ropt.step()
        ropt.zero_grad()
    return ref


def schedule(t):
    """TrainingArguments(lr_scheduler_type="linear", warmup_steps=1, max_steps=STEPS) at optimizer step t."""
    return t / 1 if t < 1 else (STEPS - t) / (STEPS - 1)


def check_trained(model0, model, opt, trainer, rec, groups, wrong):
    """The run is torch AdamW's with `groups` (bitwise), not with `wrong`; it trained the blocks it drew."""
    assert [len(lrs) for lrs in rec.lrs] == [len(groups)] * STEPS
    for t, lrs in enumerate(rec.lrs):  # the Trainer's schedule ran from these peaks
        assert lrs == pytest.approx([hp["lr"] * schedule(t) for hp in groups], rel=1e-12, abs=0)
    ref = reference(model0, model, opt, trainer, rec, groups)
    rp = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), rp[n].detach()), n
    assert_trained_changed_frozen_kept(model, params_of(model0), set().union(*rec.active))
    other = reference(model0, model, opt, trainer, rec, wrong)
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(model.parameters(), other.parameters()))


def values_of(group):
    return {k: group[k] for k in ("lr", "weight_decay", "betas", "eps")}


@pytest.mark.parametrize("callback", [True, False], ids=["LISACallback", "no-callback"])
def test_the_factory_takes_every_training_argument_it_is_not_given(tmp_path, caplog, callback):
    """The issue's case: optimizer_cls_and_kwargs=(FusedLISAFactory, {n_active_layers...}) with
    TrainingArguments(learning_rate=3e-3, weight_decay=0.1, ...): those train (before: lr 1e-5, wd 0.0)."""
    model = tiny_llama(N_LAYERS, seed=0)
    model0 = copy.deepcopy(model)
    trainer, rec = train(tmp_path, model, callback, optimizer_cls_and_kwargs=(FusedLISAFactory, LISA))
    said = run(trainer, caplog)
    opt = rec.opt
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["initial_lr"] == ARGS["learning_rate"]
    assert {k: v for k, v in values_of(opt.param_groups[0]).items() if k != "lr"} == \
        {k: v for k, v in FROM_ARGS.items() if k != "lr"}
    assert said.levelno == logging.INFO
    assert said.getMessage() == ("FusedLISA under the Trainer trains TrainingArguments' lr=0.003, betas=(0.8, 0.99), "
                                 "eps=1e-06, weight_decay=0.1 in every param group")
    check_trained(model0, model, opt, trainer, rec, [FROM_ARGS], wrong=[TORCH_DEFAULTS])


def test_the_factorys_own_values_train_and_are_said_once(tmp_path, caplog):
    """kwargs lr and eps, and a group with its own weight_decay (norms without decay, as the Trainer's own
    AdamW does), train as given; betas and the other group's weight_decay come from TrainingArguments. One
    WARNING names each value that differs from TrainingArguments and why (LISACallback does not repeat it)."""
    model = tiny_llama(N_LAYERS, seed=0)
    model0 = copy.deepcopy(model)
    kwargs = dict(LISA, lr=1e-2, eps=1e-3, param_groups=[{"params": ["*norm*"], "weight_decay": 0.0}])
    trainer, rec = train(tmp_path, model, optimizer_cls_and_kwargs=(FusedLISAFactory, kwargs))
    said = run(trainer, caplog)
    own = dict(FROM_ARGS, lr=1e-2, eps=1e-3)
    assert said.levelno == logging.WARNING
    assert said.getMessage() == (
        "FusedLISA under the Trainer: lr=0.01 trains in opt.param_groups[0, 1] (given in optimizer_cls_and_kwargs), "
        "not TrainingArguments.learning_rate=0.003; eps=0.001 trains in opt.param_groups[0, 1] (given in "
        "optimizer_cls_and_kwargs), not TrainingArguments.adam_epsilon=1e-06; weight_decay=0.0 trains in "
        "opt.param_groups[1] (the group's own value (param_groups=, add_param_group, an edit or load_state_dict)), "
        "not TrainingArguments.weight_decay=0.1; from TrainingArguments: betas=(0.8, 0.99)")
    check_trained(model0, model, rec.opt, trainer, rec, [own, dict(own, weight_decay=0.0)],
                  wrong=[FROM_ARGS, dict(FROM_ARGS, weight_decay=0.0)])


def test_a_fused_lisa_in_optimizers_takes_the_training_arguments_it_was_not_given(tmp_path, caplog):
    """optimizers=(FusedLISA(model, eps=...), None) with LISACallback: lr, betas and weight_decay are
    TrainingArguments' (the Trainer's scheduler is built over that lr), eps the one given, said once."""
    model = tiny_llama(N_LAYERS, seed=0)
    model0 = copy.deepcopy(model)
    opt = FusedLISA(model, eps=1e-3, **LISA)
    trainer, rec = train(tmp_path, model, optimizers=(opt, None))
    assert values_of(opt.param_groups[0]) == dict(FROM_ARGS, eps=1e-3)  # at the end of Trainer.__init__
    assert opt.defaults["lr"] == ARGS["learning_rate"]
    said = run(trainer, caplog)
    assert said.levelno == logging.WARNING
    assert said.getMessage() == (
        "FusedLISA under the Trainer: eps=0.001 trains in opt.param_groups[0] (given to FusedLISA(...)), not "
        "TrainingArguments.adam_epsilon=1e-06; from TrainingArguments: lr=0.003, betas=(0.8, 0.99), weight_decay=0.1")
    check_trained(model0, model, opt, trainer, rec, [dict(FROM_ARGS, eps=1e-3)], wrong=[dict(TORCH_DEFAULTS, eps=1e-3)])


@pytest.mark.parametrize("how", ["optimizers=(opt, scheduler)", "add_callback"])
def test_an_lr_a_scheduler_was_built_over_is_kept_and_said(tmp_path, caplog, how):
    """optimizers=(opt, scheduler): the scheduler scales the lr it found (FusedLISA's default), so that lr
    trains and the WARNING says why; weight_decay, betas and eps still come from TrainingArguments. The
    same when LISACallback comes by add_callback (after Trainer.__init__: the Trainer's scheduler is built
    over FusedLISA's lr by the time the callback first sees the optimizer, at train begin)."""
    model = tiny_llama(N_LAYERS, seed=0)
    model0 = copy.deepcopy(model)
    opt = FusedLISA(model, **LISA)
    if how == "add_callback":
        trainer, rec = train(tmp_path, model, callback=False, optimizers=(opt, None))
        trainer.add_callback(LISACallback())
        why = ("the Trainer built its LR scheduler over it before LISACallback saw the optimizer (pass the callback "
               "in Trainer(callbacks=[...]), not add_callback)")
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        trainer, rec = train(tmp_path, model, optimizers=(opt, sched))
        why = "the LambdaLR passed in Trainer(optimizers=(opt, lr_scheduler)) was built over it"
    said = run(trainer, caplog)
    assert said.levelno == logging.WARNING
    assert said.getMessage() == (
        f"FusedLISA under the Trainer: lr=0.001 trains in opt.param_groups[0] (FusedLISA's default, kept: {why}; "
        "pass lr= to FusedLISA), not TrainingArguments.learning_rate=0.003; from TrainingArguments: "
        "betas=(0.8, 0.99), eps=1e-06, weight_decay=0.1")
    kept = dict(FROM_ARGS, lr=TORCH_DEFAULTS["lr"])
    check_trained(model0, model, opt, trainer, rec, [kept], wrong=[FROM_ARGS])


@pytest.mark.parametrize("path", ["factory", "optimizers"])
@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", -1e-3, r"TrainingArguments.learning_rate \(set it, or give FusedLISA its own lr=\): Invalid "
                             r"learning rate: -0.001 \(a float\)"),
    ("adam_beta2", 1.0, r"TrainingArguments.\(adam_beta1, adam_beta2\) \(set it, or give FusedLISA its own "
                        r"betas=\): Invalid beta parameter at index 1: 1.0"),
])
def test_a_training_argument_fused_lisa_refuses_names_the_field_and_changes_nothing(tmp_path, path, field, value,
                                                                                   match):
    model = tiny_llama(N_LAYERS, seed=0)
    args = training_args(tmp_path, **{field: value})
    if path == "factory":
        trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                          optimizer_cls_and_kwargs=(FusedLISAFactory, LISA), callbacks=[LISACallback()])
        with pytest.raises(ValueError, match=match):
            trainer.train()
        FusedLISA(model, **LISA).release()  # no FusedLISA was left driving the model
        return
    opt = FusedLISA(model, **LISA)
    before = [dict(values_of(g)) for g in opt.param_groups], dict(opt.defaults)
    with pytest.raises(ValueError, match=match):
        Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None), callbacks=[LISACallback()])
    assert ([values_of(g) for g in opt.param_groups], opt.defaults) == before


def test_the_signature_defaults_are_plain_values_and_given_keys_are_recorded(tmp_path):
    """FusedLISA's signature defaults tell it which AdamW keys were left (what TrainingArguments may set); in
    param_groups and state_dict they are plain Python floats (torch.load(weights_only=True) reads them)."""
    from helpers import MLPStack

    opt = FusedLISA(MLPStack(), n_active_layers=2, backend="torch")
    assert opt._hparams_given == frozenset()
    g = opt.param_groups[0]
    assert (type(g["lr"]), type(g["betas"]), type(g["eps"]), type(g["weight_decay"])) == (float, tuple, float, float)
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert torch.load(tmp_path / "opt.pt", weights_only=True)["param_groups"][0]["lr"] == 1e-3
    opt.release()
    opt = FusedLISA(MLPStack(), lr=1e-3, betas=(0.9, 0.999), n_active_layers=2)  # the default values, given
    assert opt._hparams_given == {"lr", "betas"}
    opt.release()
