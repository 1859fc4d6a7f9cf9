"""Which parameters a FusedLISA drives, and what each launch reads from them.

FusedLISA never re-points a parameter's `.data` and never hands out gradient views: parameters and
gradients keep the storage the model and autograd gave them, so every tool that saves, moves or shards a
model by storage sees a plain one. Per step, `collect()` reads the live `p` / `p.grad` of the active
params into the kernels' segment lists (kernels/contract.py: the tensors themselves; the packed state sits
at each param's offset). A param steps iff `p.grad is not None` at step(), as in torch.

What can change behind the optimizer, and where it is handled:

* a `.grad` of another dtype or device than its param: converted for the launch (a copy); of another
  shape: RuntimeError naming the param, before anything changes; non-contiguous: the kernels' slow path.
* the model moved, converted or resized (`model.to(...)`, `.half()`, `resize_token_embeddings`), or a
  param given new storage (`p.data = t`): `changed()` notices a bound param's new address (one data_ptr per
  active param per step) and rebuild.follow() handles it.
* a bf16/fp16 param written by someone else while its fp32 master lives in the packed state (weights
  loaded into the model, DeepSpeed's or DDP's broadcast of rank 0's weights into `.data`, a write while its
  block was inactive): its master must follow the new value. `dirty` params (every bound one before the
  first step, arriving blocks' at a switch, and any whose version counter or address moved) get
  `adopt_written()` after the page-in is done: each element whose param differs from its master rounded
  becomes the master. A Kahan compensation is reset for a param written through its version counter.
* another FusedLISA on the same parameters: `claim_check()` refuses while the other one lives, and takes
  the user's requires_grad flags back from one that was dropped without `release()`.

FSDP2 params are DTensors: the launch reads and writes their rank-local shards in place (`local`).
"""
from __future__ import annotations

import gc
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .packing import PackedState

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: no DTensor params to meet
    DTensor = ()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Parameter -> (weakref to the ParamBinding driving it, the requires_grad flag the user had).
_OWNERS = WeakIdKeyDictionary()
_ADOPT_CHUNK = 1 << 24  # elements per adopt pass: ~11 B of temporaries each, whatever the model


