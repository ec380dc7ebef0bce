"""Long-prefill expert streaming: a layer's routed experts (the ones its tokens chose) copied from the
checkpoint to the accelerator in chunks and multiplied there, the copy of chunk i+1 overlapping the
compute of chunk i through two buffers (hybrid/expert_streaming.py DoubleBuffer).

`TorchStreamDevice` is the real StreamDevice: on CUDA a copy stream and events (pinned staging of
the memory-mapped INT4 tensors, non-blocking copies); elsewhere the same calls run in order on the
CPU (no copy needed), which is how tests/test_hot_experts.py checks the path. The first chunk of a
layer is not prefetched during the previous layer: which experts a layer needs is known only after
its router ran.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_kernels.int4_matmul import int4_matmul

from .expert_streaming import DoubleBuffer

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
            self.buffers[buffer] = {e: tuple(t.pin_memory().to(self.device, non_blocking=True)
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
