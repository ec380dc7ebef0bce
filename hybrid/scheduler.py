"""Overlap of the CPU routed experts with accelerator work, per MoE layer (DESIGN.md "One decode step").

`ExpertScheduler` wraps a layer's routed-expert backend behind the same submit/wait interface:
  submit(x, ids, w): on CUDA, hidden states, ids and weights are copied into pinned CPU buffers on a
      side stream (the host waits only for that copy); then a persistent worker thread runs the
      backend (Numba kernels release the GIL) and the call returns at once;
  ... the accelerator meanwhile runs the shared expert (hybrid/moe.py MoE.forward) ...
  wait(): joins the worker; on CUDA the result goes back from a pinned buffer asynchronously.
On a CPU-only machine the same overlap holds: the shared expert runs in torch on the caller's
thread while the routed experts run on the worker.
`OverlapStats` records per layer: accelerator busy (submit -> wait), CPU experts busy (worker
compute time) and waiting (time blocked in wait); tools/bench_generate.py prints them.
Checked by tests/test_scheduler.py.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
import concurrent.futures
from concurrent.futures import ThreadPoolExecutor

import torch

_WORKER = None
_WORKER_LOCK = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    """One persistent thread for the routed experts (layers run one after another)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-experts")
        return _WORKER


class OverlapStats:
    """Per-layer timings in seconds, summed over calls."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self):
        self.calls = defaultdict(int)
        self.accel = defaultdict(float)
        self.cpu = defaultdict(float)
        self.wait = defaultdict(float)
        self.moe = defaultdict(float)

    def record(self, layer, accel, cpu, wait, moe):
        self.calls[layer] += 1
        self.accel[layer] += accel
        self.cpu[layer] += cpu
        self.wait[layer] += wait
        self.moe[layer] += moe

    def summary(self) -> dict:
        """Totals over layers plus the overlap ratio: MoE time / max(CPU experts, accelerator)."""
        tot = {k: sum(getattr(self, k).values()) for k in ("accel", "cpu", "wait", "moe")}
        per_layer = {layer: {"calls": self.calls[layer], "accel_s": self.accel[layer], "cpu_s": self.cpu[layer],
                             "wait_s": self.wait[layer], "moe_s": self.moe[layer]} for layer in sorted(self.calls)}
        bound = sum(max(self.cpu[la], self.accel[la]) for la in self.calls)
        return {"accel_s": tot["accel"], "cpu_experts_s": tot["cpu"], "wait_s": tot["wait"], "moe_s": tot["moe"],
                "overlap_ratio": tot["moe"] / bound if bound else float("nan"), "layers": per_layer}


class ExpertScheduler:
    def __init__(self, backend, layer_idx: int, device: torch.device, stats: OverlapStats):
        self.backend, self.layer_idx, self.device, self.stats = backend, layer_idx, device, stats
        self._future = None
        self._t_submit = 0.0
        self._cuda = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._h2d_done = None
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)

    def __getattr__(self, name):          # nbytes, dequantized, load_expert... of the wrapped backend
        return getattr(self.backend, name)

    def _pinned(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer for `like`, kept per layer and grown when a step has more tokens."""
        buf = self._buffers.get(key)
        n = like.numel()
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = torch.empty(max(n, 1), dtype=like.dtype, pin_memory=True)
            self._buffers[key] = buf
        return buf[:n].view(like.shape)

    def _to_host(self, *tensors):
        """CUDA: copy into pinned buffers on the side stream; the host waits only for these copies."""
        if not self._cuda:
            return tensors
        if self._h2d_done is not None:
            self._h2d_done.synchronize()        # the previous result's copy out of our buffer is over
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            host = tuple(self._pinned(f"in{i}", t).copy_(t, non_blocking=True) for i, t in enumerate(tensors))
        self._copy_stream.synchronize()
        return host

    def _to_device(self, y: torch.Tensor) -> torch.Tensor:
        if not self._cuda:
            return y
        staged = self._pinned("out", y).copy_(y)
        out = staged.to(self.device, non_blocking=True)
        self._h2d_done = torch.cuda.Event()
        self._h2d_done.record()
        return out

    def _run(self, x, ids, w):
        t0 = time.perf_counter()
        y = self.backend.forward(x, ids, w)
        return y, time.perf_counter() - t0

    def submit(self, x, topk_ids, topk_weights):
        if self._future is not None:        # a step that failed between submit and wait: drop its result
            concurrent.futures.wait([self._future])
            self._future = None
        self._t_submit = time.perf_counter()
        x, topk_ids, topk_weights = self._to_host(x, topk_ids, topk_weights)
        self._future = _worker().submit(self._run, x, topk_ids, topk_weights)
        self._t_submitted = time.perf_counter()

    def wait(self) -> torch.Tensor:
        t_wait = time.perf_counter()
        y, cpu_s = self._future.result()
        self._future = None
        t_done = time.perf_counter()
        if self.stats.enabled:
            self.stats.record(self.layer_idx, accel=t_wait - self._t_submitted, cpu=cpu_s,
                              wait=t_done - t_wait, moe=t_done - self._t_submit)
        return self._to_device(y)

    def forward(self, x, topk_ids, topk_weights):
        self.submit(x, topk_ids, topk_weights)
        return self.wait()
