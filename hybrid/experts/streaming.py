"""Long-prefill expert streaming: per MoE layer, run the routed experts on the CPU or copy the experts
the step routes to (read from the checkpoint's memory map) to the GPU in chunks and multiply there
(gpu_kernels.int4_matmul), double-buffered so the copy of chunk i+1 overlaps the compute of chunk i.

Cost model (seconds for one layer that sees T tokens, top-k experts each, h distinct experts hit,
each expert `b` bytes of INT4 weights + scales and f = 6*D*I flops per token; rates measured by
tools/bench_experts.py and a PCIe/GPU probe):
    cpu(T)    = max(h*b / cpu_kernel_bw,  T*k*f / cpu_flops)       # roofline of the CPU kernel
    stream(T) = max(h*b / pcie_bw,        T*k*f / gpu_int4_flops)  # copy and compute overlap
With h the expected distinct experts under uniform routing, E*(1-(1-k/E)^T). Decode (small T)
reads few experts and the CPU wins; past `threshold_tokens` streaming wins, since its copy cost is
bounded by the layer size while the CPU's compute grows with T. Without a GPU the answer is CPU.
`DoubleBuffer` is the bookkeeping over a device with a copy stream and a compute stream (the
`StreamDevice` protocol; tests/test_expert_streaming.py drives it with a fake device that
records every event). `TorchStreamDevice` is the real one: on CUDA a copy stream and events (pinned
staging of the memory-mapped INT4 tensors, non-blocking copies); elsewhere the same calls run in
order on the CPU (no copy needed), which is how tests/test_hot_experts.py checks the path. The first
chunk of a layer is not prefetched during the previous layer: which experts a layer needs is known
only after its router ran. Expert bytes come from hybrid.formats.int4_expert_nbytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from gpu_kernels.int4_matmul import int4_matmul
from hybrid.formats import int4_expert_nbytes

log = logging.getLogger("hybrid.expert_streaming")


@dataclass(frozen=True)
class Rates:
    """Measured rates. GB/s are 1e9 bytes/s; GFLOP/s 1e9 flop/s. pcie_gbs = 0 means no GPU."""
    pcie_gbs: float
    gpu_int4_gflops: float
    cpu_kernel_gbs: float
    cpu_gflops: float

    def __post_init__(self):
        for name in ("pcie_gbs", "gpu_int4_gflops", "cpu_kernel_gbs", "cpu_gflops"):
            if getattr(self, name) < 0:
                raise ValueError(f"Rates.{name} must be >= 0, got {getattr(self, name)}")
        if self.cpu_kernel_gbs <= 0 or self.cpu_gflops <= 0:
            raise ValueError("Rates.cpu_kernel_gbs and Rates.cpu_gflops must be > 0 (measured CPU rates)")

    @property
    def has_gpu(self) -> bool:
        return self.pcie_gbs > 0 and self.gpu_int4_gflops > 0


@dataclass(frozen=True)
class LayerShape:
    """The routed experts of one MoE layer."""
    num_experts: int          # E
    top_k: int                # k
    expert_bytes: int         # b: gate+up+down INT4 packed + scales of one expert
    flops_per_token: float    # f: per token and expert (6 * D * I)

    @classmethod
    def from_config(cls, config) -> "LayerShape":
        D, I = config.hidden_size, config.moe_intermediate_size
        return cls(config.n_routed_experts, config.num_experts_per_tok, int4_expert_nbytes(D, I), 6.0 * D * I)


def expected_experts_hit(num_experts: int, top_k: int, n_tokens: int) -> float:
    """Distinct experts touched by n_tokens tokens routing uniformly to top_k of num_experts."""
    if n_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** n_tokens)


def layer_costs(rates: Rates, shape: LayerShape, n_tokens: int, experts_hit: float | None = None):
    """(cpu seconds, stream seconds) for one layer; stream is inf without a GPU."""
    h = expected_experts_hit(shape.num_experts, shape.top_k, n_tokens) if experts_hit is None else experts_hit
    weight_bytes = h * shape.expert_bytes
    flops = n_tokens * shape.top_k * shape.flops_per_token
    cpu = max(weight_bytes / (rates.cpu_kernel_gbs * 1e9), flops / (rates.cpu_gflops * 1e9))
    if not rates.has_gpu:
        return cpu, float("inf")
    stream = max(weight_bytes / (rates.pcie_gbs * 1e9), flops / (rates.gpu_int4_gflops * 1e9))
    return cpu, stream


def threshold_tokens(rates: Rates, shape: LayerShape, limit: int = 1 << 24) -> int | None:
    """Smallest token count for which streaming a layer beats the CPU; None if never (or no GPU)."""
    if not rates.has_gpu:
        return None

    def wins(t):
        cpu, stream = layer_costs(rates, shape, t)
        return stream < cpu
    if not wins(limit):
        return None
    lo, hi = 0, 1            # wins(lo) is False (0 tokens cost nothing either way)
    while not wins(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:       # stream/cpu is monotone in T for these rooflines
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Decision:
    layer: int
    n_tokens: int
    stream: bool
    cpu_s: float
    stream_s: float


class StreamingPolicy:
    """Per-layer CPU-vs-stream choice. Logs the threshold once at construction (INFO)."""

    def __init__(self, rates: Rates | None, shape: LayerShape):
        self.rates, self.shape = rates, shape
        self.threshold = threshold_tokens(rates, shape) if rates is not None else None
        if rates is None or not rates.has_gpu:
            log.info("expert streaming off: no GPU, routed experts always run on the CPU")
        elif self.threshold is None:
            log.info("expert streaming off: the CPU is faster at every token count (PCIe %.1f GB/s, "
                     "CPU %.1f GB/s / %.0f GFLOP/s)", rates.pcie_gbs, rates.cpu_kernel_gbs, rates.cpu_gflops)
        else:
            log.info("expert streaming: a layer seeing >= %d tokens streams its experts to the GPU "
                     "(PCIe %.1f GB/s, GPU INT4 %.0f GFLOP/s, CPU %.1f GB/s / %.0f GFLOP/s, %d MB per expert)",
                     self.threshold, rates.pcie_gbs, rates.gpu_int4_gflops, rates.cpu_kernel_gbs,
                     rates.cpu_gflops, self.shape.expert_bytes // 10**6)

    def decide(self, layer: int, n_tokens: int, experts_hit: int | None = None) -> Decision:
        if self.rates is None or not self.rates.has_gpu:
            return Decision(layer, n_tokens, False, float("nan"), float("inf"))
        cpu, stream = layer_costs(self.rates, self.shape, n_tokens, experts_hit)
        d = Decision(layer, n_tokens, stream < cpu, cpu, stream)
        log.debug("layer %d: %d tokens -> %s (cpu %.2f ms, stream %.2f ms)", layer, n_tokens,
                  "stream" if d.stream else "cpu", cpu * 1e3, stream * 1e3)
        return d


class StreamDevice(Protocol):
    """What DoubleBuffer needs: two in-order queues (copy, compute) and events between them.
    `after` is an event from the other queue (or None); each call returns the op's completion event."""

    def copy(self, layer: int, buffer: int, after: Any) -> Any: ...
    def compute(self, layer: int, buffer: int, after: Any) -> Any: ...
    def wait(self, event: Any) -> None: ...