def local(t):
    """The rank-local tensor of a DTensor (an FSDP2 shard, FSDP's own storage), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def claim_check(named_params) -> None:
    """Before a new FusedLISA looks at `requires_grad`: refuse params another live FusedLISA drives, and
    give back the user's flags on params a dropped (never released) one had frozen.

    Raises RuntimeError naming the first such param and `release()`.
    """
    stale = []
    for name, p in named_params:
        entry = _OWNERS.get(p)
        if entry is None:
            continue
        if entry[0]() is not None:
            gc.collect()  # an optimizer the user dropped may only be waiting in a reference cycle
        if entry[0]() is not None:
            raise RuntimeError(
                f"parameter {name!r} is driven by another live FusedLISA (it froze the blocks it does not "
                "train and keeps their optimizer state): call release() on that optimizer first (or delete "
                "it), then build the new one")
        stale.append((p, entry[1]))
    for p, flag in stale:
        p.requires_grad_(flag)
        del _OWNERS[p]


class ParamBinding:
    """The trained params (param index i = position in names/params/shapes), the packed-state offset of
    each bound (active) one, and what a launch reads from them.

    shapes: the (rank-local) shapes the packed state was laid out for. state: packing.PackedState. The
    optimizer decides *where* (offsets); this class reads the live tensors, tracks their addresses and
    version counters, and records each param's requires_grad flag for `release()` (`user_flags`: those
    flags, when `params` replace Parameter objects FusedLISA had already frozen).
    """

    def __init__(self, names, params, shapes, state: PackedState, user_flags=None):
        self.names, self.params, self.shapes = names, params, shapes
        self.state = state
        self.offset: dict[int, int] = {}  # bound param -> offset in its partition's state buffers
        self._ptr: dict[int, int] = {}  # bound param -> data_ptr of its local tensor when last seen
        self._version: dict[int, int] = {}  # bound low-precision param -> its version counter when last seen
        self.dirty: set[int] = set()  # bound params whose master (or compensation) must re-read the param
        self._written: set[int] = set()  # of those, params written through their version counter / address
        me = weakref.ref(self)
        for k, p in enumerate(params):
            _OWNERS[p] = (me, p.requires_grad if user_flags is None else user_flags[k])

    def user_flags(self) -> list[bool]:
        """The requires_grad flag each param had before FusedLISA froze anything (what release() restores)."""
        return [_OWNERS[p][1] if p in _OWNERS else p.requires_grad for p in self.params]

    def tensor(self, i) -> torch.Tensor:
        """Param i's (local) tensor: what the launch updates or its master is read from."""
        return local(self.params[i])

    # -- binding ----------------------------------------------------------------------------------
    def bind(self, i, off) -> None:
        """Param i's state sits at `off` of its partition from now on (its master is marked to re-read the
        param before the next launch)."""
        t = self.tensor(i)
        self.offset[i] = off
        self._ptr[i] = t.data_ptr()
        if self.state.buffers_of(i).param_dtype != torch.float32:  # (fp32 params are their own masters)
            self._version[i] = t._version
            self.dirty.add(i)

    def unbind(self, i) -> None:
        """Param i leaves the packed state (its slot is about to be reused); it keeps its storage."""
        del self.offset[i]
        self._ptr.pop(i, None)
        self._version.pop(i, None)
        self.dirty.discard(i)
        self._written.discard(i)

    def write_masters(self, entries) -> None:
        """Masters (fp32 copies of bf16/fp16 params) of `entries` [(param index, offset, numel)] from the
        params' current values, on the current stream."""
        for i, off, n in entries:
            bufs = self.state.buffers_of(i)
            if bufs.master is not None:
                bufs.master[off:off + n].copy_(self.tensor(i).detach().reshape(-1))

    # -- per step ---------------------------------------------------------------------------------
    def changed(self) -> bool:
        """True if a bound param's (local) tensor has another address than when it was bound or last seen:
        the model moved, was converted or resized, or a param got new storage (rebuild.follow says which)."""
        ptr = self._ptr
        return any(self.tensor(i).data_ptr() != p for i, p in ptr.items())

    def refresh(self) -> None:
        """After rebuild.follow accepted new storage of the same device, dtype and shape: the new addresses
        are the bound ones, and each such param's master re-reads it."""
        for i in self._ptr:
            t = self.tensor(i)
            if t.data_ptr() != self._ptr[i]:
                self._ptr[i] = t.data_ptr()
                self.dirty.add(i)
                self._written.add(i)

    def collect(self, parts):
        """The launch lists of every partition, from the live params and grads, before anything changes.

        parts: per partition (Segments, param indices). Returns per partition (params, grads, lowps, enabled):
        params[s] the tensor the kernel updates (the fp32 param, the packed fp32 master of a bf16/fp16 one,
        or the bf16/fp16 param itself without a master), grads[s] its gradient (None: no grad, the segment
        is disabled), lowps the bf16/fp16 params written from their masters (None without masters). A grad
        of another dtype or device is converted (a copy); RuntimeError naming the param for a grad of
        another shape."""
        out = []
        for k, (segments, seg_params) in enumerate(parts):
            bufs = self.state.bufs[k]
            params, grads, enabled = [], [], []
            for i in seg_params:
                t = self.tensor(i)
                g = self.params[i].grad
                if g is not None:
                    g = local(g)
                    if g.shape != t.shape:
                        raise RuntimeError(
                            f"parameter {self.names[i]!r} has a .grad of shape {tuple(g.shape)}, but the parameter "
                            f"is {tuple(t.shape)}: assign a gradient of the parameter's shape")
                    if g.dtype != t.dtype or g.device != t.device:
                        g = g.to(device=t.device, dtype=t.dtype)
                params.append(t)
                grads.append(g)
                enabled.append(g is not None)
            if bufs.master is not None:
                key = ("masters", id(bufs.master))
                if key not in segments.cache:
                    segments.cache[key] = [bufs.master[off:off + n] for off, n in segments.bounds]
                out.append((segments.cache[key], grads, params, enabled))
            else:
                out.append((params, grads, None, enabled))
        return out

    def mark_written(self) -> None:
        """Bound low-precision params written since they were last seen (their version counter or address
        moved): dirty, so their masters re-read them (and a Kahan compensation restarts)."""
        for i, v in self._version.items():
            t = self.tensor(i)
            if t._version != v or t.data_ptr() != self._ptr[i]:
                self.dirty.add(i)
                self._written.add(i)

    @torch.no_grad()
    def adopt_written(self) -> None:
        """Masters of dirty params re-read them (on the current stream: call it after the page-in is
        waited for): every element whose param differs from its master rounded to the param's dtype
        becomes the param's value. A param written through its version counter also restarts its Kahan
        compensation. Params of fp32 models are their own masters: nothing to do."""
        for i in sorted(self.dirty):
            bufs, off = self.state.buffers_of(i), self.offset.get(i)
            if off is None or bufs.param_dtype == torch.float32:
                continue
            t = self.tensor(i).detach().reshape(-1)
            if bufs.master is not None:
                for start in range(0, t.numel(), _ADOPT_CHUNK):
                    lp = t[start:start + _ADOPT_CHUNK]
                    m = bufs.master[off + start:off + start + lp.numel()]
                    m.copy_(torch.where(lp != m.to(lp.dtype), lp.float(), m))
            elif bufs.compensation is not None and i in self._written:
                bufs.compensation[off:off + t.numel()].zero_()
        self.dirty.clear()
        self._written.clear()

    def seen(self) -> None:
        """After the launch: the current version counters and addresses are the bound ones."""
        for i in self._version:
            t = self.tensor(i)
            self._version[i] = t._version
            self._ptr[i] = t.data_ptr()

    # -- checks -----------------------------------------------------------------------------------
    def replaced(self, model, indices) -> dict[int, torch.nn.Parameter]:
        """{i: the model's Parameter now under param i's name} for params of `indices` that the model
        replaced by another Parameter object (resize_token_embeddings' new untied head, a swapped module).
        RuntimeError naming the param when its name no longer leads to a parameter of the model."""
        out = {}
        for i in indices:
            try:
                q = model.get_parameter(self.names[i])
            except AttributeError:
                raise RuntimeError(
                    f"FusedLISA: parameter {self.names[i]!r} is no longer in the model (a module was removed or "
                    "renamed): take state_dict(), release(), and build a new FusedLISA on the model as it is now")
            if q is not self.params[i]:
                out[i] = q
        return out

    def mismatch(self, device, dtype) -> tuple[str, str] | None:
        """(name, what) of the first trained param whose tensor is not `dtype` on `device` with its bound
        shape, else None."""
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            t = local(p)
            if t.device != device or t.dtype != dtype:
                return name, f"{t.dtype} on {t.device}"
            if tuple(t.shape) != tuple(self.shapes[i]):
                return name, f"of shape {tuple(t.shape)} (was {tuple(self.shapes[i])})"
        return None

    # -- hand the model back ----------------------------------------------------------------------
    def release(self) -> None:
        """The user's requires_grad flag back on every param, and no owner. (Params and grads were never
        touched: nothing else to give back.)"""
        for p in self.params:
            entry = _OWNERS.get(p)
            if entry is not None and entry[0]() is self:
                p.requires_grad_(entry[1])
                del _OWNERS[p]
        self.offset.clear()
        self._ptr.clear()
        self._version.clear()
        self.dirty.clear()
