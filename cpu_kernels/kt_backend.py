"""Backend "kt": KTransformers' kt-kernel CPU MoE kernels behind the CPUExperts interface.

kt-kernel 0.7.2 reads Kimi's compressed-tensors INT4 as is (method RAWINT4: the int32 words
viewed as bytes, bf16 scales per 32) and picks AMX / AVX-VNNI / AVX2 kernels by CPU; set
KT_RAWINT4_BACKEND=avx2 to force its AVX2 kernel (``AVX2RawInt4_MOE``). It is optional:
everything here is skipped where the package is missing. Install it without its torch pin
(it pins torch==2.9.1, but its extension does not link libtorch and loads beside our torch):

    pip install --no-deps kt-kernel==0.7.2 'gguf>=0.17'   # gguf: imported by its loader module

Its own API (``kt_kernel_ext``): ``CPUInfer(WorkerPoolConfig)`` runs tasks on its thread pool;
``moe.MOEConfig(E, top_k, D, I, gpu_mask_ptr)`` + per-expert weight/scale pointers +
``quant_config`` (bits 4, group 32, no zero point) -> ``AVX2RawInt4_MOE(config)``;
``load_weights_task(map_ptr)`` and ``forward_task(bsz_ptr, k, ids_ptr, w_ptr, in_ptr, out_ptr,
incremental)`` are submitted to CPUInfer, ``sync()`` waits. Activations travel as bf16.
Checked by tests/test_cpu_kernels.py (skipped without kt-kernel); tools/bench_experts.py.
"""
import importlib.util
import os
import time

import numpy as np
import torch

from . import layout

MAX_LEN = 1024  # tokens per kt forward task (its buffers are sized for this); longer inputs are chunked


def kt_available() -> bool:
    return importlib.util.find_spec("kt_kernel") is not None


def _ext():
    import kt_kernel  # noqa: F401  (loads the extension variant for this CPU)
    return kt_kernel.kt_kernel_ext


def _host_flags() -> set:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _rawint4_class(ext):
    """kt-kernel's RAWINT4 kernel for this CPU. KT_RAWINT4_BACKEND (amx / avxvnni / avx2) wins;
    otherwise AMX only where the CPU has AMX: kt-kernel 0.7.2 picks its AMX class whenever it is
    compiled in, and that class crashed here (AVX-512 EPYC without AMX) on small shapes."""
    from kt_kernel.utils import amx
    if os.environ.get("KT_RAWINT4_BACKEND") or "amx_tile" in _host_flags():
        cls = amx._select_rawint4_backend(layout.GROUP)
    elif amx.AVXVNNI256RawInt4_MOE is not None and "avx_vnni" in _host_flags():
        cls = amx.AVXVNNI256RawInt4_MOE
    else:
        cls = amx.AVX2RawInt4_MOE
    if cls is None:
        raise RuntimeError("kt-kernel has no RAWINT4 kernel for this CPU")
    return cls