class DoubleBuffer:
    """Stream layers' experts through `num_buffers` GPU buffers (2: copy l+1 while computing l).

    Buffer b = i % num_buffers holds the i-th streamed layer. The copy into a buffer waits for the
    compute of the layer that used it before (never overwrite weights in use); the compute of a layer
    waits for its copy. Copies for the next layers are issued as soon as their buffer is released, so
    with two buffers copy(l+1) runs during compute(l). Use `run(layers)`, or step by step with
    `compute(layer)` from the model's layer loop.
    """

    def __init__(self, device: StreamDevice, layers: list[int], num_buffers: int = 2):
        assert num_buffers >= 1, "need at least one buffer"
        self.device, self.layers, self.nb = device, list(layers), num_buffers
        self.copied: dict[int, Any] = {}           # layer -> copy-complete event
        self.released: list[Any] = [None] * num_buffers   # buffer -> compute-complete event of its last user
        self.next_copy = 0                         # index in self.layers of the next layer to copy
        self.next_compute = 0
        self._issue_copies()

    def buffer_of(self, i: int) -> int:
        return i % self.nb

    def _issue_copies(self):
        # copy every layer whose buffer has been handed back (at most num_buffers ahead of compute)
        while self.next_copy < len(self.layers) and self.next_copy < self.next_compute + self.nb:
            i = self.next_copy
            b = self.buffer_of(i)
            self.copied[self.layers[i]] = self.device.copy(self.layers[i], b, after=self.released[b])
            self.next_copy += 1

    def compute(self, layer: int) -> Any:
        i = self.next_compute
        assert i < len(self.layers) and self.layers[i] == layer, \
            f"layers must be computed in the order given: expected {self.layers[i:i + 1]}, got {layer}"
        b = self.buffer_of(i)
        done = self.device.compute(layer, b, after=self.copied.pop(layer))
        self.released[b] = done
        self.next_compute += 1
        self._issue_copies()
        return done

    def run(self) -> None:
        last = None
        for layer in self.layers:
            last = self.compute(layer)
        if last is not None:
            self.device.wait(last)


