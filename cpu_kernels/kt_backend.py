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
kt-kernel's C++ code prints to the process's stdout (``CPUInfer ... Hello``, ``NumaPool``,
``Goodbye``); every call into it that prints runs inside ``quiet_native_output``, which points file
descriptors 1 and 2 at /dev/null meanwhile, so nothing reaches the user's terminal.
Checked by tests/test_cpu_kernels.py (skipped without kt-kernel); tools/bench_experts.py.
"""
import atexit
import contextlib
import importlib.util
import os
import sys
import weakref

import numpy as np
import torch

from . import layout

MAX_LEN = 1024  # tokens per kt forward task (its buffers are sized for this); longer inputs are chunked


def kt_available() -> bool:
    return importlib.util.find_spec("kt_kernel") is not None


@contextlib.contextmanager
def quiet_native_output():
    """Send what native code writes to fds 1 and 2 to /dev/null while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _ext():
    with quiet_native_output():
        import kt_kernel  # noqa: F401  (loads the extension variant for this CPU)
    return kt_kernel.kt_kernel_ext


def _close_pools():
    """kt-kernel's pools print "Goodbye" when destroyed: at exit, drop every reference to them (the
    instances' and the shared pool table) quietly, so they are destroyed here and not at teardown."""
    import gc
    with quiet_native_output():
        for ex in list(KTExperts._instances):
            ex._moe = ex._infer = ex._keep = None
        KTExperts._cpu_infer.clear()
        gc.collect()


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
    """Routed experts on kt-kernel (RAWINT4): ``load_expert`` takes the checkpoint's INT4 tensors as
    stored (kt reads the int32 words itself), ``forward`` is synchronous, as ``CPUExperts``."""

    ACT_FORMATS = ("bf16",)
    _instances = weakref.WeakSet()
    _cpu_infer = {}  # threads -> CPUInfer (kt-kernel keeps one pool per process)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 num_threads: int | None = None, act_format: str = "bf16"):
        if not kt_available():
            raise ImportError("kt-kernel is not installed (pip install --no-deps kt-kernel==0.7.2 gguf)")
        self.E, self.D, self.I = num_experts, hidden_size, intermediate_size
        self.num_threads = num_threads or os.cpu_count()
        self._tensors = [None] * num_experts  # per expert: (gate_w, gate_s, up_w, up_s, down_w, down_s)
        self._loaded = np.zeros(num_experts, bool)
        self._moe = self._infer = self._keep = None
        KTExperts._instances.add(self)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._tensors if ts for t in ts)

    def load_expert(self, e, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
        assert 0 <= e < self.E, f"expert {e} out of range [0, {self.E})"
        ts = []
        for p, s in ((gate_packed, gate_scale), (up_packed, up_scale), (down_packed, down_scale)):
            p = torch.as_tensor(p).detach().cpu().to(torch.int32).clone()
            ts.append(p.view(torch.uint8).view(p.shape[0], p.shape[1] * 4))  # the same bytes, as kt wants
            ts.append(torch.as_tensor(s).detach().cpu().to(torch.bfloat16).clone())
        self._tensors[e] = tuple(ts)
        self._loaded[e] = True
        self._moe = None  # rebuilt at the next forward

    def _build(self):
        ext = _ext()
        if self.num_threads not in KTExperts._cpu_infer:
            cfg = ext.WorkerPoolConfig()
            cfg.subpool_count = 1
            cfg.subpool_numa_map = [0]
            cfg.subpool_thread_count = [self.num_threads]
            if not KTExperts._cpu_infer:
                atexit.register(_close_pools)
            with quiet_native_output():
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
        with quiet_native_output():
            self._moe = _rawint4_class(ext)(cfg)
            self._map = torch.arange(self.E, dtype=torch.int64)
            self._infer.submit(self._moe.load_weights_task(self._map.data_ptr()))
            self._infer.sync()
        self._keep = ts  # kt keeps pointers into these

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        """fp32 [T, D]; kt runs the tasks on its own thread pool, this call waits for them."""
        if self._moe is None:
            self._build()
        x = torch.as_tensor(x).to(torch.bfloat16).contiguous()
        ids = torch.as_tensor(topk_ids).to(torch.int64).contiguous()
        wts = torch.as_tensor(topk_weights).to(torch.float32).contiguous()
        if ids.numel() and not self._loaded[ids.numpy()].all():
            raise ValueError("some routed experts were never loaded")
        T, K = ids.shape
        out = torch.zeros((T, self.D), dtype=torch.bfloat16)
        bsz = []   # kept alive until the tasks finish
        for t0 in range(0, T, MAX_LEN):
            n = min(MAX_LEN, T - t0)
            b = torch.tensor([n], dtype=torch.int32)
            bsz.append(b)
            self._infer.submit(self._moe.forward_task(
                b.data_ptr(), K, ids[t0].data_ptr(), wts[t0].data_ptr(), x[t0].data_ptr(),
                out[t0].data_ptr(), False))
        self._infer.sync()
        return out.float()

    __call__ = forward