class KTExperts:
    """Routed experts on kt-kernel (RAWINT4); same interface as ``CPUExperts``."""

    LOGIT_TOL = 3e-2  # relative logit error vs transformers (tests/test_model.py; measured 1.1e-2)

    _cpu_infer = {}  # threads -> CPUInfer (kt-kernel keeps one pool per process)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "bf16"):
        if not kt_available():
            raise ImportError("kt-kernel is not installed (pip install --no-deps kt-kernel==0.7.2 gguf)")
        self.E, self.D, self.I = num_experts, hidden_size, intermediate_size
        self.num_threads = num_threads or os.cpu_count()
        self._tensors = [None] * num_experts  # per expert: (gate_w, gate_s, up_w, up_s, down_w, down_s)
        self._loaded = np.zeros(num_experts, bool)
        self._moe = None
        self._pending = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._tensors if ts for t in ts)

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        assert 0 <= e < self.E, f"expert {e} out of range [0, {self.E})"
        ts = []
        for p, s in ((gate_packed, gate_scale), (up_packed, up_scale), (down_packed, down_scale)):
            p = torch.from_numpy(layout.to_numpy_int32(p).copy())
            ts.append(p.view(torch.uint8).view(p.shape[0], p.shape[1] * 4))  # the same bytes, as kt wants
            ts.append(torch.from_numpy(layout.bf16_bits(s).copy()).view(torch.bfloat16))
        self._tensors[e] = tuple(ts)
        self._loaded[e] = True
        self._moe = None  # rebuilt at the next forward

    def load_expert_dense(self, e, w_gate, w_up, w_down):
        self.load_expert(e, *layout.quantize_rtn(w_gate), *layout.quantize_rtn(w_up),
                         *layout.quantize_rtn(w_down))

    def dequantized(self, e):
        gw, gs, uw, us, dw, ds = self._tensors[e]
        return tuple(torch.from_numpy(layout.dequantize_layout(layout.repack(w.view(torch.int32), s)))
                     for w, s in ((gw, gs), (uw, us), (dw, ds)))

    def _build(self):
        ext = _ext()
        if self.num_threads not in KTExperts._cpu_infer:
            cfg = ext.WorkerPoolConfig()
            cfg.subpool_count = 1
            cfg.subpool_numa_map = [0]
            cfg.subpool_thread_count = [self.num_threads]
            KTExperts._cpu_infer[self.num_threads] = ext.CPUInfer(cfg)
        self._infer = KTExperts._cpu_infer[self.num_threads]
        zero = tuple(torch.zeros_like(t) for t in next(ts for ts in self._tensors if ts))
        ts = [t if t is not None else zero for t in self._tensors]
        self._gpu_mask = torch.zeros(self.E, dtype=torch.bool)
        cfg = ext.moe.MOEConfig(self.E, 8, self.D, self.I, self._gpu_mask.data_ptr())
        cfg.layer_idx = 0
        cfg.pool = self._infer.backend_
        cfg.max_len = MAX_LEN
        for name, i in (("gate_projs", 0), ("gate_scales", 1), ("up_projs", 2), ("up_scales", 3),
                        ("down_projs", 4), ("down_scales", 5)):
            setattr(cfg, name, [[t[i].data_ptr() for t in ts]])
        cfg.quant_config.bits = 4
        cfg.quant_config.group_size = layout.GROUP
        cfg.quant_config.zero_point = False
        self._moe = _rawint4_class(ext)(cfg)
        self._map = torch.arange(self.E, dtype=torch.int64)
        self._infer.submit(self._moe.load_weights_task(self._map.data_ptr()))
        self._infer.sync()
        self._keep = ts  # kt keeps pointers into these

    def submit(self, x, topk_ids, topk_weights):
        assert self._pending is None, "submit() called twice without wait()"
        if self._moe is None:
            self._build()
        x = torch.as_tensor(x).to(torch.bfloat16).contiguous()
        ids = torch.as_tensor(topk_ids).to(torch.int64).contiguous()
        wts = torch.as_tensor(topk_weights).to(torch.float32).contiguous()
        if ids.numel() and not self._loaded[ids.numpy()].all():
            raise ValueError("some routed experts were never loaded")
        T, K = ids.shape
        out = torch.zeros((T, self.D), dtype=torch.bfloat16)
        bsz = []
        for t0 in range(0, T, MAX_LEN):
            n = min(MAX_LEN, T - t0)
            b = torch.tensor([n], dtype=torch.int32)
            bsz.append(b)
            self._infer.submit(self._moe.forward_task(
                b.data_ptr(), K, ids[t0].data_ptr(), wts[t0].data_ptr(), x[t0].data_ptr(),
                out[t0].data_ptr(), False))
        self._pending = (x, ids, wts, out, bsz)  # alive until the tasks finish

    def wait(self) -> torch.Tensor:
        assert self._pending is not None, "wait() without submit()"
        self._infer.sync()
        out = self._pending[3]
        self._pending = None
        return out.float()

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        self.submit(x, topk_ids, topk_weights)
        return self.wait()

    __call__ = forward


def bench_kt(threads, decode_experts, prefill_experts, quick=False, say=print):
    """kt-kernel figures for tools/bench_experts.py: same shapes, routing and timing method."""
    import tools.bench_experts as B

    res = {}
    os.environ.setdefault("KT_RAWINT4_BACKEND", "avx2")

    def make(E):
        ex = KTExperts(E, B.D, B.I, num_threads=threads)
        rng = np.random.default_rng(0)
        packs = {}
        for n, k in ((B.I, B.D), (B.D, B.I)):
            u = rng.integers(0, 16, (n, k), dtype=np.uint8)
            packs[n, k] = (torch.from_numpy(layout.pack_compressed(u)),
                           torch.full((n, k // 32), 0.01, dtype=torch.bfloat16))
        for e in range(E):  # each expert its own copy, as in memory for real
            g, d = packs[B.I, B.D], packs[B.D, B.I]
            ex.load_expert(e, *g, *g, *d)
        return ex

    ex = make(decode_experts)
    t0 = time.perf_counter()
    dec = B.bench_decode(ex, threads, steps=10 if quick else 40)
    res["kt_decode_gbs"] = dec
    say(f"\nkt-kernel ({_rawint4_class(_ext()).__name__}): decode {dec:.2f} GB/s "
        f"({time.perf_counter() - t0:.0f} s)")
    del ex
    ex = make(prefill_experts)
    g = B.bench_prefill(ex, 512, False, reps=1)
    res["kt_prefill_512_gflops"] = g
    say(f"kt-kernel: prefill T=512 uniform {g:.1f} GFLOP/s")
    return res
