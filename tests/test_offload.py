"""The expert hand-off (hybrid/experts/offload.py): CPU experts and accelerator work really overlap (the
worker path), the stats show it, and a CPU-only run computes the experts inside submit."""
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from hybrid.experts.offload import ExpertOffload, OverlapStats


class SlowExperts:
    """A backend whose routed experts take 0.2 s (sleeping releases the GIL, as Numba's kernels do)."""

    def forward(self, x, ids, w):
        time.sleep(0.2)
        return x * 2


def test_submit_returns_at_once_and_work_overlaps():
    stats = OverlapStats()
    stats.enabled = True
    sched = ExpertOffload(SlowExperts(), 3, torch.device("cpu"), ThreadPoolExecutor(1), stats)
    sched.inline = False                              # the worker path, as with an accelerator
    x = torch.ones(4, 8)
    t0 = time.perf_counter()
    sched.submit(x, torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2))
    assert time.perf_counter() - t0 < 0.1, "submit must not wait for the experts"
    time.sleep(0.2)                                   # the "shared expert" on the accelerator side
    y = sched.wait()
    total = time.perf_counter() - t0
    assert torch.equal(y, x * 2)
    assert total < 0.35, f"0.2 s of CPU work beside 0.2 s of accelerator work took {total:.2f} s"
    s = stats.summary()
    layer = s["layers"][3]
    assert layer["calls"] == 1 and 0.19 < layer["cpu_s"] < 0.3 and 0.19 < layer["accel_s"] < 0.3
    assert layer["wait_s"] < 0.1 and s["overlap_ratio"] < 1.3


def test_model_records_overlap_per_moe_layer(tiny_dir):
    from hybrid import LLM
    llm = LLM(tiny_dir, expert_backend="torch", progress=False)
    stats = llm.model.overlap_stats
    stats.enabled = True
    llm.score(list(range(20)))
    moe_layers = [i for i in range(llm.config.num_hidden_layers) if llm.config.is_moe_layer(i)]
    assert sorted(stats.summary()["layers"]) == moe_layers


def test_a_step_that_failed_between_submit_and_wait_does_not_block_the_next():
    stats = OverlapStats()
    sched = ExpertOffload(SlowExperts(), 1, torch.device("cpu"), ThreadPoolExecutor(1), stats)
    x = torch.ones(2, 4)
    ids, w = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    sched.submit(x, ids, w)          # ... and the shared expert raised: wait() never ran
    sched.submit(x + 1, ids, w)
    assert torch.equal(sched.wait(), (x + 1) * 2)


def test_cpu_only_runs_the_experts_inside_submit():
    """No accelerator to overlap with: submit computes (on the calling thread), wait returns at once."""
    import threading
    seen = []

    class Where(SlowExperts):
        def forward(self, x, ids, w):
            seen.append(threading.current_thread())
            return super().forward(x, ids, w)
    sched = ExpertOffload(Where(), 2, torch.device("cpu"), ThreadPoolExecutor(1), OverlapStats())
    assert sched.inline
    x = torch.ones(3, 4)
    t0 = time.perf_counter()
    sched.submit(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    assert time.perf_counter() - t0 >= 0.19 and seen == [threading.current_thread()]
    t1 = time.perf_counter()
    assert torch.equal(sched.wait(), x * 2) and time.perf_counter() - t1 < 0.15     # no 0.2 s sleep left
