"""Paging tests.

Race test (torchao's CPU-offload idea): layers with almost no arithmetic and large moments, a switch
after every step, and a check against torch AdamW. On CUDA the copies run on two side streams; a missing
event wait shows up as a wrong parameter or moment. On CPU the same code path runs synchronously.
The CUDA variants are marked `gpu` so that benchmarks/gpu_check.sh reaches them in its GPU stage.

Pinned memory without a GPU: a counting fake of cudaHostRegister/Unregister is injected, so the store
takes its real mmap + MADV_DONTFORK path on CPU memory and every register has to be matched.
"""
from __future__ import annotations

import mmap

import pytest
import torch
from torch import nn

from lisa_fused import FusedLISA
from lisa_fused import paging
from lisa_fused.paging import MomentStore
from helpers import TOL, assert_close_rel, describe, freeze_like


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.01 * torch.randn(n))

    def forward(self, h):
        return h * self.weight


class ScaleStack(nn.Module):
    def __init__(self, n=(1 << 16) + 3, n_layers=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Parameter(torch.randn(n))
        self.layers = nn.ModuleList(Scale(n) for _ in range(n_layers))

    def forward(self, x):
        h = x * self.embed
        for layer in self.layers:
            h = layer(h)
        return h


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class CountingPinner:
    """Stands in for cudaHostRegister/Unregister: tracks what is registered and when."""

    def __init__(self):
        self.live: dict[int, int] = {}  # ptr -> nbytes
        self.calls: list[tuple[str, int]] = []

    def register(self, ptr, nbytes):
        assert ptr not in self.live, "registered twice"
        assert ptr % mmap.PAGESIZE == 0 and nbytes % mmap.PAGESIZE == 0, (ptr, nbytes)
        self.live[ptr] = nbytes
        self.calls.append(("register", ptr))

    def unregister(self, ptr):
        assert ptr in self.live, "unregister of a range that is not registered"
        del self.live[ptr]
        self.calls.append(("unregister", ptr))


@pytest.fixture
def pinner(monkeypatch):
    """Every MomentStore built in the test pins through a CountingPinner (on CPU too)."""
    fake = CountingPinner()
    init = MomentStore.__init__

    def patched(self, policy, device, pinner="auto", max_pinned_bytes=None):
        init(self, policy, device, pinner=fake, max_pinned_bytes=max_pinned_bytes)

    monkeypatch.setattr(MomentStore, "__init__", patched)
    return fake


RACE_CASES = [  # (device, policy, pin): on CPU also through the mmap rows a pinning store uses
    pytest.param("cpu", "host", False, id="cpu-host"),
    pytest.param("cpu", "host", True, id="cpu-host-mmap"),
    pytest.param("cpu", "device", False, id="cpu-device"),
    pytest.param("cuda", "host", False, id="cuda-host", marks=pytest.mark.gpu),
    pytest.param("cuda", "device", False, id="cuda-device", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe)
@pytest.mark.parametrize("device,policy,pin", RACE_CASES)
def test_switch_every_step_matches_adamw(request, device, policy, pin, dtype):
    device = torch.device(device)
    if pin:
        request.getfixturevalue("pinner")
    # big layers on a GPU, so a copy in flight is still in flight when a missing wait would read it
    n = (1 << 22) + 3 if device.type == "cuda" else 4099
    model = ScaleStack(n).to(device=device, dtype=dtype)
    opt = FusedLISA(model, lr=1e-2, weight_decay=0.05, n_active_layers=3, switch_every=1,
                    inactive_moments=policy, seed=2)
    # fp32 reference on the same gradients (for bf16: AdamW on fp32 copies, as the masters are)
    ref_params = [p.detach().float().clone() for p in opt._params]
    ropt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05)
    g = torch.Generator(device="cpu").manual_seed(1)
    for step in range(40):
        x = torch.randn(model.embed.shape, generator=g).to(device=device, dtype=dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        for p, r in zip(opt._params, ref_params):
            r.grad = p.grad.float().clone() if p.requires_grad else None
        opt.step()
        ropt.step()
    tol = TOL[dtype]
    for p, r in zip(opt._params, ref_params):
        assert_close_rel(p.float(), r.to(dtype).float(), tol, "param")
    sd = opt.state_dict()
    for i, e in sd["state"].items():
        st = ropt.state[ref_params[i]]
        assert_close_rel(e["exp_avg"], st["exp_avg"].cpu(), TOL[torch.float32], f"exp_avg {i}")
        assert_close_rel(e["exp_avg_sq"], st["exp_avg_sq"].cpu(), TOL[torch.float32], f"exp_avg_sq {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_store_round_trip_and_policies(device):
    device = torch.device(device)
    n, length = 3, 4097
    slots = torch.arange(n * 2 * length, dtype=torch.float32, device=device).reshape(2, n, length)

    def views(slot, ln):
        return [slots[slot, k, :ln] for k in range(n)]

    def init_fresh(slot, block, rows):  # what FusedLISA's slots do: zero moments, a master from the params
        rows[0].zero_()
        rows[1].zero_()
        rows[2].fill_(-1.0)

    for policy in ("host", "device", "drop"):
        store = MomentStore(policy, device)
        original = slots[0].clone()
        fresh = store.switch(leaving=[(5, 0)], arriving=[(7, 0)], rows_of=lambda b, s: views(s, length),
                             init_fresh=init_fresh)
        store.wait_ready()
        assert fresh == [7]
        assert torch.all(slots[0, :2] == 0) and torch.all(slots[0, 2] == -1)  # zeroed moments, master init
        fresh = store.switch(leaving=[(7, 0)], arriving=[(5, 0)], rows_of=lambda b, s: views(s, length),
                             init_fresh=init_fresh)
        store.wait_ready()
        if policy == "drop":
            assert fresh == [5] and store.nbytes() == 0
        else:
            assert fresh == [] and torch.equal(slots[0], original), policy
        if policy == "host":
            assert all(r.device.type == "cpu" for r in store.get(5))


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="Invalid inactive_moments: 'disk'"):
        MomentStore("disk", "cpu")


@pytest.mark.gpu
def test_host_store_is_pinned_and_exact_size():
    model = ScaleStack(n=(1 << 20) + 5).cuda()
    opt = FusedLISA(model, n_active_layers=2, switch_every=1, inactive_moments="host")
    for _ in range(3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
    store = opt._store
    store.synchronize()
    assert set(store._blocks) == set(range(len(model.layers)))  # all reserved at construction
    for block, h in store._blocks.items():
        length = opt._packed_state.layouts[0].blocks[block].length
        assert all(r.is_pinned() and r.numel() == length for r in h.rows), block
        assert h.nbytes < 2 * length * 4 + 2 * paging.ROW_ALIGN + mmap.PAGESIZE  # exact size, no power of 2
    assert opt.memory_stats()["pinned_bytes"] == store.pinned_bytes() > 0
    store.release()
    assert store.n_registered() == 0


def vm_flags(ptr: int) -> set[str]:
    """VmFlags of the mapping of this process that contains address `ptr` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping contains 0x{ptr:x}")


def bf16_stack(n_layers=6):
    return ScaleStack(n=1000, n_layers=n_layers).to(torch.bfloat16)


def test_host_store_is_pinned_at_construction_and_never_leaks(pinner):
    model = bf16_stack()
    opt = FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=1, inactive_moments="host", seed=0)
    store = opt._store
    n_blocks = len(model.layers)
    assert len(pinner.live) == store.n_registered() == n_blocks  # every block, before the first step
    assert opt.memory_stats()["pinned_bytes"] == sum(pinner.live.values()) == store.pinned_bytes()
    registered_at_construction = len(pinner.calls)
    before = [layer.weight.detach().clone() for layer in model.layers]
    for _ in range(6):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
    assert len(pinner.calls) == registered_at_construction, "step() pinned or unpinned memory"
    changed = [not torch.equal(b, layer.weight) for b, layer in zip(before, model.layers)]
    assert any(changed) and not all(changed), "some blocks should have trained, others not"
    sd = opt.state_dict()
    for _ in range(3):  # every load_state_dict clears the store: the reservation is reused, not re-pinned
        opt.load_state_dict(sd)
    assert len(pinner.live) == n_blocks and len(pinner.calls) == registered_at_construction
    assert opt.state_dict()["state"].keys() == sd["state"].keys()
    saved = next(b for b in range(n_blocks) if store.has(b))
    state = store.get(saved)  # uniform rows: one [n_rows, numel] view over the padded, registered rows
    assert state.shape == (3, opt._packed_state.layouts[0].blocks[saved].length) and state.dtype == torch.float32
    assert state[1, 5:9].data_ptr() == store._blocks[saved].rows[1][5:9].data_ptr()

    # a block whose layout changes gets new rows: the old range is unregistered first
    old_ptr = store._blocks[0].ptr
    store.put(0, [torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16)])
    assert old_ptr not in pinner.live and len(pinner.live) == n_blocks
    assert [r.dtype for r in store.get(0)] == [torch.float32, torch.bfloat16]  # rows of any dtype / length

    order = []
    sync = store.synchronize
    store.synchronize = lambda: (order.append("sync"), sync())
    n_calls = len(pinner.calls)
    store.release()
    assert order == ["sync"] and pinner.live == {}
    assert all(kind == "unregister" for kind, _ in pinner.calls[n_calls:])


def test_pinned_limit_is_a_clear_error_and_pins_nothing(pinner):
    store = MomentStore("host", "cpu", max_pinned_bytes=1 << 20)
    with pytest.raises(MemoryError, match=r"needs 0\.01 GiB of pinned host memory for 3 blocks.*'device' or 'drop'"):
        store.reserve({b: [(torch.float32, 1 << 20)] for b in range(3)})
    assert pinner.live == {} and store.pinned_bytes() == 0
    store.reserve({0: [(torch.float32, 1000), (torch.bfloat16, 333)]})  # fits
    assert store.n_registered() == 1
    with pytest.raises(MemoryError):  # fits alone, not with what is pinned already: the cap is on the total
        store.reserve({1: [(torch.float32, (1 << 18) - 100)]})
    assert store.n_registered() == 1


def test_no_pinning_without_a_gpu_or_for_other_policies():
    for policy in ("host", "device", "drop"):
        store = MomentStore(policy, "cpu")
        store.reserve({0: [(torch.float32, 4096)]})
        assert store.pinner is None and store.pinned_bytes() == 0
        assert store.reserved_bytes() == (4096 * 4 if policy == "host" else 0)


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(i * i)])


def test_registered_memory_is_not_inherited_by_fork_and_dataloader_workers_work(pinner):
    model = bf16_stack()
    opt = FusedLISA(model, lr=1e-2, n_active_layers=2, switch_every=1, inactive_moments="host", seed=0)
    for h in opt._store._blocks.values():
        assert "dc" in vm_flags(h.ptr), "MADV_DONTFORK missing on a registered range"  # dc: do not copy on fork
    loader = torch.utils.data.DataLoader(Squares(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    for _ in range(2):  # steps before and after the workers forked: paging keeps working in the parent
        got = torch.cat([b.flatten() for b in loader])
        assert torch.equal(got, torch.tensor([float(i * i) for i in range(8)]))
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
    sd = opt.state_dict()
    assert all(torch.isfinite(e["exp_avg"]).all() and e["exp_avg"].abs().sum() > 0 for e in sd["state"].values())


@pytest.mark.gpu
def test_tables_reach_the_gpu_without_a_host_wait():
    """A busy stream (as after wait_ready on a page-in) must not block building the kernel's tables."""
    from lisa_fused.kernels import Segments
    from lisa_fused.kernels._tables import chunk_table, segment_table

    segments = Segments([(0, 5000), (5120, 777)])
    done = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the current stream
    done.record()
    table = chunk_table(segments, 1024, torch.device("cuda"))
    hp = segment_table(torch.ones(2, 4, dtype=torch.float64), torch.device("cuda"))
    assert not done.query(), "the host waited for the stream: a table came from pageable memory"
    assert table.shape == (7, 3) and table[-1].tolist() == [1, 5120, 5897]
    assert hp.dtype == torch.float32 and hp.sum().item() == 8
