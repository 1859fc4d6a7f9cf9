"""FSDP2 through accelerate on CPU/gloo, for the examples and the tests.

accelerate 1.16 turns an FSDP plugin into DistributedType.FSDP only for GPU-like distributed types
(accelerate/state.py, AcceleratorState.__init__): under `torchrun` on CPU, `Accelerator(fsdp_plugin=...)`
and the Trainer's `fsdp=` train without sharding anything, and the Trainer without `use_cpu` raises
"Using fsdp only works in distributed training.". No launch config or environment variable changes that.
`force_fsdp2_on_cpu` sets, after the Accelerator is built, the state a GPU launch has; everything after
it is accelerate's own FSDP2 code (fsdp2_prepare_model, the optimizer's parameter switch, the FSDP2
checkpoint paths). On GPUs none of this is needed.
"""
from __future__ import annotations


def force_fsdp2_on_cpu(accelerator, plugin) -> None:
    """Make `accelerator` (built with cpu=True under torch.distributed) an FSDP2 accelerator with `plugin`."""
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError("accelerate did not take the FSDP2 state; this helper was written for accelerate 1.16")


def fsdp2_trainer_class():
    """transformers.Trainer whose accelerator gets the FSDP2 state (TrainingArguments(fsdp=..., use_cpu=True))."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CPUFSDP2Trainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            force_fsdp2_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    return CPUFSDP2Trainer
