"""Hot experts: routing profile on prompts, top-N choice, and the split run equal to the CPU-only run."""
import json
import shutil

import pytest
import torch

from hybrid import LLM, SamplingParams
from hybrid.experts.profile import PROFILE_FILE, HotExperts, choose_hot, cli_profile, load_profile


@pytest.fixture(scope="module")
def profiled_dir(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hot") / "ckpt"
    shutil.copytree(tiny_dir, d)
    prompts = d.parent / "prompts.txt"
    prompts.write_text("Hello there, how are you?\n" + json.dumps({"prompt": "def f(x): return x * 2"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Name three colours."}]}) + "\n")
    assert cli_profile([str(d), "--prompts", str(prompts), "--max-tokens", "4", "--expert-backend", "torch"]) == 0
    return d


def test_profile_counts_every_routed_token(profiled_dir):
    data = json.loads((profiled_dir / PROFILE_FILE).read_text())
    cfg = json.loads((profiled_dir / "config.json").read_text())["text_config"]
    moe_layers = [i for i in range(cfg["num_hidden_layers"]) if i >= cfg["first_k_dense_replace"]]
    assert sorted(int(k) for k in data["layers"]) == moe_layers
    for counts in data["layers"].values():
        assert len(counts) == cfg["n_routed_experts"]
        assert sum(counts) == data["tokens"] * cfg["num_experts_per_tok"]


def test_choose_hot_takes_the_most_used_pairs():
    profile = {1: torch.tensor([5, 0, 9, 1]), 2: torch.tensor([7, 8, 0, 0])}
    assert choose_hot(profile, 3) == {1: [2], 2: [0, 1]}


def test_split_moves_hot_assignments_off_the_cpu():
    class Dummy:
        pass
    hx = HotExperts(Dummy(), {3: tuple(torch.zeros(1) for _ in range(6))}, torch.device("cpu"), 8)
    ids = torch.tensor([[3, 1], [2, 3], [3, 3]])
    w = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    cpu_ids, cpu_w, hot = hx.split(ids, w)
    assert hot.tolist() == [[True, False], [False, True], [True, True]]
    assert cpu_ids.tolist()[:2] == [[1, 1], [2, 2]]
    assert torch.equal(cpu_w[:2], torch.tensor([[0.0, 0.5], [0.2, 0.0]]))
    assert cpu_w[2].tolist() == [0.0, 0.0]


def test_gpu_experts_give_the_same_tokens(profiled_dir):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 77, 300, 1200, 9, 42]
    plain = LLM(profiled_dir, expert_backend="torch", progress=False)
    hot = LLM(profiled_dir, expert_backend="torch", progress=False, gpu_experts=6)
    a = plain.score(prompt)
    b = hot.score(prompt)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert plain.generate([prompt], sp)[0].token_ids == hot.generate([prompt], sp)[0].token_ids
    wrapped = [layer.mlp.experts for layer in hot.model.model.layers
               if isinstance(getattr(layer.mlp, "experts", None), HotExperts)]
    assert sum(len(h.weights) for h in wrapped) == 6


def test_gpu_experts_without_profile_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="hybrid profile"):
        LLM(tiny_dir, expert_backend="torch", progress=False, gpu_experts=4)


def test_bad_profile_file(tmp_path):
    p = tmp_path / PROFILE_FILE
    p.write_text("{oops")
    with pytest.raises(ValueError, match="not a routing profile"):
        load_profile(p)


def test_streamed_experts_give_the_same_logits(tiny_dir, monkeypatch):
    """expert_streaming="always": every layer's routed experts copied from the checkpoint in chunks of
    3 experts through two buffers and run by the accelerator path (int4_matmul) — same logits."""
    import hybrid.experts.streaming as streamer
    monkeypatch.setattr(streamer, "CHUNK_EXPERTS", 3)
    copies = []
    real = streamer.stream_layer

    def counting(*args, **kw):
        out, device = real(*args, chunk_experts=streamer.CHUNK_EXPERTS, **kw)
        copies.append(device.copies)
        return out, device
    monkeypatch.setattr(streamer, "stream_layer", counting)
    prompt = list(range(3, 40))
    plain = LLM(tiny_dir, expert_backend="torch", progress=False).score(prompt)
    streamed = LLM(tiny_dir, expert_backend="torch", progress=False, expert_streaming="always").score(prompt)
    assert (plain - streamed).abs().max() <= 1e-4 * plain.abs().max()
    assert len(copies) == 2 and all(c >= 4 for c in copies)     # 2 MoE layers, >= 4 chunks of 3 experts each


def test_auto_streaming_keeps_the_cpu_without_a_gpu(tiny_dir, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="hybrid.expert_streaming")
    rates = {"pcie_gbs": 25.0, "gpu_int4_gflops": 1e5, "cpu_kernel_gbs": 20.0, "cpu_gflops": 200.0}
    llm = LLM(tiny_dir, expert_backend="torch", progress=False, expert_streaming="auto", expert_rates=rates)
    if llm.device.type == "cpu":
        assert "no GPU" in caplog.text
        layer = next(la for la in llm.model.model.layers if isinstance(getattr(la.mlp, "experts", None), HotExperts))
        assert not layer.mlp.experts.policy.decide(1, 100000).stream
