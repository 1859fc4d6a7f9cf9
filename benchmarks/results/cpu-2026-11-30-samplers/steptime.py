"""Step time of FusedLISA (fp32, backend cpu): sampler uniform vs grad_norm; run with PYTHONPATH=<tree>."""
import sys, time, statistics, torch
import lisa_fused
from lisa_fused import FusedLISA
torch.set_num_threads(1)
class Stack(torch.nn.Module):
    def __init__(s, w=1024, n=8):
        super().__init__(); torch.manual_seed(0)
        s.inp = torch.nn.Linear(w, w); s.blocks = torch.nn.ModuleList(torch.nn.Linear(w, w) for _ in range(n)); s.out = torch.nn.Linear(w, 1)
samplers = sys.argv[1:] or ["uniform"]
for name in samplers:
    m = Stack()
    opt = FusedLISA(m, lr=1e-4, n_active_layers=2, switch_every=10**9, sampler=name, backend="cpu")
    def grads():
        for p in m.parameters():
            if p.requires_grad: p.grad = torch.ones_like(p) * 1e-3
    times = []
    for rep in range(7):
        grads(); t = time.perf_counter()
        for _ in range(20): opt.step()
        times.append((time.perf_counter() - t) / 20 * 1e3)
    print(f"{lisa_fused.__file__.split('/lisa_fused/')[0]} sampler={name}: step {statistics.median(times):.3f} ms median of 7x20 (min {min(times):.3f})", flush=True)
