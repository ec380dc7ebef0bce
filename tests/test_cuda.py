"""The CUDA paths, on a GPU only: every test is `@pytest.mark.cuda` (tests/conftest.py skips them, with
the reason, where torch sees no GPU; `pytest -m cuda` runs just these).

* the model on device="cuda" in float32 against the CPU float32 model of the same checkpoint: logits
  within a named bound and the same greedy tokens (ref backend: exact experts), within numba's bound on
  the default backend; in the default bf16, with routing replayed from the CPU run (bf16 rounding only)
  and free-running (argmax agreement);
* the Triton kernels compiled for the GPU (mla_decode, int4_matmul, int8_matmul) against their torch
  references computed on the CPU, on odd and on K2.6-sized shapes;
* gpu_weights="int8" on the GPU: the same quantized weights and tokens as on the CPU, Triton int8 in use;
* hot experts (gpu_experts=N, routing profile written from the CPU run's own counts): their INT4 tensors
  on cuda, the CPU given them only with weight 0, the CPU-only run's tokens; ExpertOffload's hot split
  directly on random experts, a token with every expert hot included;
* expert_streaming="always" (alone, and with hot experts): the CPU-only run's tokens, experts copied to
  cuda in chunks;
* ExpertOffload's pinned-buffer hand-off (device cuda) equals the CPU path, while the producing stream is
  still busy when `submit` is called, and with buffers regrown and reused.
"""
from __future__ import annotations

import importlib
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hf_reference import freeze_routing
from test_hot_experts import score_checking_hot
from hybrid import LLM, SamplingParams
from hybrid.experts.offload import ExpertOffload, OverlapStats
from hybrid.model.model import Router

DEVICE = "cuda"

# kernels: fp32 in with ieee dots, fp32 accumulate: only the summation order differs from the reference
TOL_FP32 = dict(atol=1e-4, rtol=1e-4)
# kernels: bf16 inputs / outputs (one bf16 rounding of the result; mla rounds P to bf16 as well)
TOL_BF16 = dict(atol=2e-2, rtol=2e-2)
# model logits, per position |gpu - cpu| / max |cpu logit|, float32 on both sides with the ref backend:
# cuBLAS / Triton sum in other orders (no TF32: ieee dots, torch's default fp32 matmul precision)
REL_TOL_GPU_FP32 = 1e-3
# the default backend (numba) quantizes activations to int8 per row: inputs that differ in the last bits
# can round an activation the other way (and the experts moved to the GPU run without that error)
LOGIT_TOL_INT8 = 3e-2
# bf16 on the GPU vs float32 on the CPU, routing replayed from the CPU run: measured 2.3-3.1% (per position,
# worst) for a CPU bf16 run of the tiny checkpoint on three 60-token prompts; twice that
BF16_FROZEN_REL_MAX = 6e-2
# free-running bf16 vs float32: routers flip near ties; the CPU bf16 run agrees on 92-98% of positions
BF16_ARGMAX_MIN = 0.8
# the same backend on the same (exactly copied) values, on another thread
TOL_SAME = dict(atol=1e-6, rtol=1e-6)

PROMPT = [5, 77, 300, 1200, 9, 42, 1777, 3, 650]
N_HOT = 6
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [PROMPT, _prompt(40, 1), [7]]


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Worst position of max |got - ref| / max |ref|."""
    return ((got.float() - ref.float()).abs().amax(-1) / ref.float().abs().amax(-1)).max().item()


def routes_of(llm, ids: list[int]) -> tuple[torch.Tensor, dict]:
    """(logits, every Router's (ids, weights) on the CPU) of one score call."""
    routes, handles = {}, []
    for name, m in llm.model.named_modules():
        if isinstance(m, Router):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: routes.__setitem__(name, (out[0].cpu(), out[1].cpu()))))
    try:
        return llm.score(ids), routes
    finally:
        for h in handles:
            h.remove()


