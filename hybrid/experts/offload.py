"""The one hand-off between a MoE layer and its routed experts: `ExpertOffload.submit` / `wait`.

Per MoE layer (README "Architecture"):
  submit(x, ids, w): on CUDA, hidden states, ids and weights are copied into pinned CPU buffers on a
      side stream (the host waits only for that copy); the layer's backend (hybrid/experts/backends.py,
      synchronous) then runs on the expert worker, one thread created by `LLM` and handed in (Numba
      and torch release the GIL), and the call returns at once;
  ... the accelerator meanwhile runs the shared expert (hybrid/model/model.py MoE.forward) and the
      hot experts (below) ...
  wait(): the worker's result; on CUDA it goes back from a pinned buffer asynchronously.
On a CPU-only run there is no accelerator to overlap with: the backend runs inside submit, on the calling
thread, before the shared expert. On the worker, its kernels' thread team ran beside the main thread's
(numba's OpenMP gives each calling thread its own team), oversubscribing the cores: measured on a 2-core
Zen 2, k2-slice decode 7.38 / 17.3 / 30.3 tok/s at batch 1 / 4 / 16 on the worker, 8.71 / 18.8 / 34.4
inline, and the tiny preset's per-layer step overhead 5.7 -> 2.3 ms.
Two optional fields change where assignments run, not the interface:
  hot: experts kept on the accelerator (`--gpu-experts`, chosen from a routing profile,
      hybrid/experts/profile.py). Their assignments are taken out of the CPU's work (replaced by a
      zero-weight duplicate of one of the token's cold experts, so the CPU kernels keep their fixed
      top-k shape and read no extra expert) and computed on the accelerator meanwhile;
  policy / fetch: long-prefill streaming (hybrid/experts/streaming.py): when the policy says so, every
      assignment of the step runs on the accelerator with the experts copied there in chunks.
`OverlapStats` records per layer: accelerator busy (submit -> wait), CPU experts busy (worker
compute time) and waiting (time blocked in wait); tools/bench_generate.py prints them.
Checked by tests/test_offload.py and tests/test_hot_experts.py.
"""
from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Executor, Future

import torch

from hybrid.experts.streaming import add_int4_expert, stream_layer


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


class ExpertOffload:
    """The routed experts of MoE layer `layer`: a CPU backend, optional hot experts and streaming."""

    def __init__(self, backend, layer: int, device: torch.device, worker: Executor, stats: OverlapStats):
        self.backend, self.layer, self.device, self.worker, self.stats = backend, layer, device, worker, stats
        self.hot: dict[int, tuple] = {}          # expert -> its INT4 tensors on the accelerator
        self.is_hot = None                       # bool [E] on the CPU, or None without hot experts
        self.policy = None                       # a streaming policy (decide(layer, n_tokens).stream)
        self.fetch = None                        # fetch(e) -> the expert's stored INT4 tensors, for streaming
        self._future = None
        self._accel_out = None                   # the accelerator's share of this step's routed output
        self._cuda = device.type == "cuda"
        self.inline = not self._cuda             # CPU-only: the experts run inside submit
        self._buffers: dict[str, torch.Tensor] = {}
        self._h2d_done = None
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)

    def set_hot(self, hot: dict[int, tuple], num_experts: int) -> None:
        """Keep these experts (stored INT4 tensors) on the accelerator."""
        self.hot = {e: tuple(t.to(self.device) for t in ws) for e, ws in hot.items()}
        self.is_hot = torch.zeros(num_experts, dtype=torch.bool)
        self.is_hot[list(hot)] = True

    # ---- the hand-off -------------------------------------------------------------------------
    def submit(self, x, topk_ids, topk_weights) -> None:
        if self._future is not None:        # a step that failed between submit and wait: drop its result
            self._future.exception()
            self._future = None
        self._t_submit = time.perf_counter()
        if self.policy is not None and self.policy.decide(self.layer, x.shape[0]).stream:
            self._accel_out, _ = stream_layer(x, topk_ids, topk_weights, lambda e: self.hot.get(e) or self.fetch(e))
            self._t_submitted = time.perf_counter()
            return
        cpu_ids, cpu_w, hot = topk_ids, topk_weights, None
        if self.is_hot is not None:
            cpu_ids, cpu_w, hot = self.split(topk_ids, topk_weights)
        host = self._to_host(x, cpu_ids, cpu_w)
        if self.inline:             # CPU-only: nothing to overlap with; run here (see the module docstring)
            self._future = Future()
            self._future.set_result(self._run(*host))
        else:
            self._future = self.worker.submit(self._run, *host)       # the CPU starts on the (cold) experts
        self._t_submitted = time.perf_counter()
        if hot is not None:                                           # the accelerator meanwhile
            self._accel_out = self._hot_forward(x, topk_ids, topk_weights, hot)

    def wait(self) -> torch.Tensor:
        """The routed output [T, D] fp32 on the accelerator's device."""
        t_wait = time.perf_counter()
        accel, self._accel_out = self._accel_out, None
        if self._future is None:                                      # streamed: all on the accelerator
            return accel
        fut, self._future = self._future, None
        y, cpu_s = fut.result()
        t_done = time.perf_counter()
        if self.stats.enabled:
            self.stats.record(self.layer, accel=t_wait - self._t_submitted, cpu=cpu_s,
                              wait=t_done - t_wait, moe=t_done - self._t_submit)
        y = self._to_device(y)
        return y if accel is None else y + accel

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        self.submit(x, topk_ids, topk_weights)
        return self.wait()

    def _run(self, x, ids, w):
        t0 = time.perf_counter()
        y = self.backend.forward(x, ids, w)
        return y, time.perf_counter() - t0

    # ---- hot experts ---------------------------------------------------------------------------
    def split(self, ids: torch.Tensor, weights: torch.Tensor):
        """CPU ids/weights with hot assignments replaced by a zero-weight copy of a cold one, and the
        hot mask [T, K] (None when no assignment is hot)."""
        hot = self.is_hot[ids.cpu()].to(ids.device)                       # [T, K]
        if not hot.any():
            return ids, weights, None
        cold_first = torch.where(hot, ids.new_full((), 2**62), ids).min(dim=1, keepdim=True).values
        cold_first = torch.where(cold_first == 2**62, ids[:, :1], cold_first)  # every expert hot: any id, weight 0
        return torch.where(hot, cold_first, ids), torch.where(hot, 0.0, weights), hot

    def _hot_forward(self, x, ids, weights, hot) -> torch.Tensor:
        """The hot (resident) experts' share of the routed output, on the accelerator."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in ids[hot].unique().tolist():
            tok, k = torch.where((ids == e) & hot)
            add_int4_expert(out, x, tok, k, weights, self.hot[e])
        return out

    # ---- copies between the accelerator and the CPU ----------------------------------------------
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
        main = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(main)     # the copies start after the kernels that produce the inputs
        with torch.cuda.stream(self._copy_stream):
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
