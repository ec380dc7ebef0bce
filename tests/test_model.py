"""The whole model against Hugging Face transformers' DeepseekV3ForCausalLM on the same weights.

Error of a position t: max_v |ours[t, v] - theirs[t, v]| / max_v |theirs[t, v]|, bounded at EVERY position.
- test_logits_match_transformers: every variant, the exact expert backends (torch, ref), routing free:
  our routers pick transformers' experts, error <= REL_TOL (= TOL of both) and the same argmax everywhere.
- test_backend_matches_transformers: every other backend of BACKENDS (numba in each activation format,
  kt when kt_kernel is installed) on every variant with routing FROZEN: our routers replay
  the experts and weights transformers chose (a router near-tie under int8 activations may otherwise
  pick another expert: a real but unbounded effect), bound TOL[backend], the same argmax wherever
  the reference's top two logits are more than twice the bound apart.
- test_default_path_matches_transformers: LLM(dir) as a user of a CPU-only machine gets it
  (expert_backend="auto", fp32), frozen routing on every position, and free routing on every position
  whose experts equal transformers'. Every model here runs on the CPU (device="cpu"), also on a GPU machine.
The routed experts always run in INT4: bf16 / FP8 checkpoints are quantized at load, so transformers
gets the same INT4 round trip of those experts (hybrid.formats, tested in tests/test_formats.py).
Bounds are measured figures with a margin (python -m pytest -s tests/test_model.py prints them).
"""
import pytest
import torch

from cpu_kernels import ACT_FORMATS   # unconditional: a broken cpu_kernels build fails here, never skips
from conftest import VARIANTS
from hf_reference import build_hf_model, freeze_routing, hf_routes
from hybrid import LLM
from hybrid.experts.backends import BACKENDS
from hybrid.formats import dequantize_int4, quantize_int4

# fp32 everywhere, experts dequantized exactly: only summation order differs (measured worst 1.5e-6)
REL_TOL = 1e-4
# per-backend bound on every position (routing frozen for the quantized ones); measured worst over the
# 4 variants and every prompt of this file
TOL = {
    "ref": REL_TOL,                 # measured 1.5e-6
    "torch": REL_TOL,               # measured 1.5e-6
    "numba": {"int8": 4e-2,         # measured 1.8e-2 (median 9e-3): int8 activations, one scale per token
              "int8x2": 1e-2},      # measured 3.9e-3 (median 2e-3): int8 row + int8 residual row
    "kt": 1.5e-2,                   # bf16 activations, its own int8: worst 6.3e-3 (kt-kernel 0.7.2 AVX2, 2026-11-29)
}
PROMPTS = (1, 23, 64)
EXACT = ("ref", "torch")    # the backends of test_logits_match_transformers; the others: test_backend_...


def cpu_llm(model_dir, **kw) -> LLM:
    """The model on the CPU in its default dtype there (fp32), whatever accelerator the machine has."""
    return LLM(model_dir, device="cpu", progress=False, **kw)


def bound(backend: str, act_format: str | None) -> float:
    t = TOL[backend]
    return t[act_format] if isinstance(t, dict) else t


def int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    return dequantize_int4(*quantize_int4(w), in_features=w.shape[1], dtype=torch.float32)


def _prompt(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_models(checkpoint_dir):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = build_hf_model(checkpoint_dir(variant), experts_int4=int4_round_trip)
        return cache[variant]
    return get


def run_both(llm, hf, frozen: bool, prompts=PROMPTS, seed=0):
    """(ours, theirs, same_route) over the prompts, positions concatenated; same_route[t]: our routers chose
    transformers' experts for position t in every MoE layer (always True when frozen)."""
    ours, theirs, same = [], [], []
    for n in prompts:
        ids = _prompt(n, llm.config.vocab_size, seed + n)
        ref, routes = hf_routes(hf, ids)
        match = torch.ones(n, dtype=torch.bool)
        if frozen:
            with freeze_routing(llm.model, routes):
                got = llm.score(ids)
        else:
            chosen, modules = {}, dict(llm.model.named_modules())
            handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: chosen.update({name: out[0]}))
                       for name in routes]
            try:
                got = llm.score(ids)
            finally:
                for h in handles:
                    h.remove()
            for name, (ids_hf, _) in routes.items():
                match &= (chosen[name].cpu().sort(-1).values == ids_hf.sort(-1).values).all(-1)
        assert got.dtype == torch.float32 and got.shape == (n, llm.config.vocab_size)
        ours.append(got), theirs.append(ref), same.append(match)
    return torch.cat(ours), torch.cat(theirs), torch.cat(same)