def forced_rows(llm, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """llm's logits at the positions that chose `tokens` after `prompt` (teacher-forced) [len(tokens), V]."""
    return llm.score(prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


def offloads(llm) -> list[ExpertOffload]:
    return [la.mlp.experts for la in llm.model.model.layers if isinstance(getattr(la.mlp, "experts", None),
                                                                          ExpertOffload)]


def on_device(llm) -> None:
    assert llm.device.type == DEVICE
    assert all(p.device.type == DEVICE for p in llm.model.parameters())
    assert llm.engine.cache.ckv.device.type == DEVICE
    assert all(layer.self_attn.triton for layer in llm.model.model.layers), "absorbed decode not on Triton"


# ---- the model on the GPU -----------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_float32_model_on_cuda_matches_cpu(tiny_dir, backend):
    cpu = LLM(tiny_dir, device="cpu", dtype=torch.float32, expert_backend=backend, progress=False)
    gpu = LLM(tiny_dir, device=DEVICE, dtype=torch.float32, expert_backend=backend, progress=False)
    on_device(gpu)
    bound = REL_TOL_GPU_FP32 if backend == "ref" else LOGIT_TOL_INT8
    for p in PROMPTS[:2]:
        assert rel_err(cpu.score(p), gpu.score(p)) <= bound, f"{len(p)}-token prompt"
    outs = gpu.generate(PROMPTS, GREEDY)                 # batched: prefill, then Triton decode of 3 rows
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    if backend == "ref":
        assert [o.token_ids for o in outs] == [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]
    else:   # every token the GPU chose is the CPU's greedy choice up to numba's bound (near-ties may flip)
        for p, o in zip(PROMPTS, outs):
            rows = forced_rows(cpu, p, o.token_ids)
            chosen = rows.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
            gap = (rows.amax(-1) - chosen) / rows.abs().amax(-1)
            assert gap.max() <= LOGIT_TOL_INT8, f"{len(p)}-token prompt: gap {gap.max():.3e}"


@pytest.mark.cuda
def test_default_bf16_model_on_cuda(tiny_dir):
    """The defaults on a GPU (device auto, bf16, auto backend) against the CPU float32 run."""
    cpu = LLM(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
    gpu = LLM(tiny_dir, progress=False)
    assert gpu.dtype == torch.bfloat16
    on_device(gpu)
    long = PROMPTS[1]
    ref, routes = routes_of(cpu, long)
    with freeze_routing(gpu.model, routes):
        frozen = gpu.score(long)
    assert rel_err(ref, frozen) <= BF16_FROZEN_REL_MAX
    free = gpu.score(long)
    assert (free.argmax(-1) == ref.argmax(-1)).float().mean() >= BF16_ARGMAX_MIN
    outs = gpu.generate(PROMPTS, GREEDY)
    agree = torch.cat([forced_rows(cpu, p, o.token_ids).argmax(-1) == torch.tensor(o.token_ids)
                       for p, o in zip(PROMPTS, outs)])
    assert len(agree) == len(PROMPTS) * GREEDY.max_tokens
    assert agree.float().mean() >= BF16_ARGMAX_MIN, f"greedy agreement {agree.float().mean():.2f}"


# ---- the Triton kernels, compiled ------------------------------------------------------------------
def _mla_case(B, H, R, P, S, Lmax, slots, lengths, dtype, seed=0):
    import gpu_kernels
    from gpu_kernels import mla_decode, mla_decode_ref
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    args = (t(B, H, R), t(B, H, P), t(S, Lmax, R), t(S, Lmax, P), torch.tensor(slots), torch.tensor(lengths))
    scale = (R + P) ** -0.5
    want = mla_decode_ref(*args, scale)
    dev = [a.to(DEVICE) for a in args]
    assert gpu_kernels.use_triton(*dev[:4])
    got = mla_decode(*dev, scale)
    assert got.shape == (B, H, R) and got.dtype == dtype and got.device.type == DEVICE
    return got.cpu(), want


def _int4_case(T, N, K, dtype, seed=0):
    import gpu_kernels
    from gpu_kernels import int4_matmul, int4_matmul_ref
    from hybrid.formats import quantize_int4
    g = torch.Generator().manual_seed(seed)
    packed, scale = quantize_int4(torch.randn(N, K, generator=g) / K ** 0.5)
    x = torch.randn(T, K, generator=g).to(dtype)
    want = int4_matmul_ref(x, packed, scale)
    dev = [a.to(DEVICE) for a in (x, packed, scale)]
    assert gpu_kernels.use_triton(*dev)
    got = int4_matmul(*dev)
    assert got.shape == (T, N) and got.dtype == dtype and got.device.type == DEVICE
    return got.cpu(), want


def _int8_case(shape, N, fmt, dtype, seed=0):
    import gpu_kernels
    from gpu_kernels import int8_matmul, int8_matmul_ref, quantize_weight_8bit
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight_8bit(torch.randn(N, shape[-1], generator=g), fmt)
    x = torch.randn(*shape, generator=g).to(dtype)
    want = int8_matmul_ref(x, q, s)
    dev = [a.to(DEVICE) for a in (x, q, s)]
    assert gpu_kernels.use_triton(*dev)
    got = int8_matmul(*dev)
    assert got.shape == (*shape[:-1], N) and got.dtype == dtype and got.device.type == DEVICE
    return got.cpu(), want


F32, BF16 = torch.float32, torch.bfloat16
KERNEL_CASES = {
    # MLA: K2.6's R=512 / P=64 with 20 heads (one partial block of 16), an empty sequence, long single rows
    "mla_k26_bf16": lambda: _mla_case(3, 20, 512, 64, 4, 1000, [2, 0, 3], [1, 333, 1000], BF16),
    "mla_k26_fp32": lambda: _mla_case(3, 20, 512, 64, 4, 1000, [2, 0, 3], [1, 333, 1000], F32, seed=1),
    "mla_empty_odd_R": lambda: _mla_case(2, 4, 24, 8, 2, 8, [1, 0], [0, 5], F32, seed=2),
    "mla_batch1_4099": lambda: _mla_case(1, 64, 512, 64, 1, 4099, [0], [4099], BF16, seed=3),
    "mla_5_rows": lambda: _mla_case(5, 4, 32, 8, 6, 300, [5, 4, 3, 2, 1], [300, 1, 129, 17, 64], F32, seed=4),
    # INT4: T = 1, 3, 20, 100 (partial 64-row block), N not a multiple of 64, K2.6's expert shapes
    "int4_T1": lambda: _int4_case(1, 70, 96, F32),
    "int4_T3": lambda: _int4_case(3, 70, 96, F32, seed=1),
    "int4_T20_N130": lambda: _int4_case(20, 130, 64, F32, seed=2),
    "int4_T100": lambda: _int4_case(100, 130, 96, F32, seed=3),
    "int4_bf16": lambda: _int4_case(3, 70, 128, BF16, seed=4),
    "int4_k26_gate_bf16": lambda: _int4_case(1, 2048, 7168, BF16, seed=5),
    "int4_k26_down_bf16": lambda: _int4_case(7, 7168, 2048, BF16, seed=6),
    # 8-bit: odd K, 3-d input, bf16, fp8, a K2.6-sized projection
    "int8_T1": lambda: _int8_case((1, 96), 70, "int8", F32),
    "int8_T3_K50": lambda: _int8_case((3, 50), 70, "int8", F32, seed=1),
    "int8_3d_T20": lambda: _int8_case((2, 10, 96), 130, "int8", F32, seed=2),
    "int8_bf16": lambda: _int8_case((3, 96), 70, "int8", BF16, seed=3),
    "fp8_T3": lambda: _int8_case((3, 96), 70, "fp8", F32, seed=4),
    "fp8_bf16_T33": lambda: _int8_case((33, 7168), 2112, "fp8", BF16, seed=5),
    "int8_k26_bf16": lambda: _int8_case((1, 7168), 1536, "int8", BF16, seed=6),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_kernel_on_cuda_matches_reference(case):
    got, want = KERNEL_CASES[case]()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), **(TOL_FP32 if got.dtype == torch.float32 else TOL_BF16))


# ---- 8-bit accelerator weights -----------------------------------------------------------------------
@pytest.mark.cuda
def test_gpu_weights_int8_on_cuda(tiny_dir, monkeypatch):
    from torch import nn

    from hybrid.model.int8_linear import Int8Linear
    int8_mod = importlib.import_module("gpu_kernels.int8_matmul")
    calls = []
    real = int8_mod.int8_matmul_triton
    monkeypatch.setattr(int8_mod, "int8_matmul_triton", lambda *a: calls.append(1) or real(*a))
    kw = dict(dtype=torch.float32, expert_backend="ref", progress=False, gpu_weights="int8")
    cpu, gpu = LLM(tiny_dir, device="cpu", **kw), LLM(tiny_dir, device=DEVICE, **kw)
    on_device(gpu)
    mods_c, mods_g = dict(cpu.model.named_modules()), dict(gpu.model.named_modules())
    q_names = [n for n, m in mods_g.items() if isinstance(m, Int8Linear)]
    assert q_names and all(n.endswith("kv_b_proj") for n, m in mods_g.items() if type(m) is nn.Linear)
    for n in q_names:      # quantized on the GPU: the same 8-bit values and scales as on the CPU
        assert mods_g[n].weight_q.device.type == DEVICE
        assert torch.equal(mods_g[n].weight_q.cpu(), mods_c[n].weight_q), n
        assert torch.equal(mods_g[n].weight_scale.cpu(), mods_c[n].weight_scale), n
    assert rel_err(cpu.score(PROMPTS[1]), gpu.score(PROMPTS[1])) <= REL_TOL_GPU_FP32
    assert calls, "the Triton int8 kernel did not run"
    assert [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]
    bf16 = LLM(tiny_dir, device=DEVICE, progress=False, gpu_weights="int8", expert_backend="ref")
    ref, routes = routes_of(cpu, PROMPTS[1])
    with freeze_routing(bf16.model, routes):
        assert rel_err(ref, bf16.score(PROMPTS[1])) <= BF16_FROZEN_REL_MAX


# ---- routed experts on the GPU -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hot_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a routing profile counted from the CPU run of the prompts themselves, so
    the hot experts are ones these prompts use."""
    import json

    from hybrid.experts.profile import PROFILE_FILE, RoutingCounter
    d = tmp_path_factory.mktemp("cuda-hot") / "ckpt"
    shutil.copytree(tiny_dir, d)
    llm = LLM(d, device="cpu", expert_backend="ref", progress=False)
    counter = RoutingCounter(llm.model)
    try:
        llm.generate(PROMPTS, GREEDY)
    finally:
        counter.remove()
    (d / PROFILE_FILE).write_text(json.dumps(counter.to_json()))
    return d


@pytest.mark.cuda
def test_hot_experts_on_cuda_give_the_cpu_tokens(hot_dir):
    cpu = LLM(hot_dir, device="cpu", dtype=torch.float32, expert_backend="ref", progress=False)
    gpu = LLM(hot_dir, device=DEVICE, dtype=torch.float32, expert_backend="ref", progress=False,
              gpu_experts=N_HOT)
    on_device(gpu)
    hot = [(off.layer, e, ws) for off in offloads(gpu) for e, ws in off.hot.items()]
    assert len(hot) == N_HOT
    for layer, e, ws in hot:
        assert len(ws) == 6 and all(t.device.type == DEVICE for t in ws), (layer, e)
    got = score_checking_hot(gpu, PROMPT)
    assert rel_err(cpu.score(PROMPT), got) <= REL_TOL_GPU_FP32
    assert all(b.is_pinned() for off in offloads(gpu) for b in off._buffers.values())
    assert [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]


@pytest.mark.cuda
@pytest.mark.parametrize("gpu_experts", [0, N_HOT])     # N_HOT: streamed layers also hold hot experts
def test_streaming_always_on_cuda_gives_the_cpu_tokens(hot_dir, monkeypatch, gpu_experts):
    import hybrid.experts.offload as offload_mod
    devices = []
    real = offload_mod.stream_layer

    def chunks_of_3(*args, **kw):
        out, dev = real(*args, chunk_experts=3, **kw)     # several chunks through the two buffers
        devices.append(dev)
        return out, dev
    monkeypatch.setattr(offload_mod, "stream_layer", chunks_of_3)
    cpu = LLM(hot_dir, device="cpu", dtype=torch.float32, expert_backend="ref", progress=False)
    gpu = LLM(hot_dir, device=DEVICE, dtype=torch.float32, expert_backend="ref", progress=False,
              expert_streaming="always", gpu_experts=gpu_experts)
    on_device(gpu)
    assert sum(len(off.hot) for off in offloads(gpu)) == gpu_experts
    cpu_calls = []
    for off in offloads(gpu):
        off.backend.forward = lambda *a, _real=off.backend.forward: cpu_calls.append(1) or _real(*a)
    assert rel_err(cpu.score(PROMPTS[1]), gpu.score(PROMPTS[1])) <= REL_TOL_GPU_FP32
    assert devices and all(d.cuda and d.copies >= 2 for d in devices)
    assert all(t.device.type == DEVICE for d in devices for buf in d.buffers for ws in buf.values() for t in ws)
    assert [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]
    assert not cpu_calls, "streaming 'always' left routed work on the CPU"


# ---- ExpertOffload on its own -------------------------------------------------------------------------
def _random_experts(E, D, I, seed):
    from hybrid.experts.backends import TorchExperts
    from hybrid.formats import quantize_int4
    g = torch.Generator().manual_seed(seed)
    stored = {e: tuple(t for n, k in ((I, D), (I, D), (D, I))
                       for t in quantize_int4(torch.randn(n, k, generator=g) / k ** 0.5)) for e in range(E)}
    backend = TorchExperts(E, D, I)
    for e, ws in stored.items():
        backend.load_expert(e, *ws)
    return backend, stored


def _busy_then(x: torch.Tensor) -> torch.Tensor:
    """x's values in a fresh device tensor written only after the current stream has slept ~50 ms."""
    out = torch.zeros_like(x)
    torch.cuda._sleep(100_000_000)
    return out.copy_(x)


@pytest.mark.cuda
def test_offload_pinned_path_equals_the_cpu_path():
    E, D, I, K = 8, 96, 64, 3
    backend, _ = _random_experts(E, D, I, seed=0)
    with ThreadPoolExecutor(max_workers=1) as worker:
        gpu_off = ExpertOffload(backend, 1, torch.device(DEVICE), worker, OverlapStats())
        cpu_off = ExpertOffload(backend, 1, torch.device("cpu"), worker, OverlapStats())
        g = torch.Generator().manual_seed(1)
        for T, dtype in ((5, F32), (1, F32), (17, BF16), (5, BF16), (33, F32)):   # buffers regrown and reused
            x = torch.randn(T, D, generator=g).to(dtype)
            ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices
            w = torch.rand(T, K, generator=g)
            want = cpu_off.forward(x, ids, w)
            on_gpu = [t.to(DEVICE) for t in (x, ids, w)]
            torch.cuda.synchronize()
            xd, idd, wd = (_busy_then(t) for t in on_gpu)     # queued behind ~3 x 50 ms of GPU sleep
            gpu_off.submit(xd, idd, wd)        # the copies must wait for the stream still writing xd / idd / wd
            y = gpu_off.wait()
            assert y.device.type == DEVICE and y.dtype == torch.float32 and y.shape == (T, D)
            torch.testing.assert_close(y.cpu(), want, **TOL_SAME)
        assert gpu_off._buffers and all(b.is_pinned() for b in gpu_off._buffers.values())


@pytest.mark.cuda
def test_offload_hot_split_on_cuda_equals_the_cpu_path():
    """Experts 0, 3, 5 hot on the GPU (Triton int4_matmul), the rest on the CPU; one token routed only to
    hot experts. The sum equals the CPU-only path within the fp32 bound."""
    E, D, I, K = 8, 96, 64, 3
    backend, stored = _random_experts(E, D, I, seed=2)
    with ThreadPoolExecutor(max_workers=1) as worker:
        cpu_off = ExpertOffload(backend, 1, torch.device("cpu"), worker, OverlapStats())
        gpu_off = ExpertOffload(backend, 1, torch.device(DEVICE), worker, OverlapStats())
        gpu_off.set_hot({e: stored[e] for e in (0, 3, 5)}, E)
        g = torch.Generator().manual_seed(3)
        T = 19
        x = torch.randn(T, D, generator=g)
        ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices
        ids[4] = torch.tensor([5, 0, 3])                 # every expert of this token is hot
        w = torch.rand(T, K, generator=g)
        assert gpu_off.is_hot[ids].any(dim=1).sum() > 1
        want = cpu_off.forward(x, ids, w)
        y = gpu_off.forward(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
        torch.testing.assert_close(y.cpu(), want, **TOL_FP32)
