"""Fine-tune a tiny Llama with FusedLISA under the Hugging Face Trainer: offline, on the CPU, in seconds.

    python examples/train_trainer.py                       # 4 blocks, 1 trained at a time, switch every 10 steps
    python examples/train_trainer.py --grad-accum 2        # K counts optimizer steps, not micro-batches
    python examples/train_trainer.py --save-steps 15 --output-dir out              # checkpoints in out/
    python examples/train_trainer.py --output-dir out --resume out/checkpoint-15   # or --resume latest
    torchrun --nproc_per_node=2 examples/train_trainer.py  # DDP (gloo on CPU): LISACallback makes it work

The Trainer builds the LR scheduler over FusedLISA's param_groups; LISACallback puts the active layers in
the Trainer's logs and lets DDP register every block (see docs/integration.md). The model is built from a
config (no download); the data is the Zen of Python (the standard library's `this` module), byte by byte.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import logging
import tempfile

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lisa_fused import FusedLISA
from lisa_fused.hf import LISACallback

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def text_windows(seq_len: int, seed: int) -> list[dict]:
    """Byte windows of the Zen of Python at random offsets, as a list of Trainer examples."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the poem
        import this
    data = torch.tensor(list(codecs.decode(this.s, "rot13").encode()) * 4)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (len(data) // seq_len,), generator=g)
    return [{"input_ids": data[s:s + seq_len], "labels": data[s:s + seq_len]} for s in starts.tolist()]


def tiny_llama(layers: int, hidden: int, seq_len: int, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len, use_cache=False)
    return LlamaForCausalLM(cfg).to(dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="transformer blocks in the model")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n-active", type=int, default=1, help="blocks trained at a time (LISA's gamma)")
    p.add_argument("--switch-every", type=int, default=10, help="optimizer steps between draws (LISA's K)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints (needs --output-dir)")
    p.add_argument("--resume", default=None,
                   help="checkpoint directory to resume from, or 'latest' (the last one in --output-dir)")
    p.add_argument("--output-dir", default=None, help="kept; default: a temporary directory, deleted at exit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.save_steps or args.resume == "latest") and not args.output_dir:
        p.error("--save-steps and --resume latest need --output-dir: without it the run writes into a "
                "temporary directory that is deleted at exit, so there would be nothing to resume from")
    return args


class ActiveSets(TrainerCallback):
    """Records FusedLISA's active blocks before every optimizer step (which blocks a run trained)."""

    def __init__(self, opt):
        self.opt, self.seen = opt, set()

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.update(self.opt.active_layers)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("lisa_fused").setLevel(logging.INFO)  # one line per switch
    with tempfile.TemporaryDirectory() as tmp:
        # TrainingArguments first: under torchrun it starts the process group, so that FusedLISA can
        # agree on the sampler state with rank 0 when it is built.
        targs = TrainingArguments(
            output_dir=args.output_dir or tmp, use_cpu=not torch.cuda.is_available(), report_to=[],
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps, learning_rate=args.lr, weight_decay=0.01,  # FusedLISA's lr and weight decay
            lr_scheduler_type="cosine", warmup_steps=args.steps // 10,
            max_grad_norm=1.0, logging_steps=args.logging_steps, seed=args.seed, disable_tqdm=True,
            save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
            ddp_find_unused_parameters=True,  # inactive blocks get no gradient
        )
        model = tiny_llama(args.layers, args.hidden, args.seq, DTYPES[args.dtype], args.seed)
        opt = FusedLISA(model, n_active_layers=args.n_active, switch_every=args.switch_every, seed=args.seed)
        active = ActiveSets(opt)
        trainer = Trainer(model=model, args=targs, train_dataset=text_windows(args.seq, args.seed),
                          optimizers=(opt, None),  # None: the Trainer makes the scheduler over opt
                          callbacks=[LISACallback(), active])  # in the constructor (it acts at the end of __init__)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        resume = True if args.resume == "latest" else args.resume
        result = trainer.train(resume_from_checkpoint=resume)
        # (after a resume, `before` is the fresh init, not the checkpoint: every trained param differs)
        changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    if targs.process_index == 0:
        for e in logs:
            print(f"step {e['step']:4d}  loss {e['loss']:.3f}  lr {e['learning_rate']:.2e}  "
                  f"training blocks {tuple(e['lisa_active_layers'])} next")
        print(f"train loss {result.training_loss:.3f}; {opt!r}")
        print(f"{sum(changed.values())} of {len(changed)} params changed; blocks trained: {sorted(active.seen)}")
    return {"log_history": trainer.state.log_history, "active_layers": opt.active_layers, "changed": changed,
            "ever_active": active.seen, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


if __name__ == "__main__":
    main()
