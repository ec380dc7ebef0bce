"""The whole model against Hugging Face transformers' DeepseekV3ForCausalLM on the same weights.

Criterion (issue 2): float32, max |ours - theirs| <= 1e-4 * max |logit|, same argmax at every position.
"""
import pytest
import torch

from conftest import VARIANTS
from hf_reference import build_hf_model, hf_logits
from hybrid import LLM
from hybrid.model.loader import expert_backends

REL_TOL = 1e-4


def _prompt(n, vocab=2048, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_models(checkpoint_dir):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = build_hf_model(checkpoint_dir(variant))
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, checkpoint_dir, hf_models):
    llm = LLM(checkpoint_dir(variant), expert_backend="torch", progress=False)
    for n in (1, 23, 64):
        ids = _prompt(n, seed=n)
        ours, theirs = llm.score(ids), hf_logits(hf_models(variant), ids)
        assert ours.dtype == torch.float32 and ours.shape == (n, llm.config.vocab_size)
        err = (ours - theirs).abs().max().item()
        assert err <= REL_TOL * theirs.abs().max().item(), f"{variant} n={n}: max abs error {err}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("backend", [b for b in expert_backends() if b != "torch"])
@pytest.mark.parametrize("seed", [7, 11])
def test_expert_backends_match_transformers(backend, seed, tiny_dir, hf_models):
    """The fast CPU backends on the real path, against transformers. With int8 activations a router
    near-tie can flip an expert choice and move that position's logits a lot (a legitimate effect
    of the activation format), so the bound holds for the typical position (median) and for 90%
    of them, and greedy tokens agree where the reference's top two are not nearly tied."""
    if backend == "kt":
        pytest.importorskip("kt_kernel")
    llm = LLM(tiny_dir, expert_backend=backend, progress=False)
    ids = _prompt(40, seed=seed)
    ours, theirs = llm.score(ids), hf_logits(hf_models("k2.6"), ids)
    per_position = (ours - theirs).abs().amax(-1) / theirs.abs().max()
    tol = getattr(llm.model.model.layers[1].mlp.experts, "LOGIT_TOL", REL_TOL)
    assert per_position.median() <= tol, f"{backend}: median relative logit error {per_position.median():.2e} > {tol}"
    assert per_position.quantile(0.9) <= tol, f"{backend}: 90th percentile {per_position.quantile(0.9):.2e} > {tol}"
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * theirs.abs().max()   # positions not decided by a near-tie
    agree = (ours.argmax(-1)[clear] == theirs.argmax(-1)[clear]).float().mean()
    assert agree >= 0.9, f"{backend}: greedy tokens agree at {agree:.0%} of clear positions"


def test_score_rejects_bad_ids(tiny_dir):
    llm = LLM(tiny_dir, expert_backend="torch", progress=False)
    with pytest.raises(ValueError, match="empty"):
        llm.score([])
    with pytest.raises(ValueError, match="2304 is not a token id in 0..2303"):
        llm.score([1, 2, 2304])
    with pytest.raises(ValueError, match="not a token id"):
        llm.score([1, -5])


def test_int8x2_activations_are_closer_to_transformers_than_int8(tiny_dir, hf_models):
    pytest.importorskip("numba")
    ids = _prompt(64, seed=11)
    theirs = hf_logits(hf_models("k2.6"), ids)
    med = {}
    for fmt in ("int8", "int8x2"):
        ours = LLM(tiny_dir, expert_backend="numba", expert_act_format=fmt, progress=False).score(ids)
        med[fmt] = ((ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)).median().item()
    assert med["int8x2"] < med["int8"] / 2, med
    with pytest.raises(ValueError, match="not 'torch'"):
        LLM(tiny_dir, expert_backend="torch", expert_act_format="int8x2", progress=False)