def check(ours, theirs, tol, what, where=None, exact_argmax=False):
    """Error <= tol at every position (of `where`); argmax equal everywhere (exact_argmax) or wherever the
    reference's top-two gap exceeds 2 * tol * max|logit| (a smaller gap can flip within the bound)."""
    where = torch.ones(len(ours), dtype=torch.bool) if where is None else where
    scale = theirs.abs().amax(-1)
    err = (ours - theirs).abs().amax(-1) / scale
    top2 = theirs.topk(2, dim=-1).values
    clear = where & (exact_argmax | ((top2[:, 0] - top2[:, 1]) > 2 * tol * scale))
    agree = ours.argmax(-1) == theirs.argmax(-1)
    e = err[where]
    print(f"\n{what}: worst {e.max():.2e} median {e.median():.2e} over {int(where.sum())}/{len(err)} positions "
          f"(bound {tol:.0e}); same argmax at {int(agree[clear].sum())}/{int(clear.sum())} clear positions "
          f"({int(agree[where].sum())}/{int(where.sum())} in all)")
    worst = int(torch.where(where, err, torch.zeros_like(err)).argmax())
    assert e.max() <= tol, f"{what}: position {worst} off by {err[worst]:.2e} of max |logit| > {tol:.0e}"
    bad = torch.nonzero(clear & ~agree).flatten().tolist()
    assert not bad, f"{what}: argmax differs at positions {bad[:10]} where the reference's margin is clear"


def test_every_backend_has_a_bound():
    assert set(TOL) == set(BACKENDS), "a backend without a named bound (or a bound for a backend that is gone)"
    assert set(TOL["numba"]) == set(ACT_FORMATS)


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, backend, checkpoint_dir, hf_models):
    assert TOL[backend] == REL_TOL
    llm = cpu_llm(checkpoint_dir(variant), expert_backend=backend)
    ours, theirs, same = run_both(llm, hf_models(variant), frozen=False)
    assert same.all(), f"{variant}/{backend}: our routers chose other experts than transformers' at " \
                       f"{int((~same).sum())} positions"
    check(ours, theirs, REL_TOL, f"{variant} {backend} (routing free)", exact_argmax=True)


BACKEND_CASES = [(b, f) for b in BACKENDS if b not in EXACT for f in (TOL[b] if isinstance(TOL[b], dict) else [None])]


@pytest.mark.parametrize("backend,act_format", BACKEND_CASES, ids=[f"{b}-{f}" if f else b for b, f in BACKEND_CASES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backend_matches_transformers(variant, backend, act_format, checkpoint_dir, hf_models):
    if backend == "kt":
        pytest.importorskip("kt_kernel")
    llm = cpu_llm(checkpoint_dir(variant), expert_backend=backend, expert_act_format=act_format)
    ours, theirs, _ = run_both(llm, hf_models(variant), frozen=True, prompts=(1, 23, 64), seed=100)
    check(ours, theirs, bound(backend, act_format), f"{variant} {backend}/{act_format} (routing frozen)")


def _act_format(llm) -> str | None:
    moe = next(layer.mlp for layer in llm.model.model.layers if hasattr(layer.mlp, "experts"))
    return getattr(moe.experts.backend, "act_format", None)


def test_default_path_matches_transformers(tiny_dir, hf_models):
    """What a user gets: LLM(dir), expert_backend "auto" (numba here, or kt where faster), its default
    activation format (the device pinned to the CPU, where the default dtype is fp32); routing frozen on
    every position, then free on every position whose experts (in every MoE layer) are transformers'."""
    llm = cpu_llm(tiny_dir)
    fmt = _act_format(llm)
    print(f"\ndefault path: expert_backend={llm.expert_backend!r}, act_format={fmt!r}")
    assert llm.expert_backend in ("numba", "kt"), f"auto resolved to {llm.expert_backend!r}, not a fast CPU backend"
    tol = bound(llm.expert_backend, fmt)
    ours, theirs, _ = run_both(llm, hf_models("k2.6"), frozen=True, prompts=(37, 64), seed=200)
    check(ours, theirs, tol, f"default {llm.expert_backend}/{fmt} (routing frozen)")
    ours, theirs, same = run_both(llm, hf_models("k2.6"), frozen=False, prompts=(37, 64), seed=200)
    # measured: 3 of these 101 positions pick another expert somewhere (router near-ties, int8 activations)
    assert same.float().mean() >= 0.9, f"our routers differ from transformers' at {int((~same).sum())} positions"
    check(ours, theirs, tol, f"default {llm.expert_backend}/{fmt} (routing free, {int((~same).sum())} "
          f"positions with another expert excluded)", where=same)


def test_score_rejects_bad_ids(tiny_dir):
    llm = cpu_llm(tiny_dir, expert_backend="torch")
    with pytest.raises(ValueError, match="empty"):
        llm.score([])
    with pytest.raises(ValueError, match="2304 is not a token id in 0..2303"):
        llm.score([1, 2, 2304])
    with pytest.raises(ValueError, match="not a token id"):
        llm.score([1, -5])


def test_int8x2_activations_are_closer_to_transformers_than_int8(tiny_dir, hf_models):
    err = {}
    for fmt in ("int8", "int8x2"):
        llm = cpu_llm(tiny_dir, expert_backend="numba", expert_act_format=fmt)
        ours, theirs, _ = run_both(llm, hf_models("k2.6"), frozen=True, prompts=(64,), seed=11)
        e = (ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)
        err[fmt] = (e.median().item(), e.max().item())
    print(f"\nint8 vs int8x2 (median, worst): {err}")
    # measured ratio ~5 for both the median and the worst position
    assert err["int8x2"][0] < err["int8"][0] / 2 and err["int8x2"][1] < err["int8"][1] / 2, err
    with pytest.raises(ValueError, match="not supported by expert_backend 'torch'"):
        cpu_llm(tiny_dir, expert_backend="torch", expert_act_format="int8x2")
