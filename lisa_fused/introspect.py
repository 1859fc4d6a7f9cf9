"""What a FusedLISA holds and how it is set up: memory_stats(), state_formats() and repr()."""
from __future__ import annotations

from collections import Counter


def memory_stats(opt) -> dict[str, int]:
    """Bytes the optimizer holds (ints), FusedLISA.memory_stats(). Only what the optimizer adds: the
    model's params and grads are its own tensors (never packed), counted by the model, not here.

    device_bytes        packed state on the model's device: fp32 masters (bf16/fp16 params only), moments,
                        scales, compensation; plus resident block state under inactive_moments="device"
    master_bytes        fp32 masters of bf16/fp16 params (an fp32 param is its own master: 0)
    moment_bytes        exp_avg + exp_avg_sq (codes when quantized); scale_bytes: fp32 block scales
    compensation_bytes  Kahan compensation (master_weights="kahan")
    host_bytes          paged-out block state ("host"); pinned_bytes: page-locked host memory reserved
    packed_bytes / store_bytes, active_numel / slot_numel: the packed buffers and store, in bytes / elements
    small_tensor_numel  trained elements of quantized groups that keep fp32 moments (min_quantized_size),
                        small_tensor_moment_bytes their moments' bytes (8 per element, wherever they are)
    """
    packed_state = opt._live().state
    store = opt._store
    packed = packed_state.nbytes()
    stored = store.nbytes()
    on_device = store.policy == "device"
    kinds = packed_state.nbytes_by_kind()
    small = sum(p.numel() for p, f, g in zip(opt._params, packed_state_formats(opt), opt._group_of)
                if f.moments == "fp32" and g["moments"] != "fp32")
    return {
        "device_bytes": packed + (stored if on_device else 0),
        **{f"{k}_bytes": v for k, v in kinds.items()},
        "host_bytes": 0 if on_device else stored,
        "packed_bytes": packed,
        "store_bytes": stored,
        "active_numel": sum(n for _, _, n in packed_state.placements(opt._slots.slot_of)),
        "slot_numel": sum(lay.slot_len for lay in packed_state.layouts),
        "pinned_bytes": store.pinned_bytes(),  # page-locked host memory, reserved at construction
        # the small-tensor rule: params of a quantized group kept in fp32 moments (8 B/elt wherever they are)
        "small_tensor_numel": small,
        "small_tensor_moment_bytes": 8 * small,
    }


def packed_state_formats(opt):
    state = opt._packed_state
    return [state.formats[k] for k in state.part_of]


def state_formats(opt) -> dict[str, str]:
    """{parameter name: "moments/master_weights"} of every trained parameter (small-tensor rule applied)."""
    return {n: str(f) for n, f in zip(opt._names, packed_state_formats(opt))}


def describe(opt) -> str:
    g = opt.param_groups[0]
    formats = dict(Counter(str(f) for f in packed_state_formats(opt)))
    return (f"FusedLISA(backend={opt.backend!r} (asked {opt._backend_request!r}), lr={g['lr']}, "
            f"betas={g['betas']}, eps={g['eps']}, weight_decay={g['weight_decay']}, "
            f"n_active_layers={opt.n_active_layers}/{len(opt._block_params)}, "
            f"switch_every={opt.switch_every}, sampler={opt._sampler.describe()}, "
            f"inactive_moments={opt.inactive_moments!r}, moments={opt.moments!r}, "
            f"master_weights={opt.master_weights!r}, param_groups={len(opt.param_groups)}, "
            f"state_formats={formats} (params per moments/master_weights), stack={opt.model_layout.stack_path!r}, "
            f"active_layers={opt.active_layers}" + (", released" if opt._binding is None else "")
            + (f", DeepSpeed ZeRO stage {opt._zero.session.stage} client" if getattr(opt, "_zero", None) else "") + ")")
