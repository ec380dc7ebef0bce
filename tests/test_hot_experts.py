"""Hot experts and streaming (hybrid/experts/profile.py, offload.py, apps/profile.py): the routing profile
counts every routed token, the top-N choice, ExpertOffload.split, and runs with experts on the accelerator
side (`gpu_experts=N`, `expert_streaming`) giving the logits / tokens of the run without them, on the
default backend (auto -> numba) within its bound and on the ref backend exactly. The `cuda` tests check
that on a GPU the hot experts' tensors live there and the tokens equal the CPU-only run."""
import json
import logging
import shutil

import pytest
import torch

from hybrid import LLM, SamplingParams
from hybrid.apps.profile import cli_profile
from hybrid.experts.offload import ExpertOffload, OverlapStats
from hybrid.experts.profile import PROFILE_FILE, RoutingCounter, choose_hot, load_profile

# Same dequantized (bf16-rounded) weights on both sides, fp32 sums in another order (the ref backend's
# numpy vs int4_matmul's torch reference): relative to the largest logit.
REL_TOL_FP32 = 1e-4
# The numba kernels quantize activations to int8 per row (~1% per expert output, 3e-2 on the logits vs
# transformers); experts moved off them run without that error, so the two runs differ by up to that much.
LOGIT_TOL_INT8 = 3e-2
# On a GPU in fp32: cuBLAS / Triton sum in other orders than the CPU run (no TF32: ieee dots).
REL_TOL_GPU_FP32 = 1e-3
# On a GPU in the default bf16: the accelerator side rounds activations to bf16 in every layer (on top
# of the numba int8 error above).
LOGIT_TOL_GPU_BF16 = 5e-2

N_HOT = 6
PROMPT = [5, 77, 300, 1200, 9, 42, 1777, 3, 650]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def offloads(llm) -> list[ExpertOffload]:
    return [la.mlp.experts for la in llm.model.model.layers if isinstance(getattr(la.mlp, "experts", None),
                                                                          ExpertOffload)]