CHUNK_EXPERTS = 16     # experts per buffer: 2 x 16 K2.6 experts = 0.7 GB of GPU memory


class TorchStreamDevice:
    def __init__(self, device: torch.device, fetch, chunks: list[list[int]], compute_chunk, num_buffers: int = 2):
        """fetch(e) -> the expert's stored tensors; compute_chunk({e: tensors on device}) runs on them."""
        self.device, self.fetch, self.chunks, self.compute_chunk = device, fetch, chunks, compute_chunk
        self.cuda = device.type == "cuda"
        self.buffers: list[dict] = [{} for _ in range(num_buffers)]
        self.copies = 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)

    def copy(self, chunk: int, buffer: int, after):
        self.copies += 1
        experts = self.chunks[chunk]
        if not self.cuda:
            self.buffers[buffer] = {e: tuple(t.to(self.device) for t in self.fetch(e)) for e in experts}
            return None
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)      # the buffer's previous user has finished
            self.buffers[buffer] = {e: tuple(t if t.device == self.device      # a hot expert: already there
                                             else t.pin_memory().to(self.device, non_blocking=True)
                                             for t in self.fetch(e)) for e in experts}
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def compute(self, chunk: int, buffer: int, after):
        weights = self.buffers[buffer]
        if not self.cuda:
            self.compute_chunk(weights)
            return None
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(after)
        for ts in weights.values():
            for t in ts:
                t.record_stream(stream)                 # allocated on the copy stream, used here
        self.compute_chunk(weights)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()


def add_int4_expert(out: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, k: torch.Tensor,
                    weights: torch.Tensor, stored: tuple) -> None:
    """out[tok] += weights[tok, k] * down(silu(gate(x[tok])) * up(x[tok])) for one expert whose
    INT4 tensors (as stored) are on x's device."""
    gp, gs, up, us, dp, ds = stored
    xe = x[tok]
    h = F.silu(int4_matmul(xe, gp, gs)) * int4_matmul(xe, up, us)
    y = int4_matmul(h.to(x.dtype), dp, ds).float()
    out.index_add_(0, tok, y * weights[tok, k, None].float())


def stream_layer(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, fetch,
                 chunk_experts: int = CHUNK_EXPERTS) -> tuple[torch.Tensor, TorchStreamDevice]:
    """All routed assignments of x [T, D] computed on x's device with experts streamed in chunks."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    experts = ids.unique().tolist()
    chunks = [experts[i:i + chunk_experts] for i in range(0, len(experts), chunk_experts)]

    def compute_chunk(resident: dict) -> None:
        for e, stored in resident.items():
            tok, k = torch.where(ids == e)
            add_int4_expert(out, x, tok, k, weights, stored)

    device = TorchStreamDevice(x.device, fetch, chunks, compute_chunk)
    DoubleBuffer(device, list(range(len(chunks)))).run()
    return out, device
