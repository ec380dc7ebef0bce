"""Time one routed-expert call through cpu_kernels.CPUExperts.forward (64 K2.6-shape experts, 2 threads):
T = 1 (decode, ms) and T = 64 / 512 (prefill, GFLOP/s), best of a few calls. It runs unchanged in trees
before and after the layout change (it loads experts through set_expert or the older load_expert), so the
two can be timed back to back on one machine:

    (cd TREE_A && python tools/bench_expert_call.py); (cd TREE_B && python tools/bench_expert_call.py)
"""
import sys, time, numpy as np, torch
sys.path.insert(0, ".")
from cpu_kernels import CPUExperts
D, I, E, K = 7168, 2048, 64, 8
ex = CPUExperts(E, D, I, num_threads=2)
rng = np.random.default_rng(0)
def words(n, k): return torch.from_numpy(rng.integers(-2**31, 2**31, (n, k // 8), dtype=np.int64).astype(np.int32))
for e in range(E):
    parts = []
    for n, k in ((I, D), (I, D), (D, I)):
        s = torch.full((n, k // 32), 0.01, dtype=torch.bfloat16)
        if hasattr(ex, "set_expert"):
            u = rng.integers(0, 16, (n, k), dtype=np.uint8); parts += [u, s]
        else:
            parts += [words(n, k), s]
    (ex.set_expert if hasattr(ex, "set_expert") else ex.load_expert)(e, *parts)
res = {}
for T in (1, 64, 512):
    x = torch.randn(T, D)
    ids = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]))
    w = torch.full((T, K), 1.0 / K)
    ex.forward(x, ids, w)
    best = 1e9
    for _ in range(3 if T > 1 else 20):
        t0 = time.perf_counter(); ex.forward(x, ids, w); best = min(best, time.perf_counter() - t0)
    res[T] = best
print({T: (f"{6*D*I*T*K/t/1e9:.0f} GFLOP/s" if T > 1 else f"{t*1e3:.2f} ms") for T, t in res.items()})