@pytest.fixture(scope="module")
def profiled_dir(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hot") / "ckpt"
    shutil.copytree(tiny_dir, d)
    prompts = d.parent / "prompts.txt"
    prompts.write_text("Hello there, how are you?\n" + json.dumps({"prompt": "def f(x): return x * 2"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Name three colours."}]}) + "\n")
    assert cli_profile([str(d), "--prompts", str(prompts), "--max-tokens", "4"]) == 0     # default backend
    return d


def test_profile_counts_every_routed_token(profiled_dir):
    data = json.loads((profiled_dir / PROFILE_FILE).read_text())
    cfg = json.loads((profiled_dir / "config.json").read_text())["text_config"]
    moe_layers = [i for i in range(cfg["num_hidden_layers"]) if i >= cfg["first_k_dense_replace"]]
    assert sorted(int(k) for k in data["layers"]) == moe_layers
    assert data["tokens"] > 0
    for counts in data["layers"].values():
        assert len(counts) == cfg["n_routed_experts"]
        assert sum(counts) == data["tokens"] * cfg["num_experts_per_tok"]


def test_choose_hot_takes_the_most_used_pairs():
    profile = {1: torch.tensor([5, 0, 9, 1]), 2: torch.tensor([7, 8, 0, 0])}
    assert choose_hot(profile, 3) == {1: [2], 2: [0, 1]}


def test_split_moves_hot_assignments_off_the_cpu():
    off = ExpertOffload(None, 1, torch.device("cpu"), None, OverlapStats())
    off.set_hot({3: tuple(torch.zeros(1) for _ in range(6))}, 8)
    assert off.is_hot.tolist() == [e == 3 for e in range(8)]
    ids = torch.tensor([[3, 1], [2, 3], [3, 3], [0, 5]])
    w = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    cpu_ids, cpu_w, hot = off.split(ids, w)
    assert hot.tolist() == [[True, False], [False, True], [True, True], [False, False]]
    # a hot assignment becomes a zero-weight copy of one of the token's cold experts (no extra expert read)
    assert cpu_ids[[0, 1, 3]].tolist() == [[1, 1], [2, 2], [0, 5]]
    assert torch.equal(cpu_w, torch.tensor([[0.0, 0.5], [0.2, 0.0], [0.0, 0.0], [0.7, 0.3]]))
    none_hot, w2 = torch.tensor([[0, 1], [2, 4]]), w[:2]
    same_ids, same_w, mask = off.split(none_hot, w2)
    assert mask is None and same_ids is none_hot and same_w is w2          # nothing hot: passed through


def _check_hot_layers(llm, device_type: str) -> None:
    """N_HOT experts in all, their INT4 tensors on the accelerator's device, the mask on the CPU."""
    hot = [(off.layer, e, ws) for off in offloads(llm) for e, ws in off.hot.items()]
    assert len(hot) == N_HOT
    for layer, e, ws in hot:
        assert len(ws) == 6 and all(t.device.type == device_type for t in ws), (layer, e)
    for off in offloads(llm):
        if off.hot:
            assert off.is_hot.device.type == "cpu" and off.is_hot.sum().item() == len(off.hot)


def test_hot_experts_give_the_same_tokens_ref(profiled_dir):
    """Exactness: ref backend (fp32, the CPU yardstick) with and without hot experts."""
    plain = LLM(profiled_dir, expert_backend="ref", progress=False)
    hot = LLM(profiled_dir, expert_backend="ref", progress=False, gpu_experts=N_HOT)
    _check_hot_layers(hot, "cpu")
    a, b = plain.score(PROMPT), hot.score(PROMPT)
    assert rel_err(a, b) <= REL_TOL_FP32
    assert plain.generate([PROMPT], GREEDY)[0].token_ids == hot.generate([PROMPT], GREEDY)[0].token_ids


def score_checking_hot(llm, prompt):
    """llm.score(prompt), checking that the prompt routes to hot experts and that a hot assignment reaches
    the CPU backend only as a zero-weight stand-in (a spy on every layer's backend)."""
    seen = []
    for off in offloads(llm):
        def spy(x, ids, w, _off=off, _real=off.backend.forward):
            seen.append((_off, ids.clone(), w.clone()))
            return _real(x, ids, w)
        off.backend.forward = spy
    counter = RoutingCounter(llm.model)
    try:
        logits = llm.score(prompt)
    finally:
        counter.remove()
    used_hot = sum(int(counter.counts[off.layer][e]) for off in offloads(llm) for e in off.hot)
    assert used_hot > 0, "the prompt routes to no hot expert: the check would be empty"
    assert len(seen) == len(offloads(llm))
    for off, ids, w in seen:
        if off.is_hot is not None:
            assert (w[off.is_hot[ids]] == 0).all(), f"layer {off.layer}: a hot expert ran on the CPU"
    return logits


def test_hot_experts_default_backend(profiled_dir):
    """The default backend: hot assignments reach the CPU kernels only with weight 0, the hot experts
    are used by the prompt, and the logits stay within numba's bound of the run without them."""
    plain = LLM(profiled_dir, progress=False)
    hot = LLM(profiled_dir, progress=False, gpu_experts=N_HOT)
    assert hot.expert_backend == plain.expert_backend != "torch"
    _check_hot_layers(hot, "cpu")
    b = score_checking_hot(hot, PROMPT)
    assert rel_err(plain.score(PROMPT), b) <= LOGIT_TOL_INT8


def test_gpu_experts_without_profile_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="hybrid profile"):
        LLM(tiny_dir, progress=False, gpu_experts=4)


def test_bad_profile_file(tmp_path):
    p = tmp_path / PROFILE_FILE
    p.write_text("{oops")
    with pytest.raises(ValueError, match="not a routing profile"):
        load_profile(p)


@pytest.mark.parametrize("backend,tol", [("auto", LOGIT_TOL_INT8), ("ref", REL_TOL_FP32)])
def test_streamed_experts_give_the_same_logits(tiny_dir, monkeypatch, backend, tol):
    """expert_streaming="always": every layer's routed experts copied from the checkpoint in chunks of
    3 experts through two buffers and run by the accelerator path (int4_matmul): same logits."""
    import hybrid.experts.offload as offload_mod
    copies = []
    real = offload_mod.stream_layer

    def chunks_of_3(*args, **kw):
        out, device = real(*args, chunk_experts=3, **kw)
        copies.append(device.copies)
        return out, device
    monkeypatch.setattr(offload_mod, "stream_layer", chunks_of_3)
    prompt = list(range(3, 40))
    plain = LLM(tiny_dir, expert_backend=backend, progress=False).score(prompt)
    streamed = LLM(tiny_dir, expert_backend=backend, progress=False, expert_streaming="always").score(prompt)
    assert rel_err(plain, streamed) <= tol
    assert len(copies) == 2 and all(c >= 4 for c in copies)     # 2 MoE layers, >= 4 chunks of 3 experts each


def test_auto_streaming_keeps_the_cpu_without_a_gpu(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="hybrid.expert_streaming")
    rates = {"pcie_gbs": 25.0, "gpu_int4_gflops": 1e5, "cpu_kernel_gbs": 20.0, "cpu_gflops": 200.0}
    llm = LLM(tiny_dir, device="cpu", progress=False, expert_streaming="auto", expert_rates=rates)
    assert "no GPU" in caplog.text
    layers = offloads(llm)
    assert layers and all(off.policy is not None for off in layers)
    assert not any(off.policy.decide(off.layer, 100000).stream for off in layers)


# ---- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_hot_experts_live_on_the_gpu_and_give_the_cpu_tokens(profiled_dir):
    """fp32 on the GPU, ref backend: the hot experts' tensors are on cuda and the greedy tokens equal
    the CPU-only run's (no hot experts, device cpu)."""
    cpu = LLM(profiled_dir, device="cpu", expert_backend="ref", progress=False)
    gpu = LLM(profiled_dir, device="cuda", dtype=torch.float32, expert_backend="ref", progress=False,
              gpu_experts=N_HOT)
    _check_hot_layers(gpu, "cuda")
    assert rel_err(cpu.score(PROMPT), gpu.score(PROMPT)) <= REL_TOL_GPU_FP32
    assert cpu.generate([PROMPT], GREEDY)[0].token_ids == gpu.generate([PROMPT], GREEDY)[0].token_ids


@pytest.mark.cuda
def test_cuda_hot_experts_default_settings(profiled_dir):
    """The defaults on a GPU (bf16, auto backend): hot experts on cuda, logits within the bf16 bound of
    the run without them."""
    plain = LLM(profiled_dir, progress=False)
    hot = LLM(profiled_dir, progress=False, gpu_experts=N_HOT)
    assert hot.device.type == "cuda"
    _check_hot_layers(hot, "cuda")
    assert rel_err(plain.score(PROMPT), hot.score(PROMPT)) <= LOGIT_TOL_GPU_BF16
    assert len(hot.generate([PROMPT], GREEDY)[0].token_ids) == GREEDY.max_tokens


@pytest.mark.cuda
def test_cuda_streaming_gives_the_cpu_tokens(tiny_dir):
    """expert_streaming="always" on the GPU (fp32, ref backend): the tokens of the CPU-only run."""
    cpu = LLM(tiny_dir, device="cpu", expert_backend="ref", progress=False)
    gpu = LLM(tiny_dir, device="cuda", dtype=torch.float32, expert_backend="ref", progress=False,
              expert_streaming="always")
    assert rel_err(cpu.score(PROMPT), gpu.score(PROMPT)) <= REL_TOL_GPU_FP32
    assert cpu.generate([PROMPT], GREEDY)[0].token_ids == gpu.generate([PROMPT], GREEDY)[0].token_ids
